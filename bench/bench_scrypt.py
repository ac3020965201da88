"""What one AUTH costs (issue 11, item 9): the scrypt verification of a password
at N = 2^14, 2^15, 2^16 and 2^17 (r=8, p=1, the gateway's parameters).

1. ms per verification, one at a time: min / median / max over ``--runs``;
2. ms per verification with ``--concurrency`` of them at once through the
   gateway's own path (``AccountStore``'s verification slots, default
   executor): what a burst of AUTHs waits for;
3. the memory one verification needs (128 * r * N bytes, what scrypt
   allocates), and that times the concurrent verifications.

    python3 bench/bench_scrypt.py [--runs 20] [--concurrency 6] [--ns 14,15,16,17]

The figures depend on the machine and on what else runs on it: the load
average before and after is printed with them.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.accounts.passwords import R, hash_password, verify_password, verify_password_async  # noqa: E402


def _mmm(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def _fmt(d: dict) -> str:
    return f"{d['min']:7.1f} / {d['median']:7.1f} / {d['max']:7.1f}"


def sequential(n: int, runs: int) -> list[float]:
    encoded = hash_password("correct horse battery staple", n=n)
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        verify_password(b"correct horse battery staple", encoded)
        out.append((time.perf_counter() - t0) * 1000)
    return out


async def concurrent(n: int, runs: int, concurrency: int, slots: int) -> list[float]:
    """Latency of each of ``concurrency`` verifications started at once, ``runs`` bursts,
    through ``slots`` verification slots (the gateway's cap)."""
    encoded = hash_password("pw", n=n)
    sem = asyncio.Semaphore(slots)
    out: list[float] = []

    async def one() -> None:
        t0 = time.perf_counter()
        async with sem:
            await verify_password_async(b"pw", encoded)
        out.append((time.perf_counter() - t0) * 1000)

    for _ in range(max(1, runs // concurrency)):
        await asyncio.gather(*(one() for _ in range(concurrency)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--concurrency", type=int, default=6, help="verifications started at once (a burst of AUTHs)")
    ap.add_argument("--slots", type=int, default=2, help="verification slots (auth.max_concurrent_verifications)")
    ap.add_argument("--ns", default="14,15,16,17", help="log2 of N, comma-separated")
    args = ap.parse_args()
    results = {"cpus": os.cpu_count(), "load_before": os.getloadavg(), "runs": args.runs,
               "concurrency": args.concurrency, "slots": args.slots, "r": R, "n": {}}
    print(f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}; ms min / median / max")
    print(f"{'N':>8} {'MiB/verify':>10} {'one at a time':>27} {f'{args.concurrency} at once, {args.slots} slots':>27}"
          f" {'MiB peak':>9}")
    for log2 in (int(x) for x in args.ns.split(",")):
        n = 2 ** log2
        seq = sequential(n, args.runs)
        conc = asyncio.run(concurrent(n, args.runs, args.concurrency, args.slots))
        mib = 128 * R * n / 2 ** 20
        results["n"][n] = {"sequential_ms": _mmm(seq), "concurrent_ms": _mmm(conc), "mib_per_verify": mib,
                           "mib_peak": mib * min(args.slots, args.concurrency)}
        print(f"{'2^' + str(log2):>8} {mib:10.0f} {_fmt(_mmm(seq)):>27} {_fmt(_mmm(conc)):>27} "
              f"{mib * min(args.slots, args.concurrency):9.0f}")
    results["load_after"] = os.getloadavg()
    print(f"load average after {os.getloadavg()[0]:.2f}")
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / f"scrypt-{int(time.time())}.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
