"""Fuzz test of the gateway's SMTP command loop (issue 11).

Random sessions, each built from a fixed seed, drive a real gateway over
loopback sockets: sequences of real verbs (EHLO, HELO, MAIL, RCPT, DATA,
RSET, NOOP, QUIT, AUTH PLAIN / LOGIN, STARTTLS, VRFY, EXPN, HELP, BDAT and
unknown ones) with valid and mutated arguments: NUL, bare CR, bare LF, 8-bit
and non-UTF-8 bytes, lines over 1000 octets and over 64 KiB, base64 garbage
and non-ASCII base64, huge parameter lists, SIZE= huge / negative, source
routes, quoted locals, IP literals, UTF-8 addresses with and without
SMTPUTF8, PROXY lines in the middle of a session, pipelined batches, reads
cut into small pieces, DATA bodies with bare CR / LF and dot-stuffing edge
cases, bodies over the size limit, abrupt disconnects (FIN or RST) mid-line
and mid-DATA. The addresses of shared/corpora (is_email, email-validator),
Haraka's From vectors and the SpamAssassin / mail-parser messages are seeds.

The client models the server's framing: a command is one line up to LF (any
length: an over-long line is one command and gets one reply), after a 354
the message runs to CRLF.CRLF, after 220 to STARTTLS what was pipelined is
dropped. So it knows how many replies it is owed at any moment and checks,
on every reply:

- well-formed: 3-digit code, '-' or ' ', one code per reply, ASCII, CRLF,
  at most 512 octets a line; an RFC 3463 enhanced code of the same class on
  every reply but 220 / 334 / 354 and the EHLO lines;
- never ``451 4.3.0 Temporary internal error`` (our own bug);
- exactly one reply per command (a session that ends with QUIT is counted
  to EOF: no reply missing, none extra);
- the gateway closes only after 221 or 421 (else it is the client that closed);
- no record of the ``gateway`` loggers with a traceback or "unexpected
  error", no ERROR of the ``asyncio`` logger (an exception nobody retrieved);
- a message reaches the sink only from a transaction whose DATA got 250
  (each DATA body carries a token), exactly once, and every 250 one did;
- after the run, a normal session (EHLO, AUTH, MAIL, RCPT, DATA, QUIT)
  still relays.

Deterministic inputs: session i draws from ``Random(f"{seed}/{i}")``
whatever ran before it (replies may differ with concurrency, inputs do not).
tests/test_fuzz_smtp.py runs a bounded count; a longer run::

    python3 bench/fuzz_smtp.py --sessions 5000 --seed 7

starts a gateway in process (as tests/conftest.py's gateway_factory does:
SQLite, a plain listener and a STARTTLS one, an in-process sink), prints the
figures and exits non-zero on a violation, the violations written to
bench/results/fuzz-smtp-violations.json. ``--only N`` replays session N.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import json
import logging
import random
import re
import socket
import ssl
import struct
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.fuzz_parsers import HOSTILE, _corpora, load_seeds, mutate  # noqa: E402

REPLY_TIMEOUT = 10.0              # per reply line; the gateway answers in ms
LOGIN, PASSWORD = b"alice", b"s3cret"     # tests/conftest.py GatewayHandle.add_account
SENDER, RECIPIENT = b"alice@example.com", b"bob@example.org"
TOKEN = re.compile(rb"fz\d+x\d+x\d+q")
INTERNAL_ERROR = b"451 4.3.0 Temporary internal error"
_REPLY_LINE = re.compile(rb"(\d{3})([ -])([^\x00-\x1f\x7f]*)\r\n\Z")
_ENHANCED = re.compile(rb"([245])\.\d{1,3}\.\d{1,3}( |\Z)")
_NO_ENHANCED = (220, 334, 354)


# ----------------------------------------------------------------- seeds
@dataclass
class Seeds:
    addresses: list[bytes]          # "<...>" paths, from the corpora
    from_headers: list[bytes]       # header From values (Haraka's vectors)
    messages: list[bytes]           # whole messages (SpamAssassin, mail-parser)


def load(corpora: Path | None = None) -> Seeds:
    c = corpora or _corpora()
    parsers = load_seeds(c)
    addresses = list(parsers["address"])
    ev = c / "python-email-validator" / "test_syntax_vectors.json"
    if ev.is_file():
        def walk(node: Any) -> None:
            if isinstance(node, dict):
                for k, v in node.items():
                    if k == "email_input" and isinstance(v, str):
                        addresses.append(b"<" + v.encode("utf-8", "surrogatepass") + b">")
                    else:
                        walk(v)
            elif isinstance(node, list):
                for v in node:
                    walk(v)
        walk(json.loads(ev.read_text("utf-8")))
    froms: list[bytes] = []
    hv = c / "haraka-plugin-headers-vectors" / "header_check_vectors.json"
    if hv.is_file():
        def walk_from(node: Any) -> None:
            if isinstance(node, dict):
                for k, v in node.items():
                    if k == "From" and isinstance(v, str):
                        froms.append(v.encode("utf-8", "surrogatepass"))
                    else:
                        walk_from(v)
            elif isinstance(node, list):
                for v in node:
                    walk_from(v)
        walk_from(json.loads(hv.read_text("utf-8")))
    return Seeds(addresses, froms or [b"test@example.net"], parsers["message"])


# ------------------------------------------------------------- generators
SPECIAL_PATHS = [
    b"<>", b"<@relay.example:bob@example.org>", b"<@a.example,@b.example:bob@example.org>",
    b'<"bob smith"@example.org>', b'<"b\\"o\\\\b"@example.org>', b"<bob@[192.0.2.1]>",
    b"<bob@[IPv6:2001:db8::1]>", b"<bob@[127.0.0.1]>", "<bü@bücher.example>".encode(),
    "<用户@例子.广告>".encode(), "<bob@xn--bcher-kva.example>".encode(), b"bob@example.org",
    b"<bob@example.org", b"<<bob@example.org>>", b"<" + b"a" * 300 + b"@example.org>",
    b"<bob@" + b"a." * 200 + b"example>", b"<\xff\xfe@example.org>", b"<bob@example.org\x00>",
    b"<bob%example.org@example.com>", b"<bob!example.org@example.com>", b"<postmaster>",
    b"<bob@example.org> ", b"< bob@example.org >", b"<bob@@example.org>", b"<.bob@example.org>",
]
MAIL_PARAMS = [
    b" SIZE=1000", b" SIZE=99999999999999999999999999", b" SIZE=-1", b" SIZE=", b" SIZE=1e9", b" SIZE=200000",
    b" BODY=8BITMIME", b" BODY=7BIT", b" BODY=BINARYMIME", b" BODY=", b" SMTPUTF8", b" SMTPUTF8=yes",
    b" AUTH=<>", b" AUTH=alice@example.com", b" RET=FULL", b" ENVID=x", b" X-" + b"Y" * 600 + b"=1",
    b" A=1" * 300, b" =", b" SIZE=1 SIZE=2", b" smtputf8", b" body=8bitmime", b" \xff=\xfe", b" SIZE=\x00",
]
HELO_ARGS = [b"client.test", b"[127.0.0.1]", b"[IPv6:::1]", b"", b"bad\xff\xfehost.test", b"h" * 300,
             "bücher.example".encode(), b"client.test extra words", b"\x00", b"-", b"."]
UNKNOWN = [b"XYZZY", b"", b" ", b"\x00\x00", b"MAILFROM:<a@b>", b"\xc3\xa9HLO x", b"GET / HTTP/1.1",
           b"PROXY TCP4 192.0.2.1 127.0.0.1 40000 25", b"PROXY UNKNOWN",
           b"PROXY TCP6 2001:db8::1 ::1 40000 25", b"TURN", b"ETRN example.org", b"ATRN", b"X" * 5,
           b"EHLO\tclient.test", b"M\x00IL FROM:<a@b>", b"1234", b"\xff\xff\xff\xff"]


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def eol(rng: random.Random) -> bytes:
    return rng.choices([b"\r\n", b"\n", b"\r\r\n"], [90, 7, 3])[0]


def pick_path(rng: random.Random, seeds: Seeds, good: bytes) -> bytes:
    r = rng.random()
    if r < 0.55:
        return b"<" + good + b">"
    if r < 0.75:
        return rng.choice(SPECIAL_PATHS)
    return rng.choice(seeds.addresses)


def auth_line(rng: random.Random) -> bytes:
    r = rng.random()
    good = b64(b"\0" + LOGIN + b"\0" + PASSWORD)
    choices = [
        b"AUTH PLAIN " + good, b"AUTH PLAIN " + good, b"AUTH PLAIN", b"AUTH LOGIN", b"AUTH LOGIN " + b64(LOGIN),
        b"AUTH PLAIN " + b64(b"\0" + LOGIN + b"\0wrong"), b"AUTH PLAIN !!!notbase64", "AUTH PLAIN ééé".encode(),
        b"AUTH PLAIN " + b64(b"only\0two"), b"AUTH PLAIN " + b64(bytes(rng.randrange(256) for _ in range(40))),
        b"AUTH PLAIN " + b64(b"bob\0" + LOGIN + b"\0" + PASSWORD), b"AUTH PLAIN " + b"QUFB" * 400,
        b"AUTH PLAIN =", b"AUTH PLAIN " + good + b" extra", b"AUTH CRAM-MD5", b"AUTH", b"AUTH plain " + good,
        b"AUTH LOGIN \xff\xfe", b"AUTH PLAIN " + b64("\0ålice\0pässword".encode()), b"AUTH XOAUTH2 abc",
        b"AUTH PLAIN " + b64(b"\0" + LOGIN + b"\0" + PASSWORD)[:-2],
    ]
    return choices[0] if r < 0.3 else rng.choice(choices)


def challenge_response(rng: random.Random, prompt: bytes) -> bytes:
    if prompt == b"Username:":
        good = b64(LOGIN)
    elif prompt == b"Password:":
        good = b64(PASSWORD)
    else:
        good = b64(b"\0" + LOGIN + b"\0" + PASSWORD)
    r = rng.random()
    if r < 0.6:
        return good
    return rng.choice([b"*", b"", b"!!!", "éàü".encode(), b"\xff\xfe", b"A" * 2000, b"QUFB" * 17000,
                       b64(b"wrong"), good + b"\x00", b"=" * 4, good[:-1], b"*" + good])


def command(rng: random.Random, seeds: Seeds, state: "State", *, tls_listener: bool) -> bytes:
    """One command line without its line end, biased towards what moves the session on."""
    r = rng.random()
    if r < 0.55:   # what the state calls for, mostly well-formed
        if not state.greeted:
            return rng.choice([b"EHLO ", b"EHLO ", b"EHLO ", b"HELO "]) + rng.choice(HELO_ARGS[:2])
        if tls_listener and not state.tls and rng.random() < 0.8:
            return b"STARTTLS"
        if not state.authed and not state.in_tx and rng.random() < 0.8:
            return auth_line(rng)
        if not state.in_tx:
            return b"MAIL FROM:" + (b"<alice@example.com>" if rng.random() < 0.7 else pick_path(
                rng, seeds, SENDER)) + (rng.choice(MAIL_PARAMS) if rng.random() < 0.2 else b"")
        if not state.rcpts or rng.random() < 0.25:
            return b"RCPT TO:" + (b"<bob@example.org>" if rng.random() < 0.6 else pick_path(
                rng, seeds, RECIPIENT))
        return b"DATA"
    verb = rng.choice(["EHLO", "HELO", "MAIL", "MAIL", "RCPT", "RCPT", "DATA", "RSET", "NOOP", "QUIT",
                       "AUTH", "AUTH", "STARTTLS", "VRFY", "EXPN", "HELP", "BDAT", "UNKNOWN"])
    if verb in ("EHLO", "HELO"):
        return verb.encode() + (b" " + rng.choice(HELO_ARGS) if rng.random() < 0.95 else b"")
    if verb == "MAIL":
        params = b"".join(rng.sample(MAIL_PARAMS, rng.randint(0, 3)))
        return b"MAIL FROM:" + pick_path(rng, seeds, SENDER) + params
    if verb == "RCPT":
        params = rng.choice([b"", b"", b"", b" NOTIFY=NEVER", b" ORCPT=rfc822;bob@example.org", b" X=1"])
        return rng.choice([b"RCPT TO:", b"RCPT TO: ", b"RCPT to:", b"RCPT "]) + pick_path(
            rng, seeds, RECIPIENT) + params
    if verb == "DATA":
        return rng.choice([b"DATA", b"DATA", b"DATA x", b"data"])
    if verb == "RSET":
        return rng.choice([b"RSET", b"RSET", b"RSET now"])
    if verb == "NOOP":
        return rng.choice([b"NOOP", b"NOOP hello", b"NOOP \xff"])
    if verb == "QUIT":
        return rng.choice([b"QUIT", b"QUIT now"])
    if verb == "AUTH":
        return auth_line(rng) if not state.authed or rng.random() < 0.2 else b"NOOP"
    if verb == "STARTTLS":
        return b"STARTTLS" if tls_listener or rng.random() < 0.5 else b"STARTTLS now"
    if verb == "VRFY":
        return b"VRFY " + pick_path(rng, seeds, RECIPIENT)
    if verb == "EXPN":
        return rng.choice([b"EXPN staff", b"EXPN", b"EXPN \x00"])
    if verb == "HELP":
        return rng.choice([b"HELP", b"HELP DATA", b"HELP XYZZY", b"HELP \xff"])
    if verb == "BDAT":
        return rng.choice([b"BDAT 5 LAST", b"BDAT 0 LAST", b"BDAT 999999999999", b"BDAT -1", b"BDAT"])
    return rng.choice(UNKNOWN)


def mutate_line(rng: random.Random, line: bytes) -> bytes:
    """A hostile variant of a command line (the line end is added later)."""
    b = bytearray(line)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(7)
        pos = rng.randint(0, len(b))
        if op == 0:
            b = bytearray(bytes(b).swapcase() if rng.random() < 0.5 else bytes(b).lower())
        elif op == 1:
            b[pos:pos] = rng.choice(HOSTILE)
        elif op == 2 and b:
            b[min(pos, len(b) - 1)] = rng.randrange(256)
        elif op == 3:
            b[pos:pos] = rng.choice([b"A", b"\xff", b" ", b"<x@y>"]) * rng.choice([1001, 1200, 70_000])
        elif op == 4:
            del b[pos:]
        elif op == 5:
            b[pos:pos] = b"\x00"
        else:
            b[pos:pos] = b"\r"
    return bytes(b)


def body_for(rng: random.Random, seeds: Seeds, token: bytes, max_size: int) -> bytes:
    """What follows a 354, with its end (or without, for a mid-DATA disconnect)."""
    head = (b"X-Fuzz-Id: " + token + b"\r\n")
    date = formatdate(usegmt=True).encode()
    clean = (b"From: Alice <alice@example.com>\r\nTo: Bob <bob@example.org>\r\nSubject: fuzz " + token +
             b"\r\nDate: " + date + b"\r\nMessage-ID: <" + token + b"@example.com>\r\n\r\nHello Bob,\r\n")
    edges = [b".leading dot\r\n", b"..two dots\r\n", b".\r\n", b". \r\n", b"x\ry\r\n", b"x\ny\r\n",
             b"\r.\r\n", b"\n.\n", b"\r\n.\n", b".\r", b"caf\xc3\xa9\r\n", b"\xff\xfe\r\n", b"\x00\r\n",
             b"A" * 1200 + b"\r\n", b"\r\n\r\n", b"--\r\n", b"=?utf-8?B?w6k=?=\r\n", b"From me\r\n"]
    r = rng.random()
    if r < 0.55:
        rest = clean + b"".join(rng.choice(edges) for _ in range(rng.choice([0, 0, 1, 2, 4]))) + b"bye\r\n"
    elif r < 0.7:
        frm = rng.choice(seeds.from_headers)
        rest = clean.replace(b"From: Alice <alice@example.com>", b"From: " + frm)
    elif r < 0.85:
        rest = mutate(rng, rng.choice(seeds.messages) if rng.random() < 0.5 else clean, seeds.messages)
    elif r < 0.9:
        rest = clean + (b"B" * 998 + b"\r\n") * (max_size // 1000 + 20)     # over the size limit
    else:
        rest = mutate(rng, clean, [clean])
    data = head + rest
    if rng.random() < 0.9:      # dot-stuffed as a client must; else a lone "." may end it early
        data = data.replace(b"\r\n.", b"\r\n..")
    if rng.random() < 0.07:     # disconnect mid-DATA
        return data[:rng.randint(0, len(data))]
    return data + (b".\r\n" if data.endswith(b"\r\n") else b"\r\n.\r\n")


# ------------------------------------------------------------------ client
def _utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@dataclass
class State:
    tls: bool = False
    greeted: bool = False
    authed: bool = False
    in_tx: bool = False
    rcpts: int = 0


@dataclass
class Report:
    seed: int
    sessions: int = 0
    commands: int = 0            # commands (and message bodies) the gateway owed a reply
    replies: Counter = field(default_factory=Counter)     # per class: 2xx, 3xx, 4xx, 5xx
    codes: Counter = field(default_factory=Counter)
    ended: Counter = field(default_factory=Counter)       # 221, 421, client close, client reset
    bytes_sent: int = 0
    data_250: int = 0
    relayed: int = 0             # messages in the sink
    seconds: float = 0.0
    ports: dict[int, int] = field(default_factory=dict)    # client port -> session
    violations: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        classes = ", ".join(f"{k} {v}" for k, v in sorted(self.replies.items()))
        ended = ", ".join(f"{k} {v}" for k, v in sorted(self.ended.items()))
        return (f"{self.sessions} sessions, {self.commands} commands, {self.bytes_sent / 1e6:.1f} MB sent, "
                f"seed {self.seed}, {self.seconds:.1f} s\n"
                f"  replies: {classes}\n  sessions ended: {ended}\n"
                f"  DATA answered 250: {self.data_250}, messages in the sink: {self.relayed}\n"
                f"  violations: {len(self.violations)}")


class Owed(Exception):
    """The session cannot go on (a violation was recorded)."""


class Conn:
    """One client connection and the model of the server's framing."""

    def __init__(self, sid: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, report: Report,
                 tokens: dict[bytes, int]):
        self.sid = sid
        self.reader, self.writer = reader, writer
        self.report = report
        self.tokens = tokens            # token -> code of the reply to its DATA body
        self.pending = bytearray()      # sent, not yet answered
        self.data_mode = False
        self.prompt: bytes | None = None    # the last 334's prompt, decoded
        self.closed = False             # by the server (after 221 / 421) or after a violation
        self.server_closed = False      # 221 / 421 came
        self.starttls = False           # a 220 to STARTTLS came: the caller does the handshake
        self.state = State()
        self.last: tuple[bytes, bytes] = (b"", b"")

    def violation(self, kind: str, detail: str, unit: bytes = b"", reply: bytes = b"") -> None:
        self.report.violations.append({"session": self.sid, "kind": kind, "detail": detail,
                                       "sent": unit[:300].hex(), "sent_len": len(unit),
                                       "reply": reply[:600].decode("latin-1")})

    async def read_reply(self, what: str) -> bytes:
        out = b""
        try:
            async with asyncio.timeout(REPLY_TIMEOUT):
                while True:
                    line = await self.reader.readuntil(b"\n")
                    out += line
                    if len(line) < 4 or line[3:4] != b"-":
                        return out
        except TimeoutError:
            self.violation("missing reply", f"no reply to {what} within {REPLY_TIMEOUT:g} s", self.last[0], out)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            self.violation("closed without 221/421", f"{type(exc).__name__} waiting for the reply to {what}",
                           self.last[0], out)
        except asyncio.LimitOverrunError:
            self.violation("malformed reply", "reply line over 64 KiB", self.last[0])
        self.closed = True
        raise Owed

    def _next_unit(self) -> bytes | None:
        if self.data_mode:
            i = self.pending.find(b"\r\n.\r\n")
            if i < 0:
                return None
            unit = bytes(self.pending[:i + 5])
            del self.pending[:i + 5]
            return unit
        i = self.pending.find(b"\n")
        if i < 0:
            return None
        unit = bytes(self.pending[:i + 1])
        del self.pending[:i + 1]
        return unit

    def _verb(self, unit: bytes) -> bytes:
        if self.prompt is not None:
            return b"<auth response>"
        return unit.rstrip(b"\r\n").partition(b" ")[0].upper()

    async def send(self, data: bytes, *, pieces: int = 1) -> None:
        """Write ``data`` (in ``pieces`` writes) and read every reply it is owed."""
        if self.closed:
            return
        step = max(1, -(-len(data) // pieces))
        try:
            for i in range(0, len(data), step):
                self.writer.write(data[i:i + step])
                await self.writer.drain()
        except ConnectionError as exc:
            self.violation("closed without 221/421", f"{type(exc).__name__} writing", data)
            self.closed = True
            raise Owed from None
        self.report.bytes_sent += len(data)
        self.pending += data
        while not self.closed and not self.starttls:
            in_data = self.data_mode
            unit = self._next_unit()
            if unit is None:
                return
            verb = b"<message>" if in_data else self._verb(unit)
            self.last = (unit, verb)
            self.report.commands += 1
            reply = await self.read_reply(verb.decode("latin-1") or "an empty line")
            self.check(unit, verb, reply)
            self.update(unit, verb, reply, in_data)

    def check(self, unit: bytes, verb: bytes, reply: bytes) -> None:
        lines = reply.split(b"\r\n")[:-1]
        if not reply.endswith(b"\r\n") or any(b"\n" in ln for ln in lines):
            self.violation("malformed reply", "not CRLF-terminated lines", unit, reply)
            return
        codes = set()
        for n, ln in enumerate(lines):
            m = _REPLY_LINE.match(ln + b"\r\n")
            if m is None or len(ln) + 2 > 512 or not _utf8(ln):
                self.violation("malformed reply", f"line {n + 1} is not 'NNN[ -]text' (UTF-8, no controls, "
                               "<= 512 octets)", unit, reply)
                return
            codes.add(m.group(1))
            if (m.group(2) == b" ") != (n == len(lines) - 1):
                self.violation("malformed reply", "'-' and ' ' out of place", unit, reply)
                return
            code = int(m.group(1))
            enhanced = _ENHANCED.match(m.group(3))
            ehlo = verb == b"EHLO" and code == 250
            if enhanced is None and code not in _NO_ENHANCED and not ehlo:
                self.violation("malformed reply", "no RFC 3463 enhanced code", unit, reply)
                return
            if enhanced is not None and enhanced.group(1) != m.group(1)[:1]:
                self.violation("malformed reply", "enhanced code of another class", unit, reply)
                return
        if len(codes) != 1 or not b"200" <= min(codes) <= b"599":
            self.violation("malformed reply", f"codes {sorted(codes)}", unit, reply)
            return
        if reply.startswith(INTERNAL_ERROR):
            self.violation("internal error", "451 4.3.0: the gateway's own bug", unit, reply)

    def update(self, unit: bytes, verb: bytes, reply: bytes, in_data: bool) -> None:
        code = int(reply[:3]) if reply[:3].isdigit() else 0
        self.report.codes[code] += 1
        self.report.replies[f"{code // 100}xx"] += 1
        st = self.state
        self.prompt = None
        if in_data:
            self.data_mode = False
            for t in TOKEN.findall(unit):
                self.tokens[t] = code
            if code == 250:
                self.report.data_250 += 1
                if not TOKEN.search(unit):
                    self.tokens[b"untokened-%d-%d" % (self.sid, self.report.data_250)] = 250
            st.in_tx, st.rcpts = False, 0
        elif code == 354:
            self.data_mode = True
            # the server reads the message from the CRLF that ended the DATA line on
            self.pending[0:0] = b"\r\n"
        elif code == 334:
            try:
                self.prompt = base64.b64decode(reply[4:].strip(), validate=True)
            except ValueError:
                self.prompt = b"?"
        elif verb in (b"EHLO", b"HELO") and code == 250:
            st.greeted, st.in_tx, st.rcpts = True, False, 0
        elif verb == b"STARTTLS" and code == 220:
            self.pending.clear()    # RFC 3207: what was pipelined after STARTTLS is dropped
            self.starttls = True
        elif code == 235:
            st.authed = True
        elif verb == b"MAIL" and code == 250:
            st.in_tx = True
        elif verb == b"RCPT" and code == 250:
            st.rcpts += 1
        elif verb == b"RSET" and code == 250:
            st.in_tx, st.rcpts = False, 0
        if code in (221, 421):
            self.closed = self.server_closed = True
            self.report.ended[str(code)] += 1

    async def expect_eof(self) -> None:
        """After 221 / 421 the gateway closes: nothing more may come."""
        try:
            async with asyncio.timeout(REPLY_TIMEOUT):
                rest = await self.reader.read()
        except TimeoutError:
            self.violation("not closed", "no EOF after 221/421", self.last[0])
            return
        except ConnectionError:
            return
        if rest:
            self.violation("extra reply", "bytes after 221/421", self.last[0], rest)


async def one_session(sid: int, rng: random.Random, seeds: Seeds, report: Report, tokens: dict[bytes, int], *,
                      port: int, tls_port: int | None, tls_client: ssl.SSLContext | None, max_size: int,
                      seed: int) -> None:
    tls_listener = tls_port is not None and rng.random() < 0.25
    try:
        async with asyncio.timeout(REPLY_TIMEOUT):
            reader, writer = await asyncio.open_connection("127.0.0.1", tls_port if tls_listener else port,
                                                           limit=1 << 16)
    except (OSError, TimeoutError) as exc:
        report.violations.append({"session": sid, "kind": "connect", "detail": repr(exc)})
        return
    conn = Conn(sid, reader, writer, report, tokens)
    report.sessions += 1
    report.ports[writer.get_extra_info("sockname")[1]] = sid
    ntx = 0
    try:
        greeting = await conn.read_reply("the connection")
        if not greeting.startswith(b"220 "):
            conn.violation("greeting", "not 220", b"", greeting)
            return
        for _ in range(rng.randint(1, 30)):
            if conn.closed:
                break
            if conn.data_mode:
                ntx += 1
                token = b"fz%dx%dx%dq" % (seed, sid, ntx)
                data = body_for(rng, seeds, token, max_size)
                if (bytes(conn.pending) + data).find(b"\r\n.\r\n") < 0:
                    writer.write(data)      # cut mid-DATA
                    await writer.drain()
                    report.bytes_sent += len(data)
                    break
                await conn.send(data, pieces=rng.choice([1, 1, 1, 3, 17]))
                continue
            if conn.prompt is not None:
                await conn.send(challenge_response(rng, conn.prompt) + eol(rng))
                continue
            r = rng.random()
            if r < 0.12:   # a pipelined batch, DATA only last (RFC 2920 3.1)
                batch = [command(rng, seeds, conn.state, tls_listener=False) for _ in range(rng.randint(2, 8))]
                batch = [mutate_line(rng, ln) if rng.random() < 0.1 else ln for ln in batch
                         if not ln.upper().startswith((b"DATA", b"STARTTLS", b"QUIT"))]
                if rng.random() < 0.5:
                    batch.append(b"DATA")
                await conn.send(b"".join(ln + eol(rng) for ln in batch), pieces=rng.choice([1, 1, 2, 7]))
            else:
                line = command(rng, seeds, conn.state, tls_listener=tls_listener)
                if rng.random() < 0.25 and not line.startswith(b"STARTTLS"):
                    line = mutate_line(rng, line)
                await conn.send(line + eol(rng), pieces=rng.choice([1] * 9 + [5]))
            if conn.starttls:
                assert tls_client is not None
                conn.starttls = False
                try:
                    async with asyncio.timeout(REPLY_TIMEOUT):
                        await writer.start_tls(tls_client, server_hostname="localhost")
                except (OSError, ssl.SSLError, TimeoutError) as exc:
                    conn.violation("STARTTLS", f"handshake failed: {exc!r}", conn.last[0])
                    conn.closed = True
                    return
                conn.state = State(tls=True)
        if conn.closed:
            return
        # the end: QUIT, a plain close, or an abrupt one mid-line
        r = rng.random()
        if r < 0.6 and not conn.data_mode:
            if conn.prompt is not None:     # an AUTH exchange is open: end it first
                await conn.send(b"*\r\n")
            await conn.send(b"QUIT\r\n")
            if not conn.closed:
                conn.violation("QUIT", "no 221", conn.last[0])
        elif r < 0.8:
            writer.write(rng.choice([b"", b"MAIL FROM:<alice@exa", b"RCPT TO:<\xff", b"AUTH PLAIN QUFB"]))
    except Owed:
        return
    except ConnectionError as exc:
        conn.violation("closed without 221/421", repr(exc), conn.last[0])
        return
    finally:
        if conn.server_closed:
            await conn.expect_eof()
            writer.close()
        elif conn.closed:
            writer.close()
        elif rng.random() < 0.3:
            report.ended["client reset"] += 1
            _reset(writer)
        else:
            report.ended["client close"] += 1
            writer.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), not a FIN."""
    sock = writer.get_extra_info("socket")
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except (OSError, AttributeError):
        pass
    writer.transport.abort()


# -------------------------------------------------------------- log capture
class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.bad: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:       # a bad format is a bug too
            msg = repr(record.msg)
        if record.name.startswith("asyncio") and record.levelno < logging.ERROR:
            return
        if record.exc_info or "unexpected error" in msg or record.name.startswith("asyncio"):
            where = self.format(record) if record.exc_info else msg
            self.bad.append({"kind": "logged exception", "logger": record.name, "detail": where[-3000:]})


async def fuzz(port: int, sink: Any, *, sessions: int, seed: int, tls_port: int | None = None,
               ca_file: str | None = None, concurrency: int = 4, max_size: int = 100_000,
               only: int | None = None, seeds: Seeds | None = None,
               open_sessions: Callable[[], list[int]] | None = None) -> Report:
    """Run ``sessions`` random sessions against the gateway on ``port`` (and
    ``tls_port``, a STARTTLS listener whose certificate ``ca_file`` signs),
    relaying to ``sink`` (``.messages``, each with ``.data``); the account
    alice / s3cret of domain example.com must exist. ``open_sessions()``, if
    given, is the client ports of the sessions the gateway holds."""
    seeds = seeds or load()
    report = Report(seed)
    tokens: dict[bytes, int] = {}
    tls_client = ssl.create_default_context(cafile=ca_file) if tls_port is not None else None
    captured = Captured()
    watched = [logging.getLogger("gateway"), logging.getLogger("asyncio")]
    for lg in watched:
        lg.addHandler(captured)
    before = len(sink.messages)
    start = time.perf_counter()
    todo = iter([only] if only is not None else range(sessions))

    async def worker() -> None:
        for sid in todo:
            await one_session(sid, random.Random(f"{seed}/{sid}"), seeds, report, tokens, port=port,
                              tls_port=tls_port, tls_client=tls_client, max_size=max_size, seed=seed)

    try:
        async with asyncio.timeout(max(120.0, sessions * 2.0)):
            await asyncio.gather(*(worker() for _ in range(concurrency)))
    except TimeoutError:
        report.violations.append({"kind": "run", "detail": "the run overran its deadline"})
    # every session is over on the gateway's side too before the sink is counted
    if open_sessions is not None:
        try:
            async with asyncio.timeout(REPLY_TIMEOUT):
                while open_sessions():
                    await asyncio.sleep(0.02)
        except TimeoutError:
            left = {p: report.ports.get(p) for p in open_sessions()}
            report.violations.append({"kind": "session left open", "detail": f"client port: session {left}"})
    await asyncio.sleep(0.1)
    try:
        await final_session(port, sink, report, seed)
    except (TimeoutError, OSError) as exc:
        report.violations.append({"kind": "after the run", "detail": repr(exc)})
    finally:
        gc.collect()        # a task that ended with an exception nobody retrieved is logged now
        await asyncio.sleep(0)
        for lg in watched:
            lg.removeHandler(captured)
    report.seconds = time.perf_counter() - start
    report.violations += captured.bad
    check_sink(sink.messages[before:], tokens, report)
    return report


async def final_session(port: int, sink: Any, report: Report, seed: int) -> None:
    """After the run the gateway still serves a normal AUTH + relay."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    tokens: dict[bytes, int] = {}
    conn = Conn(-1, reader, writer, Report(seed), tokens)
    token = b"fz%dx999999999x0q" % seed
    try:
        await conn.read_reply("the connection")
        for line in (b"EHLO client.test", b"AUTH PLAIN " + b64(b"\0" + LOGIN + b"\0" + PASSWORD),
                     b"MAIL FROM:<alice@example.com>", b"RCPT TO:<bob@example.org>", b"DATA"):
            await conn.send(line + b"\r\n")
        body = (b"X-Fuzz-Id: " + token + b"\r\nFrom: Alice <alice@example.com>\r\nTo: Bob <bob@example.org>\r\n"
                b"Subject: after the fuzz\r\nDate: " + formatdate(usegmt=True).encode() + b"\r\nMessage-ID: <" +
                token + b"@example.com>\r\n\r\nstill relaying\r\n.\r\n")
        await conn.send(body)
        await conn.send(b"QUIT\r\n")
        await conn.expect_eof()
    except Owed:
        pass
    finally:
        writer.close()
    codes = conn.report.codes
    if tokens.get(token) != 250 or codes[235] != 1 or codes[221] != 1 or conn.report.violations:
        report.violations.append({"kind": "after the run", "detail": f"a normal session did not relay: "
                                  f"{dict(codes)} {conn.report.violations}"})
        return
    async with asyncio.timeout(REPLY_TIMEOUT):
        while not any(token in m.data for m in sink.messages):
            await asyncio.sleep(0.02)


def check_sink(messages: list[Any], tokens: dict[bytes, int], report: Report) -> None:
    report.relayed = len(messages)
    seen: Counter = Counter()
    untokened = 0
    for m in messages:
        found = set(TOKEN.findall(m.data))
        if not found:
            untokened += 1
        for t in found:
            seen[t] += 1
            if t.endswith(b"x0q") and b"x999999999x" in t:
                continue
            if tokens.get(t) != 250:
                report.violations.append({"kind": "relayed without 250", "detail": t.decode(),
                                          "code": tokens.get(t)})
    for t, code in tokens.items():
        if code == 250 and t.startswith(b"fz") and seen[t] != 1:
            report.violations.append({"kind": "250 but not relayed once", "detail": f"{t.decode()}: {seen[t]}"})
    allowed = sum(1 for t, c in tokens.items() if c == 250 and t.startswith(b"untokened"))
    if untokened > allowed:
        report.violations.append({"kind": "relayed without 250",
                                  "detail": f"{untokened} messages without a token, {allowed} such 250s"})


# -------------------------------------------------------------------- main
async def _standalone(args: argparse.Namespace) -> Report:
    sys.path.insert(0, str(REPO / "tests"))
    import trustme
    from conftest import Sink, base_config     # the config tests/conftest.py's gateway_factory builds

    from gateway.app import Gateway
    from gateway.config import from_mapping
    from gateway.txlog import TransactionLog

    with tempfile.TemporaryDirectory(prefix="fuzz-smtp-") as tmp:
        d = Path(tmp)
        ca = trustme.CA()
        server = ca.issue_cert("localhost", "127.0.0.1")
        server.private_key_pem.write_to_path(str(d / "key.pem"))
        server.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
        for blob in server.cert_chain_pems[1:]:
            blob.write_to_path(str(d / "cert.pem"), append=True)
        ca.cert_pem.write_to_path(str(d / "ca.pem"))
        sink = await Sink().start()
        certs = type("Certs", (), {"cert_file": str(d / "cert.pem"), "key_file": str(d / "key.pem")})()
        cfg = base_config(d, sink, certs, **fuzz_sections())
        config = from_mapping(cfg, "<fuzz>")
        gw = Gateway(config, txlog=TransactionLog(config.log.transactions))
        await gw.start()
        try:
            await gw.accounts.add("alice", "s3cret", contact="ops@example.com")
            await gw.accounts.add_domain("alice", "example.com", approved_by="fuzz")
            return await fuzz(gw.ports["plain"], sink, sessions=args.sessions, seed=args.seed,
                              tls_port=gw.ports["tls"], ca_file=str(d / "ca.pem"), concurrency=args.concurrency,
                              only=args.only,
                              open_sessions=lambda: [s.gsession.peer_port for s in gw.sessions if s.gsession])
        finally:
            await gw.stop(grace=0.5)
            await sink.stop()


def fuzz_sections() -> dict[str, Any]:
    """What the fuzz gateway changes of conftest's base_config: a STARTTLS
    listener beside the plain one, and the per-IP limits out of reach: AUTH
    failures (the fuzzer fails AUTH on purpose; from one IP the limiter would
    soon answer 454 to every AUTH and the deeper states would never be
    reached) and the connection rate (every session comes from 127.0.0.1,
    hundreds a second)."""
    return {
        "listeners": [{"name": "plain", "address": "127.0.0.1", "port": 0, "tls": "none", "auth_without_tls": True},
                      {"name": "tls", "address": "127.0.0.1", "port": 0, "tls": "starttls"}],
        "auth": {"max_failures_per_ip": 1_000_000, "max_failures_per_account": 1_000_000},
        "smtp": {"connection_rate_per_ip": 0},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=2000, help="sessions (default 2000)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument("--concurrency", type=int, default=4, help="sessions at a time (default 4)")
    p.add_argument("--only", type=int, default=None, help="replay session N of this seed alone")
    p.add_argument("--out", type=Path, default=REPO / "bench/results/fuzz-smtp-violations.json",
                   help="where violations are written (default bench/results/fuzz-smtp-violations.json)")
    args = p.parse_args(argv)
    import uvloop
    report = uvloop.run(_standalone(args))
    print(report.summary())
    if report.violations:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report.violations, indent=1))
        for v in report.violations[:10]:
            print(f"VIOLATION {v}"[:600])
        print(f"written to {args.out}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
