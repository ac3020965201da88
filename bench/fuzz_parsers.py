"""Mutation fuzzer for the gateway's pure parsers (issue 11).

Seeds are real-world material from ``shared/corpora`` (SpamAssassin ham and
spam, the mail-parser malformed mails, the is_email and email-validator
address vectors, the Received and Date vectors) plus the hostile fragments
an attacker sends (NUL, bare CR/LF, 8-bit bytes, encoded-words with odd
charsets, deep nesting, very long runs). Each iteration takes a seed,
applies a few random mutations (flip, insert, delete, splice, repeat,
truncate) and feeds the result to every parser of its kind. A parser may
only fail with its documented error (``AddressError``, ``HeaderSyntaxError``,
``EncodedWordError``, ``ValueError`` for a date); anything else is a crash.

Deterministic: the same seed and count give the same inputs. The test suite
runs a bounded count (tests/test_fuzz_parsers.py); for a long run::

    python bench/fuzz_parsers.py --iterations 200000 --seed 1

prints the figures (inputs per target, crashes, time) and exits non-zero on
a crash, with the input that crashed written beside the report.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.core.address import AddressError, parse_domain, parse_params, parse_path  # noqa: E402
from gateway.message import rules  # noqa: E402
from gateway.message.parse import (  # noqa: E402
    EncodedWordError, HeaderSyntaxError, address_count, check_mime, date_timestamp, decode_lenient,
    decode_words, parse_address_list, parse_content_type, parse_date, parse_headers, parse_received,
    valid_message_id,
)
from gateway.message.settings import HeaderSettings  # noqa: E402
from gateway.message.wire import check_wire, header_end, long_line  # noqa: E402

HOSTILE: tuple[bytes, ...] = (
    b"\x00", b"\r", b"\n", b"\r\n", b"\r\n.\r\n", b"\n.\n", b"\r.\r", b"\xff", b"\xc3\x28", b"\xe2\x80\xae",
    b"\xf0\x9f\x92\xa9", b"=?", b"?=", b"=?utf-8?B?", b"=?\xff?Q?x?=", b"=?x\x00y?B?QQ==?=",
    b"=?utf-8*en?Q?=C3=A9?=", b"=?iso-2022-jp?B?GyRCJDMkcyRLJEEkTxsoQg==?=", b"=?utf-7?Q?+AGEAYgBj-?=",
    b"=?unknown-charset?B?AAAA?=", b"=?base64?B?QQ==?=", b"=?rot13?Q?nop?=", b"=?zlib?B?eJwDAAAAAAE=?=",
    b"=?undefined?Q?x?=", b"=?idna?Q?xn--=FF?=", b"=?utf-16?B?2D0=?=", b"=?unicode-escape?Q?=5Cx?=", b"(", b")", b"((((((((((", b"<", b">", b"<<<<<<", b"\"", b"\\", b"@", b"@@",
    b":", b";", b",", b"[", b"]", b"[IPv6:::1]", b"[IPv6:", b"%", b"!", b"..", b"--", b"xn--", b"xn--zz",
    b"\t", b" ", b"From: ", b"\r\nFrom: a@b\r\n", b"Content-Type: multipart/mixed; boundary=\"b\"\r\n",
    b"--b\r\n", b"--b--\r\n", b"Content-Transfer-Encoding: base64\r\n", b"charset*0*=utf-8''%e2",
    b"Received: from x by y; ", b"Date: ", b"Mon, 31 Sep 2026 25:61:61 +9999", b"SIZE=", b"BODY=8BITMIME",
    b"SMTPUTF8", b"=" * 3, b"A" * 1000, b"a." * 130, b"\xe0\xb8\x81" * 40,
)


def _corpora() -> Path:
    here = Path(__file__).resolve()
    for p in here.parents:
        if (p / "shared" / "corpora").is_dir():
            return p / "shared" / "corpora"
    return here.parents[2] / "shared" / "corpora"


def _clip(b: bytes, n: int = 8192) -> bytes:
    return b[:n]


def load_seeds(corpora: Path | None = None) -> dict[str, list[bytes]]:
    """The seed inputs per kind: ``message`` (whole messages), ``address``
    (envelope paths), ``line`` (header values: Received, Date, addresses)."""
    c = corpora or _corpora()
    messages: list[bytes] = []
    for folder in ("spamassassin-t-data/t/data/nice", "spamassassin-t-data/t/data/spam",
                   "spamscope-mail-parser-mails"):
        d = c / folder
        if d.is_dir():
            for f in sorted(d.rglob("*")):
                if f.is_file() and f.suffix not in (".txt", ".md", ".json") and f.name not in ("LICENSE", "NOTICE"):
                    messages.append(_clip(f.read_bytes(), 16384))
    addresses: list[bytes] = [b"<a@example.org>", b"<>", b"<\"q\\\"x\"@[IPv6:::1]>", b"<@r.example:a@b.example>",
                              "<ü@bücher.example> SMTPUTF8".encode()]
    iq = c / "isemail" / "tests.xml"
    if iq.is_file():
        import re
        for m in re.finditer(rb"<address>(.*?)</address>", iq.read_bytes(), re.S):
            raw = m.group(1).decode("utf-8", "replace")
            raw = "".join(chr(ord(ch) - 0x2400) if 0x2400 <= ord(ch) <= 0x241F else ch for ch in raw)
            raw = raw.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&").replace("&quot;", '"')
            addresses.append(b"<" + raw.encode("utf-8", "surrogatepass") + b">")
    lines: list[bytes] = []
    for name in ("rcvd_parser_vectors.json", "date_vectors.json"):
        f = c / "spamassassin-t-data" / name
        if f.is_file():
            data = json.loads(f.read_text("utf-8"))
            for item in data if isinstance(data, list) else data.get("vectors", data.get("cases", [])):
                if isinstance(item, dict):
                    for key in ("received", "header", "input", "date", "value", "raw"):
                        if isinstance(item.get(key), str):
                            lines.append(item[key].encode("utf-8", "surrogateescape"))
                elif isinstance(item, str):
                    lines.append(item.encode("utf-8", "surrogateescape"))
    lines += [b"Alice <a@example.org>, \"Bob, Jr.\" <b@example.org>", b"undisclosed-recipients:;",
              b"=?utf-8?B?w6k=?= <x@y.example>", b"multipart/alternative; boundary=\"=_x\"; charset*=utf-8''a%20b",
              b"Mon, 07 Dec 2026 10:00:00 +0100", b"<id@host.example>",
              b"from mx.example ([192.0.2.1]) by relay.example with ESMTPS id x; Mon, 7 Dec 2026 10:00:00 +0000"]
    return {"message": messages or [b"From: a@b\r\n\r\nbody\r\n"], "address": addresses, "line": lines}


def mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(8)
        pos = rng.randint(0, len(b))
        if op == 0 and b:                                    # flip a byte
            b[min(pos, len(b) - 1)] = rng.randrange(256)
        elif op in (1, 2):                                   # insert a hostile token
            b[pos:pos] = rng.choice(HOSTILE)
        elif op == 3 and b:                                  # delete a run
            del b[pos:pos + rng.randint(1, 64)]
        elif op == 4 and pool:                               # splice another seed
            other = rng.choice(pool)
            if other:
                s = rng.randrange(len(other))
                b[pos:pos] = other[s:s + rng.randint(1, 256)]
        elif op == 5 and b:                                  # repeat a slice (deep nesting, long lines)
            s = rng.randrange(len(b))
            piece = bytes(b[s:s + rng.randint(1, 8)])
            b[pos:pos] = piece * rng.randint(2, 400)
        elif op == 6:                                        # truncate
            del b[pos:]
        else:                                                # swap CRLF style
            b = bytearray(bytes(b).replace(b"\r\n", rng.choice((b"\n", b"\r", b"\r\r\n", b"\r\n"))))
    return bytes(b[:65536])


def _text(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


@dataclass
class Target:
    name: str
    kind: str                                   # which seeds feed it
    run: Callable[[bytes], Any]
    allowed: tuple[type[BaseException], ...] = ()
    inputs: int = 0


def _path(b: bytes, utf8: bool, allow_null: bool) -> None:
    arg = _text(b)
    parse_path(arg, utf8=utf8, allow_null=allow_null)


def _params(b: bytes) -> None:
    t = _text(b)
    parse_params(t.partition(">")[2] or t)


def _domain(b: bytes) -> None:
    t = _text(b).strip("<>")
    parse_domain(t.rpartition("@")[2], utf8=True)


_SETTINGS = HeaderSettings()


def _message(b: bytes) -> None:
    header_end(b)
    long_line(b)
    check_wire(b, body_8bit=True, smtputf8=True)
    check_wire(b, body_8bit=False, smtputf8=False)
    parsed = parse_headers(b)
    rules.check_structure(b, parsed, _SETTINGS, time.time())
    rules.check_trace(parsed, _SETTINGS, ["gateway.example"])
    check_mime(b, parsed)
    rules.quotes_earlier_message(b, parsed)
    for _, value in parsed.fields[:40]:
        decode_lenient(value)


def _date(b: bytes) -> None:
    t = _text(b)
    try:
        parse_date(t)
    finally:
        date_timestamp(t)


TARGETS: list[Target] = [
    Target("parse_path(utf8, null ok)", "address", lambda b: _path(b, True, True), (AddressError,)),
    Target("parse_path(ascii, no null)", "address", lambda b: _path(b, False, False), (AddressError,)),
    Target("parse_params", "address", _params, (AddressError,)),
    Target("parse_domain", "address", _domain, (AddressError,)),
    Target("message (wire, headers, structure, trace, mime)", "message", _message),
    Target("parse_address_list", "line", lambda b: parse_address_list(_text(b)), (HeaderSyntaxError,)),
    Target("address_count", "line", lambda b: address_count(_text(b), True)),
    Target("decode_words", "line", lambda b: decode_words(_text(b)), (EncodedWordError,)),
    Target("parse_content_type", "line", lambda b: parse_content_type(_text(b))),
    Target("parse_date / date_timestamp", "line", _date, (ValueError,)),
    Target("parse_received", "line", lambda b: parse_received(_text(b))),
    Target("valid_message_id", "line", lambda b: valid_message_id(_text(b))),
]


@dataclass
class Report:
    iterations: int
    seed: int
    seconds: float = 0.0
    crashes: list[dict] = field(default_factory=list)
    per_target: dict[str, int] = field(default_factory=dict)


def run(iterations: int, seed: int, *, corpora: Path | None = None, max_crashes: int = 20) -> Report:
    """Fuzz every target ``iterations`` times in total (spread over the kinds)."""
    seeds = load_seeds(corpora)
    rng = random.Random(seed)
    report = Report(iterations, seed)
    kinds = sorted(seeds)
    pool = [s for k in kinds for s in seeds[k]]
    start = time.perf_counter()
    for i in range(iterations):
        kind = kinds[i % len(kinds)]
        data = mutate(rng, rng.choice(seeds[kind]), pool)
        for t in TARGETS:
            if t.kind != kind:
                continue
            t.inputs += 1
            try:
                t.run(data)
            except t.allowed:
                pass
            except RecursionError as exc:   # a crash too, but keep going
                report.crashes.append({"target": t.name, "error": repr(exc)[:200], "input": data.hex()})
            except Exception as exc:
                report.crashes.append({"target": t.name, "error": f"{type(exc).__name__}: {exc}"[:300],
                                       "where": traceback.format_exc(limit=-2)[-600:], "input": data.hex()})
            if len(report.crashes) >= max_crashes:
                break
        if len(report.crashes) >= max_crashes:
            break
    report.seconds = time.perf_counter() - start
    report.per_target = {t.name: t.inputs for t in TARGETS}
    for t in TARGETS:
        t.inputs = 0
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=100_000, help="inputs in total (default 100000)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument("--out", type=Path, default=Path("bench/results/fuzz-crashes.json"),
                   help="where crashing inputs are written (default bench/results/fuzz-crashes.json)")
    args = p.parse_args(argv)
    report = run(args.iterations, args.seed)
    print(f"{args.iterations} inputs, seed {args.seed}, {report.seconds:.1f} s, "
          f"{len(report.crashes)} crashes")
    for name, n in report.per_target.items():
        print(f"  {n:8d}  {name}")
    if report.crashes:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report.crashes, indent=1))
        for c in report.crashes[:5]:
            print(f"CRASH {c['target']}: {c['error']}")
        print(f"inputs written to {args.out}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
