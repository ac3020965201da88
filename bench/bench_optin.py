"""RCPT-check benchmark of issue 4 (P-OPTIN): the opt-in check on a list of
1,000,000 confirmed subscribers on PostgreSQL.

Setup (about a minute): a dedicated database ``gw_bench_optin_<random>`` is
created on PostgreSQL (127.0.0.1:5432, trust auth, user postgres or root), the
gateway's schema migrated into it, the account ``bench`` (sender domain
example.com) and its list ``news.example.com`` (envelope sender
news@example.com) registered through the gateway's own stores, and 1,000,000
confirmed subscribers loaded with COPY (asyncpg ``copy_records_to_table``),
their keyed address hashes computed with the registry's own ``Keys`` exactly
as the store does. The database is dropped at the end (``--keep-db`` keeps
it; ``--reuse-db NAME`` skips the setup).

Processes (the pattern of bench/bench_gateway.py, whose helpers are imported):
a sink (bench/sink.py) and two gateways (bench/launch_gateway.py) on that
database, relaying to the sink, differing only in the RCPT checks:

  on   checks.rcpt = rcpt_relay, rcpt_limit, rcpt_optin
  off  checks.rcpt = rcpt_relay, rcpt_limit              (rcpt_optin removed)

Both keep ``mail_list`` at MAIL, so both treat the mail as registered list
mail (one list recipient per client transaction, per-recipient
List-Unsubscribe headers): the difference is the opt-in check alone. Both
have the issue-2 checks otherwise.

Load: 50 concurrent SMTP sessions (AUTH once), each sending list mail with 10
recipients, one transaction per recipient (MAIL, RCPT, DATA of a 4 KiB
message, 10 times), N messages per run.
Recipients:

  random  10 distinct subscribers drawn uniformly from the 1,000,000 for
          every message, nearly all never asked for before (the client
          reports the share of draws seen before)
  warm    drawn from a hot set of 2,000 subscribers that were all looked up
          once before

Per distribution and repetition both gateways run one after the other (order
rotated). Prints msgs/s min/median/max over the repetitions, RCPT latency
p50/p99 (round trip of one RCPT command at the client), the ratio on/off of
the median throughputs and the p99 RCPT difference. With all processes on
one small machine the 50-session runs saturate the CPUs, so their RCPT
latency is mostly queueing; a third, one-session run ("random-1",
``--probe-messages``) shows the latency one RCPT lookup adds without it,
against the target: the opt-in check costs at most 15% of throughput and adds
under 2 ms p99 per RCPT.
Results also go to bench/results/optin-<time>.json.

How the gateway answers: the first RCPT of list mail starts loading the whole
list into the gateway's memory (``registry.snapshot_max_entries``, default
5,000,000 addresses); the benchmark waits for that after its warm-up and
prints the load time, so the measured runs show the steady state: every RCPT,
random or warm, answered from memory. ``--registry snapshot_max_entries=0``
measures the per-entry cache instead, where a "random" recipient is a cache
miss and costs a database round trip.

    python3 bench/bench_optin.py                 # 1,000,000 subscribers, N=1000, 3 reps (~5 min)
    python3 bench/bench_optin.py -n 300 --reps 1 --subscribers 100000   # quick look
    python3 bench/bench_optin.py --reuse-db NAME --registry lookup_batch=false   # A/B a registry setting
    python3 bench/bench_optin.py --reuse-db NAME --registry snapshot_max_entries=0   # per-entry cache misses
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import secrets
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path

import uvloop

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

import bench_gateway as bg  # noqa: E402  (sink/gateway processes, raw client, percentiles)

PG_HOST, PG_PORT = "127.0.0.1", 5432
SECRET = "bench-optin-registry-secret-0123456789abcdef"
LIST_FROM = f"news@{bg.DOMAIN}"
LIST_ID = "news.example.com"
SCRYPT_N = 16
CONCURRENCY = 50
RCPTS = 10
HOT = 2000
SUB_DOMAINS = ("example.org", "example.net")


def subscriber_address(i: int) -> str:
    return f"reader{i:07d}@{SUB_DOMAINS[i % 2]}"


# ------------------------------------------------------------------ the database
async def _admin_conn():
    import asyncpg

    last = None
    for user in ("postgres", "root"):
        try:
            return user, await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=user, database="test", timeout=5)
        except Exception as exc:  # noqa: BLE001
            last = exc
    raise bg.BenchError(f"cannot reach PostgreSQL at {PG_HOST}:{PG_PORT} as postgres or root: {last}")


async def create_database() -> tuple[str, str]:
    user, conn = await _admin_conn()
    name = f"gw_bench_optin_{secrets.token_hex(4)}"
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return user, name


async def drop_database(name: str) -> None:
    _, conn = await _admin_conn()
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def load_database(url: str, user: str, name: str, count: int) -> str:
    """Schema, account, list and ``count`` confirmed subscribers; returns the list's id."""
    import asyncpg

    from gateway.accounts.store import AccountStore
    from gateway.registry.model import normalize_address
    from gateway.registry.service import RegistryService
    from gateway.registry.settings import RegistrySettings
    from gateway.registry.store import new_nonce
    from gateway.registry.tokens import Keys
    from gateway.storage.db import create_engine, migrate

    engine = create_engine(url)
    try:
        await migrate(engine)
        accounts = AccountStore(engine, scrypt_n=SCRYPT_N)
        await accounts.refresh()
        await accounts.add(bg.ACCOUNT, bg.PASSWORD, contact=f"ops@{bg.DOMAIN}")
        await accounts.add_domain(bg.ACCOUNT, bg.DOMAIN, approved_by="bench")
        svc = RegistryService(engine, RegistrySettings(secret=SECRET), secret=SECRET.encode())
        lst = await svc.create_list(bg.ACCOUNT, name="Bench News", list_id=LIST_ID, senders=[LIST_FROM],
                                    confirm_from=f"confirm@{bg.DOMAIN}")
    finally:
        await engine.dispose()

    keys = Keys(SECRET.encode())
    for i in (0, 1, count - 1):               # the generated form is the normalized form
        assert normalize_address(subscriber_address(i)) == subscriber_address(i)
    now = time.time()
    columns = ["list_id", "address", "address_hash", "status", "nonce", "source", "requested_at",
               "requested_ip", "requested_ua", "confirmed_at", "confirmed_ip", "confirmed_ua",
               "confirm_status", "confirm_sent_at", "confirm_mails", "created_at"]
    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=user, database=name, timeout=10)
    try:
        t0 = time.perf_counter()
        chunk = 100_000
        for start in range(0, count, chunk):
            rows = []
            for i in range(start, min(count, start + chunk)):
                addr = subscriber_address(i)
                rows.append((lst.id, addr, keys.address_hash(lst.id, addr), "confirmed", new_nonce(),
                             "bench import", now - 86400, "192.0.2.1", "bench", now - 3600, "192.0.2.2",
                             "bench", "sent", now - 86000, 1, now - 86400))
            await conn.copy_records_to_table("list_subscribers", records=rows, columns=columns)
            print(f"  loaded {min(count, start + chunk):>9,} subscribers ({time.perf_counter() - t0:5.1f} s)",
                  flush=True)
        await conn.execute("ANALYZE list_subscribers")
        got = await conn.fetchval("SELECT count(*) FROM list_subscribers WHERE list_id = $1 AND status = "
                                  "'confirmed'", lst.id)
        if got != count:
            raise bg.BenchError(f"{got} subscribers in the database, {count} were loaded")
    finally:
        await conn.close()
    return lst.id


async def existing_list(user: str, name: str) -> tuple[str, int]:
    import asyncpg

    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=user, database=name, timeout=10)
    try:
        lid = await conn.fetchval("SELECT id FROM mailing_lists WHERE list_id = $1", LIST_ID)
        count = await conn.fetchval("SELECT count(*) FROM list_subscribers WHERE list_id = $1", lid)
    finally:
        await conn.close()
    if lid is None:
        raise bg.BenchError(f"database {name} holds no list {LIST_ID}")
    return lid, count


# ------------------------------------------------------------------ load
def list_message(size: int = 4096) -> bytes:
    head = (f"From: Bench News <{LIST_FROM}>\r\n"
            f"To: Bench News readers <{LIST_FROM}>\r\n"
            "Subject: benchmark list mail\r\n"
            f"Date: {formatdate(time.time(), localtime=False)}\r\n"
            f"Message-ID: <bench-optin-1@{bg.DOMAIN}>\r\n"
            "MIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n"
            "\r\n").encode()
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\r\n"
    body = line * ((size - len(head)) // len(line) + 1)
    msg = (head + body)[:size - 2] + b"\r\n"
    assert b"\r\n." not in msg
    return msg


class ListClient(bg.RawClient):
    """bench_gateway's raw client, sending list mail with several recipients
    and timing each RCPT. With ``pipeline`` it sends each transaction's MAIL,
    RCPT and DATA in one write (RFC 2920, as Postfix and most list software
    do) and times the RCPT from that write to its reply."""

    pipeline = False

    async def _expect(self, expect: int) -> None:
        code, text = await self.p.reply()
        if code != expect:
            raise bg.BenchError(f"{text!r} (expected {expect})")

    async def send_list(self, count: int, wire: bytes, pick, rcpt_lat: list[float], msg_lat: list[float]) -> None:
        """``count`` list messages of RCPTS recipients each. The gateway takes
        one list recipient per client transaction (docs/registry.md), so each
        recipient is its own transaction (MAIL, RCPT, DATA), as a list MTA
        with ``smtp_destination_recipient_limit = 1`` sends it."""
        mail = f"MAIL FROM:<{LIST_FROM}>\r\n".encode()
        clock = time.perf_counter
        cmd = self._cmd
        for _ in range(count):
            t0 = clock()
            for addr in pick():
                t1 = clock()
                if self.pipeline:
                    self.p.transport.write(mail + b"RCPT TO:<" + addr + b">\r\nDATA\r\n")
                    await self._expect(250)
                    await self._expect(250)
                    rcpt_lat.append(clock() - t1)
                    await self._expect(354)
                else:
                    await cmd(mail, 250)
                    t1 = clock()
                    await cmd(b"RCPT TO:<" + addr + b">\r\n", 250)
                    rcpt_lat.append(clock() - t1)
                    await cmd(b"DATA\r\n", 354)
                await cmd(wire, 250)
            msg_lat.append(clock() - t0)


@dataclass
class Run:
    target: str
    dist: str
    rep: int
    messages: int
    seconds: float
    rate: float
    rcpt_lat: list[float] = field(repr=False)
    msg_lat: list[float] = field(repr=False)
    seen_before: float = float("nan")   # share of RCPTs to an address this gateway was asked about before
    cpu_us_per_msg: float = float("nan")


class Picker:
    """Recipient draws; remembers per target which addresses it was already asked about."""

    def __init__(self, subscribers: int, seed: int):
        self.subscribers = subscribers
        self.rng = random.Random(seed)
        self.hot = self.rng.sample(range(subscribers), min(HOT, subscribers))
        self.asked: dict[str, set[int]] = {}

    def picker(self, target: str, dist: str, counter: list[int]):
        asked = self.asked.setdefault(target, set())
        rng = random.Random(self.rng.random())
        population = self.hot if dist == "warm" else range(self.subscribers)

        def pick() -> list[bytes]:
            idx = rng.sample(population, RCPTS)
            for i in idx:
                if i in asked:
                    counter[0] += 1
                else:
                    asked.add(i)
            return [subscriber_address(i).encode() for i in idx]
        return pick


async def run_load(target: str, child: bg.Child, sink: bg.Child, dist: str, rep: int, n: int, wire: bytes,
                   pickers: Picker, timeout: float, concurrency: int = CONCURRENCY) -> Run:
    shares = [n // concurrency + (1 if i < n % concurrency else 0) for i in range(concurrency)]
    clients = [ListClient(child.port, True) for _ in range(concurrency)]
    before = await bg.sink_count(sink)
    seen = [0]
    try:
        async with asyncio.timeout(60):
            await asyncio.gather(*(c.open() for c in clients))
        rcpt_lists: list[list[float]] = [[] for _ in clients]
        msg_lists: list[list[float]] = [[] for _ in clients]
        picks = [pickers.picker(target, dist, seen) for _ in clients]
        cpu0 = child.cpu()
        t0 = time.perf_counter()
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(c.send_list(k, wire, p, r, m)
                                   for c, k, p, r, m in zip(clients, shares, picks, rcpt_lists, msg_lists)))
        seconds = time.perf_counter() - t0
        cpu = child.cpu() - cpu0
    finally:
        async with asyncio.timeout(30):
            await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    after = await bg.sink_count(sink)
    if after - before != n * RCPTS:
        raise bg.BenchError(f"{target}: the sink got {after - before} copies, {n * RCPTS} were due")
    rcpt = [x for lst in rcpt_lists for x in lst]
    return Run(target, dist, rep, n, seconds, n / seconds, rcpt, [x for lst in msg_lists for x in lst],
               seen[0] / len(rcpt), cpu / n * 1e6)


async def wait_for_snapshot(child: bg.Child, timeout: float) -> str:
    """Wait (bounded) for the gateway's log line saying whether the list is
    held in memory; returns it (it names the entries and the load time)."""
    deadline = time.monotonic() + timeout
    while True:
        for line in child.stderr_path.read_text(errors="replace").splitlines():
            if "held in memory" in line:
                return line.split(": ", 1)[-1]
        if time.monotonic() > deadline:
            raise bg.BenchError(f"{child.name}: the list was not loaded into memory within {timeout:.0f} s")
        await asyncio.sleep(0.2)


# ------------------------------------------------------------------ main
def gateway_extra(url: str, optin: bool, registry: dict | None = None) -> dict:
    rcpt = ["rcpt_relay", "rcpt_limit"] + (["rcpt_optin"] if optin else [])
    return {
        "storage": {"url": url},
        "auth": {"scrypt_n": SCRYPT_N, "insecure_test_scrypt": True},   # a bench, like a test suite
        "registry": {"secret": SECRET, **(registry or {})},
        "checks": {"mail": bg.ISSUE2_CHECKS["mail"] + ["mail_list"], "rcpt": rcpt},
    }


def registry_options(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise bg.BenchError(f"--registry {item!r}: KEY=VALUE expected")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def summarize(runs: list[Run]) -> dict:
    out: dict = {}
    for dist in ("random", "warm", "random-1"):
        per = {}
        for target in ("on", "off"):
            rs = [r for r in runs if r.target == target and r.dist == dist]
            if not rs:
                continue
            rates = [r.rate for r in rs]
            rcpt = [x for r in rs for x in r.rcpt_lat]
            msg = [x for r in rs for x in r.msg_lat]
            per[target] = {"rates": rates, "min": min(rates), "median": statistics.median(rates),
                           "max": max(rates), "rcpt_p50_ms": bg.pct(rcpt, 50) * 1000,
                           "rcpt_p99_ms": bg.pct(rcpt, 99) * 1000, "rcpt_p99_per_rep_ms":
                               [bg.pct(r.rcpt_lat, 99) * 1000 for r in rs],
                           "msg_p50_ms": bg.pct(msg, 50) * 1000, "msg_p99_ms": bg.pct(msg, 99) * 1000,
                           "seen_before": [r.seen_before for r in rs],
                           "gateway_cpu_us_per_msg": statistics.median(r.cpu_us_per_msg for r in rs)}
        if "on" in per and "off" in per:
            per["ratio_on_off"] = per["on"]["median"] / per["off"]["median"]
            per["rcpt_p99_added_ms"] = per["on"]["rcpt_p99_ms"] - per["off"]["rcpt_p99_ms"]
        out[dist] = per
    return out


def report(summary: dict, args, subscribers: int) -> None:
    print()
    print(f"{subscribers:,} confirmed subscribers on PostgreSQL; {CONCURRENCY} sessions x list mail with {RCPTS} "
          f"recipients; N={args.messages} messages per run, {args.reps} repetitions; {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, uvloop")
    for dist, per in summary.items():
        if not per:
            continue
        print(f"\nrecipients: {dist}" + {
            "random": " (uniform over all subscribers, most never asked for before)",
            "warm": f" (hot set of {HOT}, looked up before)",
            "random-1": " (as random, ONE session: latency without queueing on a saturated machine)"}[dist])
        print(f"  {'opt-in check':<14} {'min':>7} {'median':>7} {'max':>7} msgs/s   RCPT p50 ms  RCPT p99 ms   "
              f"msg p99 ms   seen before   gateway CPU us/msg")
        for target in ("on", "off"):
            v = per.get(target)
            if v is None:
                continue
            seen = "/".join(f"{s:.0%}" for s in v["seen_before"]) if target == "on" else "-"
            print(f"  {target:<14} {v['min']:7.1f} {v['median']:7.1f} {v['max']:7.1f}         "
                  f"{v['rcpt_p50_ms']:8.2f}    {v['rcpt_p99_ms']:8.2f}    {v['msg_p99_ms']:9.1f}   "
                  f"{seen:>11}   {v['gateway_cpu_us_per_msg']:10.0f}")
        if "ratio_on_off" in per:
            ratio, added = per["ratio_on_off"], per["rcpt_p99_added_ms"]
            print(f"  throughput on/off (medians) = {ratio:.3f} (cost {1 - ratio:+.1%}); "
                  f"RCPT p99 added = {added:+.2f} ms")
            print(f"  target (cost <= 15%, p99 added < 2 ms): throughput {'MET' if ratio >= 0.85 else 'NOT MET'}, "
                  f"latency {'MET' if added < 2.0 else 'NOT MET'}")


async def main(args) -> int:
    t_start = time.monotonic()
    ListClient.pipeline = args.pipeline
    tmp = Path(tempfile.mkdtemp(prefix="gwbench-optin-"))
    name = args.reuse_db
    user = None
    created = False
    children: list[bg.Child] = []
    runs: list[Run] = []
    try:
        if name:
            user, conn = await _admin_conn()
            await conn.close()
            lid, subscribers = await existing_list(user, name)
            print(f"reusing database {name}: list {lid} with {subscribers:,} subscribers", flush=True)
        else:
            user, name = await create_database()
            created = True
            print(f"database {name}: loading {args.subscribers:,} confirmed subscribers", flush=True)
            url = f"postgresql+asyncpg://{user}@{PG_HOST}:{PG_PORT}/{name}"
            lid = await load_database(url, user, name, args.subscribers)
            subscribers = args.subscribers
            print(f"setup done in {time.monotonic() - t_start:.0f} s", flush=True)
        url = f"postgresql+asyncpg://{user}@{PG_HOST}:{PG_PORT}/{name}"

        sink = await bg.spawn("sink", [bg.PY, str(HERE / "sink.py")], tmp)
        children.append(sink)
        gws = {}
        for target, optin in (("on", True), ("off", False)):
            gws[target] = await bg.start_gateway(f"optin-{target}", tmp, sink.port,
                                                 gateway_extra(url, optin, registry_options(args.registry)), False)
            children.append(gws[target])
        print("processes: " + ", ".join(f"{c.name} pid {c.pid} port {c.port}" for c in children)
              + f"; temp dir {tmp}", flush=True)
        wire = list_message() + b".\r\n"
        pickers = Picker(subscribers, args.seed)

        # warm-up: upstream pools, allocator; then the hot set through the "on" gateway's cache
        for target in ("on", "off"):
            await run_load(target, gws[target], sink, "random", 0, min(args.messages, 200), wire, pickers,
                           args.run_timeout)
        hot_msgs = -(-len(pickers.hot) // RCPTS)
        hot_iter = iter(pickers.hot * 2)

        def hot_pick():
            return [subscriber_address(next(hot_iter)).encode() for _ in range(RCPTS)]

        clients = [ListClient(gws["on"].port, True) for _ in range(CONCURRENCY)]
        shares = [hot_msgs // CONCURRENCY + (1 if i < hot_msgs % CONCURRENCY else 0) for i in range(CONCURRENCY)]
        try:
            async with asyncio.timeout(args.run_timeout):
                await asyncio.gather(*(c.open() for c in clients))
                await asyncio.gather(*(c.send_list(k, wire, hot_pick, [], []) for c, k in zip(clients, shares)))
        finally:
            async with asyncio.timeout(30):
                await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        pickers.asked["on"].update(pickers.hot)
        if registry_options(args.registry).get("snapshot_max_entries", 5_000_000) >= subscribers:
            # the warm-up's first RCPT started loading the list into the "on" gateway's memory
            print(f"list snapshot of the 'on' gateway: {await wait_for_snapshot(gws['on'], args.run_timeout)}; "
                  f"resident memory: on {gws['on'].rss_mib():.0f} MiB, off {gws['off'].rss_mib():.0f} MiB",
                  flush=True)
        else:
            print("list snapshots off or too small for the list: every new recipient is a database lookup",
                  flush=True)

        targets = ["on", "off"]
        for rep in range(args.reps):
            for dist in ("random", "warm", "random-1"):
                order = targets[rep % 2:] + targets[:rep % 2]
                for target in order:
                    one = dist == "random-1"
                    r = await run_load(target, gws[target], sink, "random" if one else dist, rep + 1,
                                       args.probe_messages if one else args.messages, wire, pickers,
                                       args.run_timeout, 1 if one else CONCURRENCY)
                    r.dist = dist
                    runs.append(r)
                    print(f"  rep {rep + 1} {dist:<8} opt-in {target:<3} {r.rate:7.1f} msgs/s  "
                          f"RCPT p50 {bg.pct(r.rcpt_lat, 50) * 1000:6.2f} ms  p99 {bg.pct(r.rcpt_lat, 99) * 1000:6.2f} ms"
                          f"  msg p99 {bg.pct(r.msg_lat, 99) * 1000:7.1f} ms  seen before {r.seen_before:4.0%}"
                          f"  gateway CPU {r.cpu_us_per_msg:6.0f} us/msg", flush=True)
    finally:
        for child in reversed(children):
            await child.stop()
        if created and not args.keep_db:
            await drop_database(name)
        elif name:
            print(f"database {name} kept (reuse with --reuse-db {name})")
    summary = summarize(runs)
    report(summary, args, subscribers)
    bg.RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = bg.RESULTS / f"optin-{stamp}.json"
    out.write_text(json.dumps({
        "when": stamp, "argv": sys.argv[1:], "subscribers": subscribers, "messages": args.messages,
        "reps": args.reps, "concurrency": CONCURRENCY, "recipients": RCPTS, "hot_set": HOT,
        "cpus": os.cpu_count(), "python": platform.python_version(), "summary": summary,
        "runs": [{"target": r.target, "dist": r.dist, "rep": r.rep, "messages": r.messages, "seconds": r.seconds,
                  "rate": r.rate, "rcpt_p50_ms": bg.pct(r.rcpt_lat, 50) * 1000,
                  "rcpt_p99_ms": bg.pct(r.rcpt_lat, 99) * 1000, "msg_p99_ms": bg.pct(r.msg_lat, 99) * 1000,
                  "seen_before": r.seen_before, "gateway_cpu_us_per_msg": r.cpu_us_per_msg} for r in runs],
    }, indent=1))
    print(f"\nresults written to {out.relative_to(REPO)}; total {time.monotonic() - t_start:.0f} s")
    if not args.keep_tmp:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--messages", type=int, default=1000, help="messages per run (default 1000)")
    p.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    p.add_argument("--subscribers", type=int, default=1_000_000, help="confirmed subscribers (default 1,000,000)")
    p.add_argument("--probe-messages", type=int, default=100,
                   help="messages of the one-session latency probe per run (default 100)")
    p.add_argument("--seed", type=int, default=4, help="seed of the recipient draws")
    p.add_argument("--run-timeout", type=float, default=180.0, help="seconds one run may take (default 180)")
    p.add_argument("--registry", action="append", default=[], metavar="KEY=VALUE",
                   help="a [registry] setting of both gateways, e.g. lookup_batch=false or lookup_pool_size=0 "
                        "(the engine path); VALUE is JSON if it parses, else a string (repeatable)")
    p.add_argument("--pipeline", action="store_true",
                   help="clients pipeline each transaction's MAIL, RCPT and DATA (RFC 2920); RCPT latency is "
                        "then measured from that write to the RCPT's reply")
    p.add_argument("--keep-db", action="store_true", help="keep the bench database")
    p.add_argument("--reuse-db", default="", metavar="NAME", help="use a database kept by --keep-db (no setup)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    return p.parse_args(argv)


if __name__ == "__main__":
    try:
        sys.exit(uvloop.run(asyncio.wait_for(main(parse_args()), 1800)))
    except bg.BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        sys.exit(1)
