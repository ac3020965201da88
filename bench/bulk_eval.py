"""Precision and recall of the bulk and repeat detectors (checks/data_bulk.py),
and how much real ham they would refuse.

Runs the check itself (its contract's build, the memory distinct counter,
enforce mode, the default ``[bulk]``: 50 recipients in 1 hour, refused past
100), one account, one transaction per message:

- **bulk**: for each seed of bench/fingerprint_eval.py, BULK near-identical
  copies (its generator: personalized names, tracking links, reordered
  paragraphs, several MIME forms) to BULK different recipients: how many pass
  before the check catches them (ideal: the threshold), how many are deferred,
  how many refused;
- **genuine**: GENUINE different genuine corpus messages (the sample of
  fingerprint_eval.py), each to its own recipient: how many are caught;
- **ham**: every ham message of bench/ham_refusals.py sent once, each to its
  own recipient; then all of them again to one recipient (what a customer's
  own test mail or a notification stream does: the corpus's legitimately
  repeated messages, e.g. 21 copies of one DKIM test mail, become repeats).

    python3 bench/bulk_eval.py [--corpora DIR] [--seed N] [--json]
    python3 bench/bulk_eval.py --cost      # ms per message of the check, memory and Redis
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fingerprint_eval import GENUINE, SEEDS, _seed_content, bulk_copy, genuine_messages  # noqa: E402
from bench.ham_refusals import default_corpora, ham_messages, to_wire  # noqa: E402
from gateway.accounts.model import Account, AccountStatus  # noqa: E402
from gateway.checks import data_bulk  # noqa: E402
from gateway.config import BulkSettings, CheckSettings, Config, DevSettings, SmtpSettings  # noqa: E402
from gateway.core.address import parse_mailbox  # noqa: E402
from gateway.core.transaction import Recipient, SessionInfo, Transaction  # noqa: E402
from gateway.services import Services  # noqa: E402
from gateway.state.distinct import MemoryDistinct  # noqa: E402

BULK = 200
ACCOUNT = Account(1, "alice", AccountStatus.ACTIVE)


def bulk_copies(corpora: Path, seed_name: str, n: int = BULK, seed: int = 1) -> list[bytes]:
    """``n`` near-identical copies of one real message, as a bulk sender makes them."""
    rng = random.Random(seed)
    subject, paras = _seed_content(to_wire((corpora / seed_name).read_bytes()))
    return [bulk_copy(rng, subject, paras, i, "news.example.com") for i in range(n)]


def genuine_sample(corpora: Path, seed: int = 1, n: int = GENUINE) -> list[tuple[str, bytes]]:
    genuine = genuine_messages(corpora, set(SEEDS))
    return sorted(random.Random(seed).sample(genuine, n)) if len(genuine) > n else genuine


def make_check(settings: BulkSettings | None = None):
    cfg = Config(dev=DevSettings(enabled=True), smtp=SmtpSettings(hostname="gw.example.net"),
                 bulk=settings or BulkSettings(), checks=CheckSettings(modes={"data_bulk": "enforce"}))
    svc = Services(config=cfg, accounts=None, counters=None, connections=None, clock=lambda: 1_000_000.0)
    svc.distinct = MemoryDistinct(svc.clock)
    return data_bulk.build(svc)


async def send(check, data: bytes, rcpt: str):
    tx = Transaction(SessionInfo("s", "submission", "192.0.2.1", 1, account=ACCOUNT, auth_method="smtp-auth"))
    tx.message = data
    tx.recipients = [Recipient(parse_mailbox(rcpt, False), {})]
    out = await check.run(tx)
    return out.reply.code if out.reply is not None else 250, out


def _tally(codes: list[int]) -> dict:
    return {"passed": codes.count(250), "deferred": codes.count(451), "refused": codes.count(550)}


async def measure(corpora: Path, seed: int = 1) -> dict:
    settings = BulkSettings()
    result: dict = {"settings": {"window": settings.window, "recipients_threshold": settings.recipients_threshold,
                                 "refuse_at": settings.refuse_at}, "bulk": {}, "seed": seed}
    caught = 0
    for name in SEEDS:
        check = make_check()
        codes = [(await send(check, d, f"user{i}@example.org"))[0] for i, d in enumerate(bulk_copies(corpora, name,
                                                                                                    seed=seed))]
        first = next((i for i, c in enumerate(codes) if c != 250), len(codes))
        t = _tally(codes)
        result["bulk"][name] = {**t, "passed_before_caught": first}
        caught += t["deferred"] + t["refused"]
    check = make_check()
    gen = genuine_sample(corpora, seed)
    g_codes = []
    g_files = []
    for i, (name, d) in enumerate(gen):
        code, out = await send(check, d, f"person{i}@example.net")
        g_codes.append(code)
        if code != 250:
            g_files.append(f"{name}: {code} {out.detail}")
    result["genuine"] = {"messages": len(gen), **_tally(g_codes), "caught": g_files}
    total_bulk = BULK * len(SEEDS)
    catchable = total_bulk - len(SEEDS) * settings.recipients_threshold
    false = len(g_files)
    result["recall"] = caught / total_bulk
    result["recall_past_threshold"] = caught / catchable
    result["precision"] = caught / (caught + false) if caught + false else 1.0
    # ham: once each, then all again to one recipient
    ham = ham_messages(corpora)
    check = make_check()
    once = [(n, *(await send(check, d, f"ham{i}@example.net"))) for i, (_, n, d) in enumerate(ham)]
    check = make_check()
    one = [(n, *(await send(check, d, "same.person@example.net"))) for _, n, d in ham]
    result["ham"] = {
        "messages": len(ham),
        "once": {**_tally([c for _, c, _ in once]), "files": [f"{n}: {c} {o.detail}" for n, c, o in once if c != 250]},
        "to_one_recipient": {**_tally([c for _, c, _ in one]),
                             "files": [f"{n}: {c}" for n, c, _ in one if c != 250]},
    }
    return result


async def cost(corpora: Path, n: int = 400) -> dict:
    """ms per message of the check (fingerprint + counting, 1 recipient, a 3 KiB copy): memory, and
    Redis at 127.0.0.1:6379 when it answers (a random key prefix, deleted after)."""
    import secrets
    import time as _time

    from gateway.state.counters import RedisCounters
    from gateway.state.distinct import RedisDistinct

    copies = bulk_copies(corpora, SEEDS[0], n=n)
    out: dict = {"bytes": sum(map(len, copies)) // n}
    backends: list[tuple[str, object]] = [("memory", None)]
    counters = None
    try:
        prefix = f"bench-bulk-{secrets.token_hex(4)}:"
        counters = RedisCounters("redis://127.0.0.1:6379/0", prefix, timeout=1.0)
        await counters.ping()
        backends.append(("redis", counters))
    except Exception:
        counters = None
    for name, c in backends:
        check = make_check()                  # the default [bulk]: each sub-window capped at 116
        if c is not None:
            check.distinct = RedisDistinct(c)
        t0 = _time.perf_counter()
        for i, d in enumerate(copies):
            await send(check, d, f"user{i}@example.org")
        out[name] = (_time.perf_counter() - t0) * 1000 / n
    if counters is not None:
        keys = [k async for k in counters.client.scan_iter(match=counters.prefix + "*")]
        if keys:
            await counters.client.delete(*keys)
        await counters.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpora", type=Path, default=default_corpora())
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--cost", action="store_true", help="only the check's cost per message (memory, Redis)")
    args = ap.parse_args(argv)
    if not args.corpora.is_dir():
        print(f"bulk_eval: corpora directory {args.corpora} not found (use --corpora)", file=sys.stderr)
        return 2
    if args.cost:
        c = asyncio.run(cost(args.corpora))
        print(f"data_bulk per message ({c['bytes']} bytes, 1 recipient, 22 keys: 21 bands + the Message-ID): "
              + ", ".join(f"{k} {v:.3f} ms" for k, v in c.items() if k != "bytes"))
        return 0
    r = asyncio.run(measure(args.corpora, args.seed))
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    s = r["settings"]
    print(f"[bulk] {s['recipients_threshold']} recipients per {s['window']:g} s, refused past {s['refuse_at']}; "
          f"seed {r['seed']}")
    for name, b in r["bulk"].items():
        print(f"  bulk {name}: {BULK} copies to {BULK} recipients: passed {b['passed']} (caught from copy "
              f"{b['passed_before_caught'] + 1}), deferred {b['deferred']}, refused {b['refused']}")
    g = r["genuine"]
    print(f"  genuine: {g['messages']} different messages, one recipient each: passed {g['passed']}, "
          f"deferred {g['deferred']}, refused {g['refused']}")
    for f in g["caught"]:
        print(f"    {f}")
    print(f"recall {r['recall']:.4f} of all copies, {r['recall_past_threshold']:.4f} of the copies past the "
          f"threshold; precision {r['precision']:.4f}")
    h = r["ham"]
    print(f"ham: {h['messages']} messages once each: deferred {h['once']['deferred']}, refused {h['once']['refused']}")
    for f in h["once"]["files"]:
        print(f"    {f}")
    o = h["to_one_recipient"]
    print(f"ham: the same {h['messages']} to one recipient: deferred {o['deferred']}, refused {o['refused']}")
    for f in o["files"]:
        print(f"    {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
