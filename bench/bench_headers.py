"""Benchmark of the pure message-check functions (issue 5): no SMTP, no I/O in the loop.

1. messages/s through wire + header parse + structure + trace + subject rules on
   a mixed corpus of ~4 KiB messages built from ../shared/corpora;
2. time per MiB at 1, 5 and 25 MiB messages (must stay flat: linear cost).

Each figure is min / median / max over 3 repetitions.

    python3 bench/bench_headers.py [--corpora ../shared/corpora] [--seconds 1.0]
"""
from __future__ import annotations

import argparse
import base64
import os
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.message.parse import parse_headers  # noqa: E402
from gateway.message.rules import check_structure, check_subject, check_trace  # noqa: E402
from gateway.message.settings import HeaderSettings  # noqa: E402
from gateway.message.wire import check_wire  # noqa: E402

SETTINGS = HeaderSettings()
HOSTS = ("gw.example.net",)
NOW = 1_700_000_000.0
TARGET = 4096
FILLER = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\r\n"


def check_all(data: bytes) -> int:
    found = check_wire(data, body_8bit=True, smtputf8=True)
    parsed = parse_headers(data)
    found += check_structure(data, parsed, SETTINGS, NOW)
    found += check_trace(parsed, SETTINGS, HOSTS)
    found += check_subject(data, parsed, SETTINGS, {})
    return len(found)


def to_wire(raw: bytes) -> bytes:
    if raw.startswith(b"From "):
        raw = raw[raw.find(b"\n") + 1:]
    raw = re.sub(rb"\r?\n", b"\r\n", raw)
    return re.sub(rb"\r(?!\n)", b"\r\n", raw)


def corpus(root: Path) -> list[bytes]:
    dirs = [root / "spamassassin-t-data/t/data/nice", root / "spamassassin-t-data/t/data/spam",
            root / "spamassassin-t-data/t/data/dkim", root / "spamscope-mail-parser-mails"]
    out: list[bytes] = []
    for d in dirs:
        for p in sorted(d.rglob("*")):
            if not p.is_file() or p.suffix in (".txt",) and p.name.isupper() or p.name in ("LICENSE", "NOTICE"):
                continue
            data = to_wire(p.read_bytes())
            if len(data) < TARGET:  # pad to ~4 KiB with body text
                data += FILLER * ((TARGET - len(data)) // len(FILLER) + 1)
            elif len(data) > 2 * TARGET:  # cut long ones at a line end near 4 KiB
                cut = data.find(b"\r\n", TARGET)
                data = data[:cut + 2] if cut > 0 else data
            out.append(data)
    return out


def big_message(mib: int) -> bytes:
    head = (b"From: Alice <alice@example.com>\r\nTo: bob@example.org\r\n"
            b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\nSubject: big attachment\r\n"
            b"Message-ID: <big@example.com>\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/mixed; boundary="==b=="\r\n\r\n'
            b"--==b==\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
            b"--==b==\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n")
    raw = os.urandom(mib * 1024 * 1024 * 3 // 4)
    b64 = base64.encodebytes(raw).replace(b"\n", b"\r\n")
    return head + b64 + b"--==b==--\r\n"


def stats(xs: list[float]) -> str:
    return f"min {min(xs):,.1f}  median {statistics.median(xs):,.1f}  max {max(xs):,.1f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpora", default=str(Path(__file__).resolve().parents[2] / "shared" / "corpora"))
    ap.add_argument("--seconds", type=float, default=1.0, help="minimum duration of one repetition")
    args = ap.parse_args()
    msgs = corpus(Path(args.corpora))
    sizes = sorted(len(m) for m in msgs)
    print(f"mixed corpus: {len(msgs)} messages, median {statistics.median(sizes) / 1024:.1f} KiB, "
          f"{sum(sizes) / len(sizes) / 1024:.1f} KiB mean")
    for m in msgs:  # warm-up, and proof nothing raises
        check_all(m)
    rates, us = [], []
    for _ in range(3):
        n = 0
        t0 = time.perf_counter()
        while True:
            for m in msgs:
                check_all(m)
            n += len(msgs)
            el = time.perf_counter() - t0
            if el >= args.seconds:
                break
        rates.append(n / el)
        us.append(el / n * 1e6)
    print(f"messages/s through all header checks: {stats(rates)}")
    print(f"microseconds per message:             {stats(us)}")
    print()
    print("large messages (multipart, base64 attachment, 76-char lines):")
    for mib in (1, 5, 25):
        data = big_message(mib)
        size_mib = len(data) / (1024 * 1024)
        per = []
        for _ in range(3):
            t0 = time.perf_counter()
            check_all(data)
            per.append((time.perf_counter() - t0) * 1000 / size_mib)
        print(f"  {mib:>2} MiB ({size_mib:5.1f} MiB on the wire): ms per MiB {stats(per)}")


if __name__ == "__main__":
    main()
