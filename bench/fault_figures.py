"""Figures of the fault matrix of issue 11, measured on this tree.

Each scenario runs an in-process gateway on loopback (the tests' config
builder, sink and fault proxy, tests/conftest.py and tests/faultproxy.py)
with the fault made real, and prints what a client and the upstream saw:
replies, copies, connections, seconds. The tests assert the behaviour; this
script gives the numbers for the notes and the docs (timings belong here, not
in the tests).

    python3 bench/fault_figures.py                  # every scenario
    python3 bench/fault_figures.py --only pg,redis  # some of them

Scenarios: hostile (a non-UTF-8 EHLO: attempts until 250 and copies at the
upstream), aborts (20 aborted transactions with 8-bit bytes: upstream
connections opened), pg (PostgreSQL black-holed at the default storage and
registry deadlines: seconds to each answer), redis (the counters' Redis cut
and black-holed: AUTH answers and seconds), upstream (the first upstream
accepts TCP and never greets, default connect timeout: seconds per message),
http (an unauthenticated 100 MB POST: the process's RSS growth), auth (AUTH
of a known and an unknown account at scrypt N=2^15: ms each).
PostgreSQL (127.0.0.1:5432) and Redis (127.0.0.1:6379) must be running for
their scenarios; a missing one is skipped with a line that says so.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import os
import secrets
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))

import uvloop  # noqa: E402

from conftest import MESSAGE, Sink, base_config, pg_database_url, tcp_reachable  # noqa: E402
from faultproxy import FaultProxy  # noqa: E402
from gateway.app import Gateway  # noqa: E402
from gateway.config import from_mapping  # noqa: E402
from gateway.txlog import TransactionLog  # noqa: E402
import smtp_client  # noqa: E402
from smtp_client import cmd, dot_stuff, raw_session, reply  # noqa: E402

smtp_client.TIMEOUT = 60.0   # a figure may be a long wait (a default connect timeout); the scenario has its own bound

DEADLINE = 120.0     # no scenario step may take longer
ROWS: list[tuple[str, str]] = []


def row(what: str, figure: str) -> None:
    ROWS.append((what, figure))
    print(f"  {what:<64} {figure}", flush=True)


def plain(login: str, password: str) -> bytes:
    return b"AUTH PLAIN " + base64.b64encode(b"\0" + login.encode() + b"\0" + password.encode())


AUTH = plain("alice", "s3cret")


async def timed(coro: Awaitable[Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    result = await asyncio.wait_for(coro, DEADLINE)
    return result, time.perf_counter() - t0


class Run:
    """One gateway for one scenario, in a temp folder, stopped at the end."""

    def __init__(self, folder: Path, sink: Sink | None, **sections: Any):
        self.folder, self.sink, self.sections = folder, sink, sections
        self.gw: Gateway | None = None

    async def __aenter__(self) -> Gateway:
        config = from_mapping(base_config(self.folder, self.sink, **self.sections), "<fault_figures>")
        self.gw = Gateway(config, txlog=TransactionLog(config.log.transactions))
        await self.gw.start()
        await self.gw.accounts.add("alice", "s3cret", contact="ops@example.com")
        await self.gw.accounts.add_domain("alice", "example.com", approved_by="bench")
        return self.gw

    async def __aexit__(self, *exc: Any) -> None:
        assert self.gw is not None
        await self.gw.stop(grace=0.5)


async def relay(port: int, ehlo: bytes = b"EHLO client.test", auth: bytes = AUTH) -> list[bytes]:
    """One authenticated session relaying MESSAGE; the replies, in order."""
    reader, writer, greeting = await raw_session(port)
    out = [greeting]
    try:
        for line in (ehlo, auth, b"MAIL FROM:<alice@example.com>", b"RCPT TO:<bob@example.org>", b"DATA"):
            out.append(await cmd(reader, writer, line))
        writer.write(dot_stuff(MESSAGE) + b".\r\n")
        await writer.drain()
        out.append(await reply(reader))
        await cmd(reader, writer, b"QUIT")
    finally:
        writer.close()
    return out


def code(answer: bytes) -> str:
    return " ".join(answer.decode("ascii", "replace").split()[:2])


# ------------------------------------------------------------------ scenarios
async def hostile(folder: Path) -> None:
    sink = await Sink().start()
    try:
        async with Run(folder, sink) as gw:
            attempts = 0
            final = b""
            while attempts < 3 and not final.startswith(b"250"):    # a client that retries a 4xx, 3 times at most
                attempts += 1
                final = (await relay(gw.ports["plain"], ehlo=b"EHLO bad\xff\xfehost.test"))[-1]
            await asyncio.sleep(0.3)
            row("non-UTF-8 EHLO: attempts until 250, copies at the upstream",
                f"{attempts} attempt(s), {len(sink.messages)} copy/copies, last reply {code(final)}")
    finally:
        await sink.stop()


async def aborts(folder: Path) -> None:
    sink = await Sink().start()
    try:
        async with Run(folder, sink) as gw:
            for i in range(20):
                reader, writer, _ = await raw_session(gw.ports["plain"])
                for line in (b"EHLO h\xff%d.test" % i, AUTH, b"MAIL FROM:<alice@example.com>",
                             b"RCPT TO:<b\xe9b@example.org>", b"RCPT TO:<bob@example.org>"):
                    await cmd(reader, writer, line)
                writer.close()
                await writer.wait_closed()
                for _ in range(100):
                    if not gw.sessions:
                        break
                    await asyncio.sleep(0.02)
            idle = sum(len(up.idle) for up in gw.relay.upstreams)
            row("20 aborted transactions with 8-bit bytes: upstream connections",
                f"{sink.connections} opened in all, {idle} idle in the pool after")
    finally:
        await sink.stop()


async def pg(folder: Path) -> None:
    if not tcp_reachable("127.0.0.1", 5432):
        row("PostgreSQL black-holed", "skipped: PostgreSQL is not reachable at 127.0.0.1:5432")
        return
    from sqlalchemy.engine import make_url
    url, drop = pg_database_url("gw_figures")
    proxy = await FaultProxy("127.0.0.1", 5432).start()
    sink = await Sink().start()
    try:
        via = make_url(url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        async with Run(folder, sink, storage={"url": via}) as gw:
            await gw.accounts.add("bob", "pw-bob", contact="ops@bob.example")
            await gw.registry.create_list("alice", name="News", list_id="news.example.com",
                                          senders=["news@example.com"], confirm_from="confirm@example.com")
            await gw.accounts.refresh()
            gw.registry.cache.snapshots = None        # list lookups need the database
            reader, writer, _ = await raw_session(gw.ports["plain"])
            await cmd(reader, writer, b"EHLO client.test")
            await cmd(reader, writer, AUTH)
            for sender in (b"news@example.com", b"alice@example.com"):   # the steady state: the senders were read
                await cmd(reader, writer, b"MAIL FROM:<" + sender + b">")
                await cmd(reader, writer, b"RSET")
            await proxy.set_mode("blackhole")
            got, s = await timed(cmd(reader, writer, b"MAIL FROM:<alice@example.com>"))
            row("PG black-holed: MAIL in an authenticated session", f"{code(got)} in {s:.3f} s")
            got, s = await timed(cmd(reader, writer, b"RCPT TO:<bob@example.org>"))
            row("PG black-holed: RCPT of plain relay", f"{code(got)} in {s:.3f} s")
            await cmd(reader, writer, b"RSET")
            await cmd(reader, writer, b"MAIL FROM:<news@example.com>")
            got, s = await timed(cmd(reader, writer, b"RCPT TO:<reader@example.org>"))
            row("PG black-holed: RCPT of list mail (registry lookup)", f"{code(got)} in {s:.3f} s")
            writer.close()
            for who, auth in (("known account", plain("bob", "pw-bob")), ("unknown account", plain("nobody", "x"))):
                r2, w2, _ = await raw_session(gw.ports["plain"])
                await cmd(r2, w2, b"EHLO client.test")
                got, s = await timed(cmd(r2, w2, auth))
                row(f"PG black-holed: AUTH of a {who}", f"{code(got)} in {s:.3f} s")
                w2.close()
            await proxy.set_mode("pass")
    finally:
        await sink.stop()
        await proxy.stop()
        drop()


async def redis(folder: Path) -> None:
    if not tcp_reachable("127.0.0.1", 6379):
        row("Redis down", "skipped: Redis is not reachable at 127.0.0.1:6379")
        return
    proxy = await FaultProxy("127.0.0.1", 6379).start()
    sink = await Sink().start()
    try:
        counters = {"backend": "redis", "redis_url": f"redis://127.0.0.1:{proxy.port}/0",
                    "key_prefix": f"gwfig:{secrets.token_hex(4)}:"}
        async with Run(folder, sink, counters=counters) as gw:
            for mode in ("cut", "blackhole"):
                await proxy.set_mode(mode)
                for attempt in (1, 2):
                    r, w, _ = await raw_session(gw.ports["plain"])
                    await cmd(r, w, b"EHLO client.test")
                    got, s = await timed(cmd(r, w, AUTH))
                    row(f"Redis {mode}: AUTH with the right password, attempt {attempt}", f"{code(got)} in {s:.3f} s")
                    w.close()
                await proxy.set_mode("pass")
                await asyncio.sleep(1.0)
    finally:
        await sink.stop()
        await proxy.stop()


async def upstream(folder: Path) -> None:
    hung = socket.create_server(("127.0.0.1", 0))        # accepts (the kernel's backlog), never greets
    hung.setblocking(False)
    sink = await Sink().start()
    try:
        upstreams = [{"host": "127.0.0.1", "port": hung.getsockname()[1]},        # default timeouts
                     {"host": "127.0.0.1", "port": sink.port}]
        async with Run(folder, sink, relay={"upstreams": upstreams}) as gw:
            times = []
            for _ in range(5):
                final, s = await timed(relay(gw.ports["plain"]))
                times.append(f"{s:.3f}")
                assert final[-1].startswith(b"250"), final
            row("first upstream never greets (default connect timeout): s per message", ", ".join(times))
    finally:
        hung.close()
        await sink.stop()


def _rss_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def http(folder: Path) -> None:
    async with Run(folder, None, http={"enabled": True, "port": 0, "admin_key": "figures-admin-key-0123456789"}) as gw:
        port = gw.http_port
        before = _rss_kib()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        status_line = asyncio.get_running_loop().create_task(reader.readuntil(b"\r\n"))   # read while we push
        writer.write(b"POST /api/v1/lists HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000000\r\n\r\n")
        chunk = b"[" * 65536
        sent = 0
        try:
            while sent < 100_000_000:          # until the server closes on us
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), 5)
                sent += len(chunk)
        except (ConnectionError, asyncio.TimeoutError):
            pass
        try:
            status = (await asyncio.wait_for(status_line, 10)).decode("ascii", "replace").strip()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
            status = f"no answer ({type(exc).__name__})"
        writer.close()
        row("unauthenticated 100 MB POST /api/v1/lists: answer, body bytes sent, RSS growth",
            f"{status}, {sent // 1024} KiB sent, {_rss_kib() - before} KiB")


async def auth(folder: Path) -> None:
    sink = await Sink().start()
    try:
        async with Run(folder, sink, auth={"scrypt_n": 2 ** 15, "insecure_test_scrypt": False,
                                            "max_failures_per_ip": 1000, "max_failures_per_account": 1000}) as gw:
            await gw.accounts.refresh()
            figures = {}
            for who, line in (("known", AUTH), ("unknown", plain("nobody", "s3cret"))):
                ms = []
                for _ in range(7):
                    r, w, _ = await raw_session(gw.ports["plain"])
                    await cmd(r, w, b"EHLO client.test")
                    _, s = await timed(cmd(r, w, line))
                    ms.append(s * 1000)
                    w.close()
                figures[who] = f"{min(ms):.0f}/{statistics.median(ms):.0f}/{max(ms):.0f}"
            row("AUTH at scrypt N=2^15, ms min/median/max: known / unknown account",
                f"{figures['known']} / {figures['unknown']}")
    finally:
        await sink.stop()


SCENARIOS: dict[str, Callable[[Path], Awaitable[None]]] = {
    "hostile": hostile, "aborts": aborts, "pg": pg, "redis": redis, "upstream": upstream, "http": http, "auth": auth,
}


async def main(names: list[str]) -> None:
    for name in names:
        print(f"{name}:", flush=True)
        with tempfile.TemporaryDirectory(prefix=f"figures-{name}-") as tmp:
            await asyncio.wait_for(SCENARIOS[name](Path(tmp)), 300)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="", help="comma-separated scenarios (default: all): " + ",".join(SCENARIOS))
    args = p.parse_args()
    chosen = [n for n in args.only.split(",") if n] or list(SCENARIOS)
    unknown = [n for n in chosen if n not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s): {', '.join(unknown)}")
    os.environ.setdefault("GATEWAY_BENCH", "1")
    uvloop.run(main(chosen))
