"""Rate limiter benchmark (issue 12): acquires/s of the GCRA limiter
(gateway/state/ratelimit.py) in memory and in Redis.

    python3 bench/bench_ratelimit.py [--acquires 20000] [--keys 1000] [--concurrency 1,50] [--reps 5]
                                     [--redis redis://127.0.0.1:6379/0] [--no-uvloop]

memory: the in-process limiter, sequential (nothing in it awaits).
redis: the Redis limiter on its own RedisCounters (one client), at each
concurrency: that many tasks share the acquires, so 1 is the round-trip
bound and 50 shows what one gateway's client gets with many sessions.
Keys are visited round-robin with Rate(10, 1) (about half the acquires
are refused once the keys are warm: a refusal costs the same round trip).
The baseline is the fixed-window counters' incr (INCRBY + EXPIRE in one
pipelined round trip) on the same client and keys: what a Redis round
trip of the gateway costs without the script. Keys live under a random prefix and are deleted after. Prints each
repetition and min/median/max; writes JSON into bench/results/.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from gateway.state.counters import RedisCounters  # noqa: E402
from gateway.state.ratelimit import MemoryLimiter, Rate, RedisLimiter  # noqa: E402

RATE = Rate(10, 1)


async def memory_pass(acquires: int, keys: list[str]) -> float:
    lim = MemoryLimiter()
    acquire = lim.acquire
    n = len(keys)
    start = time.perf_counter()
    for i in range(acquires):
        await acquire(keys[i % n], RATE)
    return acquires / (time.perf_counter() - start)


async def redis_pass(lim: RedisLimiter, acquires: int, keys: list[str], concurrency: int) -> float:
    n = len(keys)
    per = acquires // concurrency

    async def worker(w: int) -> None:
        for i in range(per):
            await lim.acquire(keys[(w * per + i) % n], RATE)
    start = time.perf_counter()
    await asyncio.gather(*[worker(w) for w in range(concurrency)])
    return per * concurrency / (time.perf_counter() - start)


async def counters_pass(counters: RedisCounters, acquires: int, keys: list[str], concurrency: int) -> float:
    """The baseline: the fixed-window counters' INCRBY + EXPIRE (one pipelined round trip)."""
    n = len(keys)
    per = acquires // concurrency

    async def worker(w: int) -> None:
        for i in range(per):
            await counters.incr(keys[(w * per + i) % n], 60)
    start = time.perf_counter()
    await asyncio.gather(*[worker(w) for w in range(concurrency)])
    return per * concurrency / (time.perf_counter() - start)


def mmm(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


async def main(args) -> None:
    keys = [f"acct:{i}:rcpt" for i in range(args.keys)]
    results: dict = {"cpus": os.cpu_count(), "load_before": os.getloadavg(), "acquires": args.acquires,
                     "keys": args.keys, "rate": str(RATE), "runs": {}}
    mem = []
    for rep in range(args.reps):
        rate = await memory_pass(args.acquires, keys)
        mem.append(rate)
        print(f"memory       rep {rep + 1}: {rate:12,.0f} acquires/s")
    results["runs"]["memory"] = mmm(mem)
    if args.redis:
        prefix = f"gwbench:{secrets.token_hex(4)}:"
        counters = RedisCounters(args.redis, prefix, timeout=5)
        lim = RedisLimiter(counters)
        try:
            await lim.acquire("warm-up", RATE)
            for conc in args.concurrency:
                got = []
                for rep in range(args.reps):
                    rate = await redis_pass(lim, args.acquires, keys, conc)
                    got.append(rate)
                    print(f"redis c={conc:<3}  rep {rep + 1}: {rate:12,.0f} acquires/s")
                results["runs"][f"redis_c{conc}"] = mmm(got)
                base = []
                for rep in range(args.reps):
                    rate = await counters_pass(counters, args.acquires, keys, conc)
                    base.append(rate)
                    print(f"incr  c={conc:<3}  rep {rep + 1}: {rate:12,.0f} incr/s (counters, baseline)")
                results["runs"][f"counters_incr_c{conc}"] = mmm(base)
            if counters.fallback:
                print("warning: Redis fell back during the run; the figures are not Redis'")
            results["fallbacks"] = counters.fallbacks
        finally:
            async for k in counters.client.scan_iter(match=f"{prefix}*", count=1000):
                await counters.client.delete(k)
            await counters.close()
    results["load_after"] = os.getloadavg()
    print()
    for name, v in results["runs"].items():
        print(f"{name:18} min {v['min']:12,.0f}  median {v['median']:12,.0f}  max {v['max']:12,.0f} acquires/s")
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / f"ratelimit-{int(time.time())}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--acquires", type=int, default=20_000)
    p.add_argument("--keys", type=int, default=1000)
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 50])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="'' to skip Redis")
    p.add_argument("--no-uvloop", action="store_true")
    a = p.parse_args()
    if not a.no_uvloop:
        import uvloop
        uvloop.install()
    asyncio.run(main(a))
