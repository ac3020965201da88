"""Cost of the bulk fingerprint (gateway/message/fingerprint.py) per message.

Messages built from real text of the shared corpora (SpamAssassin ham
nice/001, repeated to size), in the shapes that cost differently:

- ``plain``: text/plain, 8bit
- ``html``: text/html (the same text in <p> paragraphs, inline styles)
- ``base64``: text/plain, base64
- ``attach``: a 2 KiB text/plain part and a base64 application/pdf attachment
  making up the rest (the attachment is skipped: only boundaries are searched)

at 4, 8, 16, 32, 64 and 256 KiB and 1 MiB. Prints, per shape and
size, ms per message (min / median / max over --reps runs of --n messages
each; each run's figure is its mean), and the event-loop gaps while a 1 MiB
message is fingerprinted: fingerprint() inline, and fingerprint_async() in
slices on the loop, in a thread executor and in a process executor (the
longest gap in wall time and in the loop thread's CPU time, best of 3 runs).

    python3 bench/bench_fingerprint.py [--n 50] [--reps 5] [--json]
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.ham_refusals import default_corpora, to_wire  # noqa: E402
from gateway.message import fingerprint as fp  # noqa: E402

SIZES = (4 * 1024, 8 * 1024, 16 * 1024, 32 * 1024, 64 * 1024, 256 * 1024, 1024 * 1024)
HEAD = "From: a@example.com\r\nTo: b@example.org\r\nSubject: Ximian Evolution 0.10 is now available\r\nMIME-Version: 1.0\r\n"


def _text(corpora: Path, size: int) -> str:
    seed = fp.message_text(to_wire((corpora / "spamassassin-t-data/t/data/nice/001").read_bytes()))
    out = []
    n = 0
    while n < size:
        out.append(seed)
        n += len(seed)
    return "\n\n".join(out)[:size]


def build(corpora: Path, shape: str, size: int) -> bytes:
    if shape == "plain":
        body = _text(corpora, size - 200).encode()
        msg = (HEAD + "Content-Type: text/plain; charset=utf-8\r\n\r\n").encode() + body
    elif shape == "html":
        paras = _text(corpora, (size - 300) * 2 // 3).split("\n\n")
        html = "".join(f'<p style="margin:0 0 1em 0;font-family:Arial">{p}</p>\r\n' for p in paras)
        msg = (HEAD + "Content-Type: text/html; charset=utf-8\r\n\r\n<html><body>").encode() + html.encode()[:size]
    elif shape == "base64":
        body = base64.encodebytes(_text(corpora, (size - 250) * 3 // 4).encode())
        msg = (HEAD + "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n").encode() + body
    else:
        att = base64.encodebytes(bytes(range(256)) * ((size - 3000) * 3 // 4 // 256 + 1))[:size - 3000]
        msg = ((HEAD + 'Content-Type: multipart/mixed; boundary="bb"\r\n\r\n--bb\r\n'
                "Content-Type: text/plain; charset=utf-8\r\n\r\n" + _text(corpora, 2048)
                + "\r\n--bb\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n").encode()
               + att + b"\r\n--bb--\r\n")
    return msg.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def time_one(msg: bytes, n: int, reps: int) -> dict:
    fp.fingerprint(msg)  # warm
    runs = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(n):
            fp.fingerprint(msg)
        runs.append((time.perf_counter() - t) / n * 1000)
    return {"bytes": len(msg), "min_ms": round(min(runs), 3), "median_ms": round(statistics.median(runs), 3),
            "max_ms": round(max(runs), 3)}


async def _lag(msg: bytes, mode: str, executor: concurrent.futures.Executor | None = None) -> dict:
    """The gaps between the turns of a ticker (a task that only yields) while 20
    fingerprints of ``msg`` run: how long the loop could not run anything else.
    ``wall``: the longest gap in wall time (includes the machine's other work and
    GIL waits); ``cpu``: the longest in the loop thread's own CPU time (only the
    work the loop itself did in that turn)."""
    walls: list[float] = []
    cpus: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last, last_cpu = time.perf_counter(), time.thread_time()
        while not stop.is_set():
            await asyncio.sleep(0)
            now, now_cpu = time.perf_counter(), time.thread_time()
            walls.append(now - last)
            cpus.append(now_cpu - last_cpu)
            last, last_cpu = now, now_cpu

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    for _ in range(20):
        if mode == "inline":
            fp.fingerprint(msg)
            await asyncio.sleep(0)
        else:
            await fp.fingerprint_async(msg, executor)
    stop.set()
    await task
    return {"wall": max(walls) * 1000, "cpu": max(cpus) * 1000}


def _best(runs: list[dict]) -> dict:
    """Of several runs, the smallest "longest gap" (the others had the machine's noise in them)."""
    return {k: round(min(r[k] for r in runs), 2) for k in ("wall", "cpu")}


def loop_lag(msg: bytes, reps: int = 3) -> dict:
    out = {"inline fingerprint()": _best([asyncio.run(_lag(msg, "inline")) for _ in range(reps)]),
           "fingerprint_async, slices on the loop": _best([asyncio.run(_lag(msg, "slices")) for _ in range(reps)])}
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        out["fingerprint_async, thread executor"] = _best([asyncio.run(_lag(msg, "executor", ex))
                                                            for _ in range(reps)])
    with concurrent.futures.ProcessPoolExecutor(1) as ex:
        ex.submit(fp.fingerprint, b"warm").result()
        out["fingerprint_async, process executor"] = _best([asyncio.run(_lag(msg, "executor", ex))
                                                             for _ in range(reps)])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpora", type=Path, default=default_corpora())
    ap.add_argument("--n", type=int, default=50, help="messages per run")
    ap.add_argument("--reps", type=int, default=5, help="runs per shape and size")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    results: dict = {"params": {"max_text": fp.MAX_TEXT, "inline_limit": fp.INLINE_LIMIT, "n": args.n,
                                "reps": args.reps}, "cost": {}}
    for shape in ("plain", "html", "base64", "attach"):
        for size in SIZES:
            msg = build(args.corpora, shape, size)
            r = time_one(msg, max(3, args.n * 4096 // size) if size > 65536 else args.n, args.reps)
            results["cost"][f"{shape} {size // 1024} KiB"] = r
            if not args.json:
                print(f"{shape:7s} {size // 1024:5d} KiB ({r['bytes']:8d} bytes): "
                      f"min {r['min_ms']:7.3f}  median {r['median_ms']:7.3f}  max {r['max_ms']:7.3f} ms/message")
    results["loop_lag_ms_1MiB"] = {shape: loop_lag(build(args.corpora, shape, 1024 * 1024))
                                   for shape in ("plain", "html")}
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "bench_fingerprint.json").write_text(json.dumps(results, indent=2))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print("longest event-loop gap (a yielding ticker task) while 20 messages of 1 MiB are fingerprinted, "
              "best of 3 runs, wall time / the loop thread's CPU time:")
        for shape, modes in results["loop_lag_ms_1MiB"].items():
            for mode, g in modes.items():
                print(f"  {shape:6s} {mode:40s} {g['wall']:6.2f} ms / {g['cpu']:6.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
