"""Resolver benchmark: 100,000 lookups over 1,000 names against the loopback test DNS server.

    python3 bench/bench_resolver.py [--lookups 100000] [--names 1000] [--reps 3] [--no-uvloop]

Cold: a fresh resolver (empty cache, new c-ares channel), so the first lookup
of each name goes to the server. Warm: the same lookups again on the filled
cache. Lookups are sequential so each one's latency can be timed; the names
are visited round-robin. Prints per repetition and min/median/max.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from dns_server import TestDnsServer  # noqa: E402
from gateway.dns.resolver import Resolver  # noqa: E402
from gateway.dns.settings import ResolverSettings  # noqa: E402


def pct(sorted_values: list[float], p: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(p * len(sorted_values)))]


async def run_pass(resolver: Resolver, names: list[str], lookups: int) -> dict[str, float]:
    lat: list[float] = []
    hits0 = resolver.stats.cache_hits
    clock = time.perf_counter
    query = resolver.query
    n = len(names)
    started = clock()
    for i in range(lookups):
        t = clock()
        await query(names[i % n], "A")
        lat.append(clock() - t)
    total = clock() - started
    lat.sort()
    return {"rate": lookups / total, "hit": (resolver.stats.cache_hits - hits0) / lookups,
            "p50": pct(lat, 0.50) * 1e6, "p99": pct(lat, 0.99) * 1e6}


async def main(args) -> None:
    srv = TestDnsServer().start()
    srv.add_zone("bench.test")
    names = [f"h{i}.bench.test" for i in range(args.names)]
    for i, name in enumerate(names):
        srv.set(name, "A", [f"198.51.{i // 250}.{i % 250 + 1}"], ttl=3600)
    results: dict[str, list[dict[str, float]]] = {"cold": [], "warm": []}
    try:
        for rep in range(args.reps):
            r = Resolver(ResolverSettings(nameservers=[srv.address], cache_size=10_000))
            try:
                for phase in ("cold", "warm"):
                    res = await run_pass(r, names, args.lookups)
                    results[phase].append(res)
                    print(f"rep {rep + 1} {phase}: {res['rate']:>10,.0f} lookups/s  hit rate {res['hit']:.3f}  "
                          f"p50 {res['p50']:.2f} us  p99 {res['p99']:.2f} us")
            finally:
                await r.close()
    finally:
        srv.stop()
    print(f"\n{args.lookups:,} lookups over {args.names:,} names, {args.reps} repetitions "
          f"(loop: {type(asyncio.get_running_loop()).__module__})")
    for phase, runs in results.items():
        for key, unit in (("rate", "lookups/s"), ("hit", "hit rate"), ("p50", "us p50"), ("p99", "us p99")):
            vals = [r[key] for r in runs]
            print(f"{phase:5} {unit:>10}: min {min(vals):>12,.3f}  median {statistics.median(vals):>12,.3f}  "
                  f"max {max(vals):>12,.3f}")
    warm_p50 = statistics.median(r["p50"] for r in results["warm"])
    print(f"\ncached lookup median latency {warm_p50:.2f} us (target < 20 us): "
          f"{'OK' if warm_p50 < 20 else 'MISSED'}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--lookups", type=int, default=100_000)
    ap.add_argument("--names", type=int, default=1_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-uvloop", action="store_true")
    a = ap.parse_args()
    if a.no_uvloop:
        asyncio.run(main(a))
    else:
        import uvloop
        uvloop.run(main(a))
