"""RFC 5322 header block parsing and the header rules of issue 5.

Only the header block is parsed with Python code; the body is touched by the
MIME walk alone, and that walks boundaries with ``bytes.find``, so a 25 MiB
message costs about what its header block and boundary lines cost.

Everything here is pure: bytes and settings in, :class:`Finding` lists out.
The check modules in ``gateway/checks/data_*.py`` decide what to do with them.
"""
from __future__ import annotations

import base64
import binascii
import codecs
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from .findings import Finding
from .settings import HeaderSettings
from .wire import header_end

# --------------------------------------------------------------------------------------
# Header block
# --------------------------------------------------------------------------------------

_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+\Z")

# Fields that RFC 5322 3.6 allows at most once (From and Date exactly once).
SINGULAR = ("from", "date", "sender", "reply-to", "to", "cc", "bcc", "message-id",
            "in-reply-to", "references", "subject")
REQUIRED = ("from", "date")
_CANON = {"from": "From", "date": "Date", "sender": "Sender", "reply-to": "Reply-To", "to": "To",
          "cc": "Cc", "bcc": "Bcc", "message-id": "Message-ID", "in-reply-to": "In-Reply-To",
          "references": "References", "subject": "Subject"}
# Address headers and whether they take a group (RFC 5322 3.6.2/3.6.3/3.6.6).
ADDRESS_FIELDS = {"from": False, "sender": False, "reply-to": True, "to": True, "cc": True,
                  "bcc": True, "resent-from": False, "resent-sender": False, "resent-to": True,
                  "resent-cc": True, "resent-bcc": True}


@dataclass(slots=True)
class ParsedHeaders:
    """The header block of one message, fields in order, values unfolded."""

    fields: list[tuple[str, str]]           # (name as sent, unfolded value, leading WSP stripped)
    body_start: int                         # offset of the first body byte in the message
    defects: list[Finding] = field(default_factory=list)  # field-name / folding / utf-8 findings
    index: dict[str, list[int]] = field(default_factory=dict)  # lower-case name -> positions

    def count(self, name: str) -> int:
        return len(self.index.get(name.lower(), ()))

    def get(self, name: str) -> str | None:
        pos = self.index.get(name.lower())
        return self.fields[pos[0]][1] if pos else None

    def get_all(self, name: str) -> list[str]:
        return [self.fields[i][1] for i in self.index.get(name.lower(), ())]

    def has(self, name: str) -> bool:
        return name.lower() in self.index


def _decode_header_bytes(raw: bytes, defects: list[Finding]) -> str:
    if raw.isascii():
        return raw.decode("ascii")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if not any(d.id == "hdr.utf8" for d in defects):
            defects.append(Finding("hdr.utf8", f"header bytes are not UTF-8 at offset {exc.start}"))
        return raw.decode("utf-8", "surrogateescape")


# A well-formed field: name, colon, value with its continuation lines.
_FIELD_FAST = re.compile(r"([\x21-\x39\x3b-\x7e]+):([^\n]*(?:\n[ \t][^\n]*)*)\n")
_WSP_ONLY_LINE = re.compile(r"\n[ \t]+\r?\n")


def parse_headers(data: bytes) -> ParsedHeaders:
    """Split the header block off ``data`` and parse it into fields.

    Tolerant of bare LF (the wire check judges those); never raises.
    """
    hend = header_end(data)
    if hend >= len(data):
        body_start = len(data)
    else:
        body_start = data.find(b"\n", hend) + 1
    defects: list[Finding] = []
    text = _decode_header_bytes(data[:hend], defects)
    if text.endswith("\n") and not text.startswith((" ", "\t")) and not _WSP_ONLY_LINE.search(text):
        # fast path: one regex match per field; any irregularity falls back to the line walk
        fields: list[tuple[str, str]] = []
        index: dict[str, list[int]] = {}
        pos, n = 0, len(text)
        match = _FIELD_FAST.match
        while pos < n:
            m = match(text, pos)
            if m is None:
                break
            name, value = m.group(1), m.group(2)
            if "\n" in value:
                value = value.replace("\r\n", "").replace("\n", "")
            index.setdefault(name.lower(), []).append(len(fields))
            fields.append((name, value.strip(" \t\r")))
            pos = m.end()
        else:
            return ParsedHeaders(fields, body_start, defects, index)
    return _parse_lines(text, body_start, defects)


def _parse_lines(text: str, body_start: int, defects: list[Finding]) -> ParsedHeaders:
    fields: list[tuple[str, str]] = []
    index: dict[str, list[int]] = {}
    name: str | None = None
    parts: list[str] = []
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for n, line in enumerate(lines, 1):
        if line.endswith("\r"):
            line = line[:-1]
        if line[:1] in (" ", "\t"):
            if name is None:
                if not any(d.id == "hdr.folding" for d in defects):
                    defects.append(Finding("hdr.folding", f"header line {n} is a continuation with no field before it"))
                continue
            if not line.strip(" \t"):
                if not any(d.id == "hdr.folding" for d in defects):
                    defects.append(Finding("hdr.folding", f"folded line {n} of {name} holds only white space"))
            parts.append(line)
            continue
        if name is not None:
            _add_field(fields, index, name, parts)
            name = None
        colon = line.find(":")
        if colon <= 0:
            if not any(d.id == "hdr.field_name" for d in defects):
                what = "starts with a colon" if colon == 0 else "has no colon"
                defects.append(Finding("hdr.field_name", f"header line {n} {what}: {_clip(line)!r}"))
            continue
        fname = line[:colon]
        if not _FIELD_NAME.match(fname):
            stripped = fname.rstrip(" \t")
            if not any(d.id == "hdr.field_name" for d in defects):
                why = ("white space before the colon" if stripped and _FIELD_NAME.match(stripped)
                       else "characters outside printable ASCII")
                defects.append(Finding("hdr.field_name", f"field name {_clip(fname)!r} has {why}"))
            fname = stripped or fname
        name = fname
        parts = [line[colon + 1:]]
    if name is not None:
        _add_field(fields, index, name, parts)
    return ParsedHeaders(fields, body_start, defects, index)


def _add_field(fields: list[tuple[str, str]], index: dict[str, list[int]], name: str, parts: list[str]) -> None:
    value = parts[0] if len(parts) == 1 else "".join(parts)
    index.setdefault(name.lower(), []).append(len(fields))
    fields.append((name, value.lstrip(" \t").rstrip(" \t")))


def _clip(s: str, n: int = 60) -> str:
    return s if len(s) <= n else s[:n] + "..."


# --------------------------------------------------------------------------------------
# Addresses (RFC 5322 3.4 with the obsolete forms of 4.4, RFC 6532 UTF-8)
# --------------------------------------------------------------------------------------


class HeaderSyntaxError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Mailbox:
    display: str      # display name as sent (quotes removed, encoded-words NOT decoded)
    local: str        # local part as sent (quoted form kept)
    domain: str       # domain as sent
    comment: str = ""  # text of comments around the mailbox (old "addr (Name)" form)

    @property
    def addr(self) -> str:
        return f"{self.local}@{self.domain}"

    @property
    def domain_lower(self) -> str:
        return self.domain.lower()


_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_TOKEN = re.compile(
    r'(?P<ws>[ \t\r\n]+)'
    rf'|(?P<atom>(?:[{_ATEXT}]|[^\x00-\x7f])+)'
    r'|(?P<qs>"(?:[^"\\]|\\[\s\S])*")'
    r'|(?P<dl>\[(?:[^\[\]\\]|\\[\s\S])*\])'
    r'|(?P<sp>[<>@,;:.])'
    r'|(?P<cm>\()'
)
_COMMENT = re.compile(r"\((?:[^()\\]|\\[\s\S])*\)")
_SIMPLE_ADDR = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*@[{_ATEXT}]+(?:\.[{_ATEXT}]+)*\Z")
_DOT_ATOM = rf"(?:[{_ATEXT}]|[^\x00-\x7f])+(?:\.(?:[{_ATEXT}]|[^\x00-\x7f])+)*"
_WORD_U = rf"(?:[{_ATEXT}]|[^\x00-\x7f])+"
# One mailbox of the forms nearly all software writes, then "," or the end:
# ["Quoted"|Plain Words] <local@domain>   or   local@domain
_FAST_BOX = re.compile(
    rf'[ \t]*(?:(?:"((?:[^"\\\r\n]|\\.)*)"|({_WORD_U}(?:[ \t]+{_WORD_U})*))?[ \t]*<({_DOT_ATOM})@({_DOT_ATOM})>'
    rf'|({_DOT_ATOM})@({_DOT_ATOM}))[ \t]*(,|\Z)')


def _comment_end(s: str, i: int) -> int:
    """Index after the comment opening at s[i] (nested comments allowed)."""
    m = _COMMENT.match(s, i)
    if m:
        return m.end()
    depth = 0
    n = len(s)
    while i < n:
        c = s[i]
        if c == "\\":
            i += 2
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise HeaderSyntaxError("unclosed comment")


def _tokenize(s: str) -> list[tuple[str, str]]:
    toks: list[tuple[str, str]] = []
    i, n = 0, len(s)
    match = _TOKEN.match
    while i < n:
        m = match(s, i)
        if m is None:
            c = s[i]
            if c == '"':
                raise HeaderSyntaxError("unclosed quoted string")
            if c == "[":
                raise HeaderSyntaxError("unclosed domain literal")
            raise HeaderSyntaxError(f"unexpected character {c!r}")
        kind = m.lastgroup
        if kind == "cm":
            j = _comment_end(s, i)
            toks.append(("cm", s[i + 1:j - 1]))
            i = j
            continue
        if kind != "ws":
            toks.append((kind, m.group()))  # type: ignore[arg-type]
        i = m.end()
    return toks


def _unquote(qs: str) -> str:
    inner = qs[1:-1]
    return re.sub(r"\\([\s\S])", r"\1", inner) if "\\" in inner else inner


class _AddrParser:
    __slots__ = ("toks", "i", "n", "comments")

    def __init__(self, toks: list[tuple[str, str]]):
        self.comments = [t[1] for t in toks if t[0] == "cm"]
        self.toks = [t for t in toks if t[0] != "cm"]
        self.i = 0
        self.n = len(self.toks)

    def peek(self) -> tuple[str, str]:
        return self.toks[self.i] if self.i < self.n else ("end", "")

    def take(self) -> tuple[str, str]:
        t = self.peek()
        self.i += 1
        return t

    def expect(self, sp: str) -> None:
        t = self.take()
        if t != ("sp", sp):
            raise HeaderSyntaxError(f"expected {sp!r}, found {t[1] or 'end'!r}")

    def address_list(self, allow_group: bool) -> list[Mailbox]:
        out: list[Mailbox] = []
        while True:
            # obs-addr-list allows empty elements: "a@b, , c@d"
            while self.peek() == ("sp", ","):
                self.i += 1
            if self.peek()[0] == "end":
                break
            out.extend(self.address(allow_group))
            t = self.peek()
            if t[0] == "end":
                break
            if t != ("sp", ","):
                raise HeaderSyntaxError(f"expected ',' between addresses, found {t[1]!r}")
            self.i += 1
        return out

    def _phrase(self) -> list[tuple[str, str]]:
        words: list[tuple[str, str]] = []
        while True:
            t = self.peek()
            if t[0] in ("atom", "qs") or (t == ("sp", ".") and words):  # obs-phrase allows "."
                words.append(t)
                self.i += 1
            else:
                return words

    def address(self, allow_group: bool) -> list[Mailbox]:
        start = self.i
        words = self._phrase()
        t = self.peek()
        if t == ("sp", "<"):
            return [self.angle(_phrase_text(words))]
        if t == ("sp", ":") and words:
            if not allow_group:
                raise HeaderSyntaxError("group syntax not allowed in this field")
            self.i += 1
            members: list[Mailbox] = []
            while self.peek() != ("sp", ";"):
                if self.peek()[0] == "end":
                    raise HeaderSyntaxError("group without closing ';'")
                if self.peek() == ("sp", ","):
                    self.i += 1
                    continue
                members.append(self.mailbox())
            self.i += 1
            return members
        self.i = start
        return [self.mailbox()]

    def mailbox(self) -> Mailbox:
        start = self.i
        words = self._phrase()
        if self.peek() == ("sp", "<"):
            return self.angle(_phrase_text(words))
        self.i = start
        local, domain = self.addr_spec()
        return Mailbox("", local, domain, " ".join(self.comments))

    def angle(self, display: str) -> Mailbox:
        self.expect("<")
        if self.peek() == ("sp", "@"):  # obs-route: <@a,@b:user@c>
            while self.peek() != ("sp", ":"):
                if self.peek()[0] == "end":
                    raise HeaderSyntaxError("unterminated route")
                self.i += 1
            self.i += 1
        if self.peek() == ("sp", ">"):
            raise HeaderSyntaxError("empty angle address")
        local, domain = self.addr_spec()
        self.expect(">")
        return Mailbox(display, local, domain, " ".join(self.comments))

    def addr_spec(self) -> tuple[str, str]:
        parts: list[str] = []
        expect_word = True
        while True:
            k, v = self.peek()
            if expect_word:
                if k not in ("atom", "qs"):
                    if not parts:
                        raise HeaderSyntaxError("empty local part" if (k, v) == ("sp", "@")
                                                else f"expected local part, found {v or 'end'!r}")
                    raise HeaderSyntaxError("local part ends with a dot or has two dots in a row")
                parts.append(v)
                self.i += 1
                expect_word = False
            elif (k, v) == ("sp", "."):
                parts.append(".")
                self.i += 1
                expect_word = True
            else:
                break
        if self.peek() != ("sp", "@"):
            raise HeaderSyntaxError(f"missing @domain after {''.join(parts)!r}")
        self.i += 1
        k, v = self.take()
        if k == "dl":
            return "".join(parts), v
        if k != "atom":
            raise HeaderSyntaxError(f"expected domain, found {v or 'end'!r}")
        dom = [v]
        while self.peek() == ("sp", "."):
            self.i += 1
            k, v = self.take()
            if k != "atom":
                raise HeaderSyntaxError("domain ends with a dot or has two dots in a row")
            dom.append(v)
        return "".join(parts), ".".join(dom)


def _phrase_text(words: list[tuple[str, str]]) -> str:
    out: list[str] = []
    for k, v in words:
        if k == "qs":
            out.append(_unquote(v))
        else:
            out.append(v)
    return " ".join(out)


def parse_address_list(value: str, *, allow_group: bool = True) -> list[Mailbox]:
    """Parse an RFC 5322 address-list / mailbox-list value (RFC 6532 UTF-8 allowed).

    Raises :class:`HeaderSyntaxError` with a short reason.
    """
    v = value.strip()
    if _SIMPLE_ADDR.match(v):  # fast path: the bare addr-spec most software writes
        local, _, domain = v.rpartition("@")
        return [Mailbox("", local, domain)]
    # fast path 2: a list of plain mailboxes, one compiled regex per mailbox
    out: list[Mailbox] = []
    pos, n = 0, len(v)
    match = _FAST_BOX.match
    while pos < n:
        m = match(v, pos)
        if m is None:
            break
        q, plain, local, domain, blocal, bdomain, sep = m.groups()
        if local is not None:
            display = (re.sub(r"\\(.)", r"\1", q) if "\\" in q else q) if q is not None else (plain or "")
            out.append(Mailbox(display, local, domain))
        else:
            out.append(Mailbox("", blocal, bdomain))
        pos = m.end()
        if not sep:
            return out
    else:
        return out
    p = _AddrParser(_tokenize(value))
    return p.address_list(allow_group)


# --------------------------------------------------------------------------------------
# Date (RFC 5322 3.3 with the obsolete forms of 4.3)
# --------------------------------------------------------------------------------------

_MONTHS = {m: i for i, m in enumerate(("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug",
                                       "sep", "oct", "nov", "dec"), 1)}
_ZONES = {"ut": 0, "gmt": 0, "z": 0, "est": -5, "edt": -4, "cst": -6, "cdt": -5,
          "mst": -7, "mdt": -6, "pst": -8, "pdt": -7}
_DATE = re.compile(
    r"\s*(?:\((?:[^()\\]|\\.)*\)\s*)*"
    r"(?:(?:mon|tue|wed|thu|fri|sat|sun)\s*,\s*)?"
    r"(\d{1,2})\s+(jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)\s+(\d{2,4})\s+"
    r"(\d{1,2})\s*:\s*(\d{2})(?:\s*:\s*(\d{2}))?\s*"
    r"(?:([+-])(\d{2})(\d{2})|(ut|gmt|[ecmp][sd]t|[a-ik-z]))"
    r"(?:\s*\((?:[^()\\]|\\.)*\))*\s*\Z",
    re.I | re.S)


def parse_date(value: str) -> datetime:
    """An aware datetime for an RFC 5322 date-time; ValueError if it is not one.

    Stricter than ``email.utils.parsedate_to_datetime``: the zone is required
    and the fields must form a real time (no second 60, no 31 September).
    Military single-letter zones other than Z are read as UTC (RFC 5322 4.3).
    """
    m = _DATE.match(value)
    if not m:
        raise ValueError("not an RFC 5322 date-time")
    day, mon, year, hh, mm, ss, sign, zh, zm, zname = m.groups()
    y = int(year)
    if len(year) == 2:
        y += 2000 if y < 50 else 1900
    elif len(year) == 3:
        y += 1900
    if zname is not None:
        off = timedelta(hours=_ZONES.get(zname.lower(), 0))
    else:
        if int(zm) >= 60 or int(zh) > 23:
            raise ValueError("zone offset out of range")
        off = timedelta(hours=int(zh), minutes=int(zm))
        if sign == "-":
            off = -off
    try:
        return datetime(y, _MONTHS[mon.lower()], int(day), int(hh), int(mm), int(ss or 0),
                        tzinfo=timezone(off))
    except ValueError as exc:
        raise ValueError(f"impossible date ({exc})") from None


# --------------------------------------------------------------------------------------
# Message-ID (RFC 5322 3.6.4)
# --------------------------------------------------------------------------------------

_MSG_ID = re.compile(
    r"\s*(?:\((?:[^()\\]|\\.)*\)\s*)*"
    rf'<(?:{_DOT_ATOM}|"(?:[^"\\]|\\.)*")@(?:{_DOT_ATOM}|\[[^\[\]\\]*\])>'
    r"\s*(?:\((?:[^()\\]|\\.)*\)\s*)*\Z", re.S)


def valid_message_id(value: str) -> bool:
    return _MSG_ID.match(value) is not None


# --------------------------------------------------------------------------------------
# Encoded-words (RFC 2047, RFC 2231 language suffix)
# --------------------------------------------------------------------------------------

_EW = re.compile(r"=\?([^?\s*]+)(?:\*[^?\s]*)?\?([BbQq])\?([^?\s]*)\?=")
_Q_HEX = re.compile(rb"=([0-9A-Fa-f]{2})")


class EncodedWordError(ValueError):
    pass


# Decode legacy charsets with the superset every mail reader really uses
# (the WHATWG encoding labels): GB2312-labelled text is GBK in practice, and so on.
_SUPERSET = {"gb2312": "gb18030", "gbk": "gb18030", "euc_kr": "cp949", "big5": "big5hkscs",
             "shift_jis": "cp932", "iso8859-1": "cp1252", "ascii": "cp1252", "tis-620": "cp874",
             "iso8859-9": "cp1254", "iso8859-11": "cp874"}


def _ew_bytes(m: re.Match[str]) -> tuple[str, bytes]:
    charset, enc, text = m.group(1), m.group(2), m.group(3)
    try:
        codec = codecs.lookup(charset).name
    except LookupError:
        raise EncodedWordError(f"unknown charset {charset!r} in encoded-word") from None
    codec = _SUPERSET.get(codec, codec)
    if enc in "Bb":
        raw = text.encode("ascii", "surrogateescape")
        try:
            data = base64.b64decode(raw + b"=" * (-len(raw) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise EncodedWordError(f"bad base64 in encoded-word {_clip(m.group(0), 40)!r}") from None
    else:
        raw = text.replace("_", " ").encode("ascii", "surrogateescape")
        data = _Q_HEX.sub(lambda h: bytes((int(h.group(1), 16),)), raw)
    return codec, data


def decode_words(value: str) -> str:
    """Decode RFC 2047 encoded-words in an unstructured value; EncodedWordError if one is bad.

    White space between adjacent encoded-words is dropped (RFC 2047 6.2), and
    adjacent words in the same charset are decoded together: many mailers
    split a multi-byte character across two words, which every reader copes
    with, so we do too.
    """
    if "=?" not in value:
        return value
    out: list[str] = []
    pos = 0
    pend_codec: str | None = None
    pend = b""
    pend_src = ""

    def flush() -> None:
        nonlocal pend_codec, pend, pend_src
        if pend_codec is not None:
            try:
                out.append(pend.decode(pend_codec))
            except UnicodeDecodeError:
                raise EncodedWordError(f"encoded-word is not valid {pend_codec}: {_clip(pend_src, 40)!r}") from None
        pend_codec, pend, pend_src = None, b"", ""

    for m in _EW.finditer(value):
        gap = value[pos:m.start()]
        codec, data = _ew_bytes(m)
        if pend_codec is not None and not gap.strip(" \t\r\n") and codec == pend_codec:
            pend += data
            pend_src += m.group(0)
        else:
            if pend_codec is None or gap.strip(" \t\r\n"):
                flush()
                out.append(gap)
            else:
                flush()
            pend_codec, pend, pend_src = codec, data, m.group(0)
        pos = m.end()
    flush()
    out.append(value[pos:])
    return "".join(out)


def decode_lenient(value: str) -> str:
    try:
        return decode_words(value)
    except EncodedWordError:
        return value


# --------------------------------------------------------------------------------------
# MIME structure (RFC 2045 / 2046), walked with bytes.find
# --------------------------------------------------------------------------------------

_CT = re.compile(r"\s*([!#$%&'*+\-.^_`|~0-9A-Za-z]+)\s*/\s*([!#$%&'*+\-.^_`|~0-9A-Za-z]+)\s*(.*)\Z", re.S)
_PARAM = re.compile(r'''\s*;\s*([^\s=;"]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s;"]*)''', re.S)
KNOWN_CTE = frozenset(("7bit", "8bit", "binary", "quoted-printable", "base64"))
_PART_HDR = re.compile(rb"^(content-type|content-transfer-encoding)[ \t]*:((?:[^\r\n]*(?:\r?\n[ \t][^\r\n]*)*))",
                       re.I | re.M)


def parse_content_type(value: str) -> tuple[str, dict[str, str]] | None:
    """("type/subtype" lower-case, params with lower-case names) or None if it does not parse."""
    value = _COMMENT.sub(" ", value) if "(" in value else value
    m = _CT.match(value)
    if not m:
        return None
    params: dict[str, str] = {}
    for pm in _PARAM.finditer(m.group(3)):
        v = pm.group(2)
        if v.startswith('"'):
            v = re.sub(r"\\(.)", r"\1", v[1:-1])
        params.setdefault(pm.group(1).lower(), v)
    return f"{m.group(1).lower()}/{m.group(2).lower()}", params


def _cte_ok(cte: str) -> bool:
    c = cte.strip().lower()
    if "(" in c:
        c = _COMMENT.sub("", c).strip()
    return c in KNOWN_CTE or c.startswith("x-")


def _part_headers(data: bytes, start: int, end: int) -> tuple[bytes | None, bytes | None, int]:
    """Content-Type and Content-Transfer-Encoding of the part at data[start:end], and its body start."""
    if data.startswith(b"\r\n", start) or data.startswith(b"\n", start):
        return None, None, data.find(b"\n", start) + 1
    i = data.find(b"\n\r\n", start, end)
    j = data.find(b"\n\n", start, end)
    cands = [x for x in (i, j) if x >= 0]
    hend = min(cands) + 1 if cands else end
    body = data.find(b"\n", hend, end) + 1 if cands else end
    ct = cte = None
    for m in _PART_HDR.finditer(data, start, hend):
        if m.group(1).lower() == b"content-type":
            ct = ct if ct is not None else m.group(2)
        else:
            cte = cte if cte is not None else m.group(2)
    return ct, cte, body


def _text(b: bytes) -> str:
    return re.sub(r"\r?\n(?=[ \t])", "", b.decode("utf-8", "replace"))


def check_mime(data: bytes, parsed: ParsedHeaders, max_depth: int = 30) -> list[Finding]:
    """MIME structure findings (hdr.mime, hdr.mime_close) of the whole message."""
    out: list[Finding] = []
    if not parsed.has("content-type") and not parsed.has("content-transfer-encoding"):
        return out
    ct = parsed.get("content-type")
    cte = parsed.get("content-transfer-encoding")
    _walk(data, ct, cte, parsed.body_start, len(data), 0, max_depth, out, "message")
    return out


def _walk(data: bytes, ct: str | None, cte: str | None, start: int, end: int, depth: int,
          max_depth: int, out: list[Finding], where: str) -> None:
    if len(out) >= 5:
        return
    if cte is not None and not _cte_ok(cte):
        out.append(Finding("hdr.mime", f"unknown Content-Transfer-Encoding {_clip(cte.strip(), 40)!r} in {where}"))
    if ct is None:
        return
    parsed = parse_content_type(ct)
    if parsed is None:
        out.append(Finding("hdr.mime", f"Content-Type {_clip(ct.strip(), 50)!r} in {where} does not parse"))
        return
    mtype, params = parsed
    if mtype == "message/rfc822" and depth < max_depth:
        _sub_part(data, start, end, depth, max_depth, out, f"{where} > message/rfc822")
        return
    if not mtype.startswith("multipart/"):
        return
    if depth >= max_depth:
        out.append(Finding("hdr.mime", f"MIME nesting deeper than {max_depth}"))
        return
    boundary = params.get("boundary")
    if not boundary:
        out.append(Finding("hdr.mime", f"{mtype} in {where} has no boundary parameter"))
        return
    delim = b"--" + boundary.encode("utf-8", "surrogateescape")
    dl = len(delim)
    pos = start
    part_start = -1
    nparts = 0
    closed = False
    while True:
        i = data.find(delim, pos, end)
        if i < 0:
            break
        pos = i + dl
        if i != start and data[i - 1] != 0x0A:
            continue  # not at a line start
        tail_end = data.find(b"\n", pos, end)
        tail = data[pos:tail_end if tail_end >= 0 else end]
        is_close = tail.startswith(b"--")
        rest = tail[2:] if is_close else tail
        if rest.strip(b" \t\r"):
            continue  # a longer boundary that merely starts with ours
        if part_start >= 0:
            # the CRLF before the delimiter belongs to the delimiter
            pend = i - 2 if data[i - 2:i] == b"\r\n" else i - 1
            _sub_part(data, part_start, max(pend, part_start), depth, max_depth, out, f"{where} > {mtype} part {nparts}")
        if is_close:
            closed = True
            break
        nparts += 1
        part_start = tail_end + 1 if tail_end >= 0 else end
    if nparts == 0:
        out.append(Finding("hdr.mime", f"{mtype} in {where}: boundary {_clip(boundary, 40)!r} never found"))
        return
    if not closed:
        if part_start >= 0:
            _sub_part(data, part_start, end, depth, max_depth, out, f"{where} > {mtype} part {nparts}")
        out.append(Finding("hdr.mime_close", f"{mtype} in {where}: closing boundary {_clip(boundary, 40)!r} not found"))


def _sub_part(data: bytes, start: int, end: int, depth: int, max_depth: int, out: list[Finding], where: str) -> None:
    ct_b, cte_b, body = _part_headers(data, start, end)
    if ct_b is None and cte_b is None:
        return
    _walk(data, _text(ct_b) if ct_b is not None else None, _text(cte_b) if cte_b is not None else None,
          body, end, depth + 1, max_depth, out, where)


# --------------------------------------------------------------------------------------
# Received (RFC 5321 4.4) - just enough to know which hosts a trace line names
# --------------------------------------------------------------------------------------

_RCVD_FROM = re.compile(r"(?:^|[\s;)])from\s+([^\s;(),]+)", re.I)
_RCVD_BY = re.compile(r"(?:^|[\s;)])by\s+([^\s;(),]+)", re.I)
_RCVD_WITH = re.compile(r"(?:^|[\s;)])with\s+([^\s;()]+)", re.I)
_RCVD_ID = re.compile(r"(?:^|[\s;)])id\s+([^\s;()]+)", re.I)
_RCVD_FOR = re.compile(r"(?:^|[\s;)])for\s+<?([^\s;()>]+)", re.I)
_RCVD_IP = re.compile(r"\[(?:IPv6:)?([0-9A-Fa-f:.]+)\]")
_RCVD_HELO = re.compile(r"\b(?:helo|ehlo)\s*[= ]\s*([^\s;()\]]+)", re.I)


def parse_received(value: str) -> dict[str, str]:
    """The clauses of a Received value that matter for trace checks; never raises.

    Keys (present when found): from, by, with, id, for, ip, helo. Only the part
    before the ";" that precedes the date is searched.
    """
    semi = value.rfind(";")
    head = value[:semi] if semi >= 0 else value
    out: dict[str, str] = {}
    for key, rx in (("from", _RCVD_FROM), ("by", _RCVD_BY), ("with", _RCVD_WITH),
                    ("id", _RCVD_ID), ("for", _RCVD_FOR), ("ip", _RCVD_IP), ("helo", _RCVD_HELO)):
        m = rx.search(head)
        if m:
            out[key] = m.group(1)
    return out


# --------------------------------------------------------------------------------------
# The rules
# --------------------------------------------------------------------------------------


def check_structure(data: bytes, parsed: ParsedHeaders, settings: HeaderSettings, now: float | None,
                    ) -> list[Finding]:
    """RFC 5322 structural findings (hdr.*). ``now`` is epoch seconds, None = no window."""
    out: list[Finding] = list(parsed.defects)
    idx = parsed.index
    for name in REQUIRED:
        if name not in idx:
            out.append(Finding("hdr.required", f"missing {_CANON[name]} header"))
    for name in SINGULAR:
        pos = idx.get(name)
        if pos is not None and len(pos) > 1:
            out.append(Finding("hdr.duplicate", f"duplicate {_CANON[name]} header"))
    # addresses
    from_boxes: list[Mailbox] | None = None
    for name, allow_group in ADDRESS_FIELDS.items():
        for i in idx.get(name, ()):
            fname, value = parsed.fields[i]
            if not value.strip():
                if name == "bcc":
                    continue  # RFC 5322 3.6.3: Bcc may be empty
                out.append(Finding("hdr.address", f"{fname} header is empty"))
                continue
            try:
                boxes = parse_address_list(value, allow_group=allow_group)
            except HeaderSyntaxError as exc:
                out.append(Finding("hdr.address", f"{fname} header does not parse: {exc}"))
                continue
            if name == "from":
                if not boxes:
                    out.append(Finding("hdr.address", "From header holds no mailbox"))
                from_boxes = boxes if from_boxes is None else from_boxes
            elif name in ("sender", "resent-sender") and len(boxes) != 1:
                out.append(Finding("hdr.address", f"{fname} must hold exactly one mailbox"))
    if from_boxes is not None and len(from_boxes) > 1 and "sender" not in idx:
        out.append(Finding("hdr.from_sender", f"From holds {len(from_boxes)} mailboxes and there is no Sender"))
    # date
    date = parsed.get("date")
    if date is not None:
        try:
            dt = parse_date(date)
        except ValueError as exc:
            out.append(Finding("hdr.date", f"Date {_clip(date, 40)!r}: {exc}"))
        else:
            if now is not None:
                delta = dt.timestamp() - now
                if delta > settings.date_future_seconds:
                    out.append(Finding("hdr.date_window",
                                       f"Date is {_human(delta)} in the future (limit {_human(settings.date_future_seconds)})"))
                elif -delta > settings.date_past_seconds:
                    out.append(Finding("hdr.date_window",
                                       f"Date is {_human(-delta)} in the past (limit {_human(settings.date_past_seconds)})"))
    # message-id
    mid = parsed.get("message-id")
    if mid is None:
        out.append(Finding("hdr.message_id_missing", "no Message-ID header"))
    elif not valid_message_id(mid):
        out.append(Finding("hdr.message_id", f"Message-ID {_clip(mid, 50)!r} is not <left@right>"))
    # encoded-words
    for fname, value in parsed.fields:
        if "=?" in value:
            try:
                decode_words(value)
            except EncodedWordError as exc:
                out.append(Finding("hdr.encoded_word", f"{fname}: {exc}"))
                break
    # MIME
    out.extend(check_mime(data, parsed, settings.mime_max_depth))
    return out


def _human(seconds: float) -> str:
    s = int(abs(seconds))
    if s >= 86400:
        return f"{s / 86400:.1f} days"
    if s >= 3600:
        return f"{s / 3600:.1f} hours"
    if s >= 60:
        return f"{s // 60} minutes"
    return f"{s} seconds"


# --- trace (P-PATH) ------------------------------------------------------------------------


def check_trace(parsed: ParsedHeaders, settings: HeaderSettings, hostnames: list[str] | tuple[str, ...],
                trace_header: str = "X-Gateway-Trace") -> list[Finding]:
    """Client-supplied trace that claims to be the gateway's (trace.*)."""
    out: list[Finding] = []
    if parsed.has(trace_header):
        out.append(Finding("trace.forged_header", f"client supplied the gateway's own {trace_header} header"))
    own = {h.lower().rstrip(".") for h in hostnames if h}
    if own:
        for value in parsed.get_all("received"):
            low = value.lower()
            if not any(h in low for h in own):
                continue  # cheap pre-filter: most trace lines name none of our hosts
            r = parse_received(value)
            for clause in ("by", "from", "helo"):
                host = r.get(clause)
                if host and host.lower().rstrip(".") in own:
                    out.append(Finding("trace.forged_received",
                                       f"Received header claims {clause} {host}, a host of this gateway"))
                    return out
    return out


# --- misleading headers (P-SUBJ / P-FORGE) ------------------------------------------------------

_FAKE_REPLY = re.compile(r"\s*(re|fwd?|aw|antw|tr)\s*(?:\[\d+\]|\(\d+\))?\s*:", re.I)
_OBFUSCATION = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_EMAIL_IN_NAME = re.compile(r"[^\s<>\"'@(),;:\[\]]+@((?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
                            r"[A-Za-z][A-Za-z0-9-]*[A-Za-z0-9])")
_DOMAIN_IN_NAME = re.compile(r"(?<![\w@.\-])((?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
                             r"([A-Za-z]{2,24}|xn--[A-Za-z0-9-]+))(?![\w@\-]|\.[A-Za-z0-9])")
# Top-level domains that ordinary words rarely end in ("St.Louis" must not count as a domain).
_COMMON_TLDS = frozenset("""com net org info biz edu gov mil int name pro mobi asia tel aero coop jobs
travel io app dev xyz online site shop store club top live email link click page cloud tech ai
icu vip win bid loan work fun space website digital today news blog group global world agency
services solutions support company business finance bank money pay""".split())
_LIST_HEADERS = ("list-id", "list-unsubscribe", "list-post", "list-help", "x-mailman-version",
                 "mailing-list", "x-majordomo-version")
_SECOND_LEVEL = frozenset("co com net org gov edu ac ne or go gob mil nic ltd plc sch".split())
_LOOKALIKE = str.maketrans({"0": "o", "1": "l", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s", "|": "l"})


def org_domain(domain: str) -> str:
    """A cheap organizational-domain guess (last two labels, three under co.uk-style suffixes)."""
    labels = domain.lower().rstrip(".").split(".")
    if len(labels) >= 3 and len(labels[-1]) == 2 and labels[-2] in _SECOND_LEVEL:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


def related_domains(a: str, b: str) -> bool:
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    return a == b or a.endswith("." + b) or b.endswith("." + a) or org_domain(a) == org_domain(b)


def is_bulk(parsed: ParsedHeaders, extra: dict) -> bool:
    """List or bulk mail: registry said so, or the message says so itself."""
    if extra.get("list_id") or extra.get("bulk"):
        return True
    for h in _LIST_HEADERS:
        if h in parsed.index:
            return True
    prec = parsed.get("precedence")
    return prec is not None and prec.strip().lower() in ("bulk", "list")


def display_domains(display: str) -> list[str]:
    """Domains a display name shows: those of e-mail addresses and bare domain names."""
    found = [m.group(1).lower() for m in _EMAIL_IN_NAME.finditer(display)]
    rest = _EMAIL_IN_NAME.sub(" ", display) if found else display
    for m in _DOMAIN_IN_NAME.finditer(rest):
        tld = m.group(2).lower()
        if len(tld) == 2 or tld in _COMMON_TLDS or tld.startswith("xn--"):
            found.append(m.group(1).lower())
    return found


def brand_in_name(display: str, brands: dict[str, str]) -> tuple[str, str] | None:
    if not brands:
        return None
    norm = " " + re.sub(r"[^a-z0-9]+", " ", display.lower().translate(_LOOKALIKE)) + " "
    for brand, dom in brands.items():
        b = " " + re.sub(r"[^a-z0-9]+", " ", brand.lower()).strip() + " "
        if b in norm:
            return brand, dom
    return None


def check_subject(parsed: ParsedHeaders, settings: HeaderSettings, extra: dict) -> list[Finding]:
    """Misleading-header findings (subj.*)."""
    out: list[Finding] = []
    bulk = is_bulk(parsed, extra)
    subject = parsed.get("subject")
    if subject is not None:
        decoded = decode_lenient(subject)
        if _FAKE_REPLY.match(decoded) and not (parsed.has("in-reply-to") or parsed.has("references")):
            marker = decoded.strip().split(":", 1)[0].strip()
            fid = "subj.fake_reply_bulk" if bulk else "subj.fake_reply"
            kind = "list/bulk mail" if bulk else "message"
            out.append(Finding(fid, f"{kind} Subject starts with {marker + ':'!r} but has no In-Reply-To or References"))
        m = _OBFUSCATION.search(decoded)
        if m:
            out.append(Finding("subj.obfuscated",
                               f"Subject decodes to control or bidi character U+{ord(m.group()):04X}"))
    from_value = parsed.get("from")
    boxes: list[Mailbox] = []
    if from_value is not None:
        try:
            boxes = parse_address_list(from_value, allow_group=False)
        except HeaderSyntaxError:
            boxes = []
    for box in boxes:
        display = decode_lenient(box.display)
        if box.comment:
            display = f"{display} {decode_lenient(box.comment)}".strip()
        if not display:
            continue
        dom = box.domain_lower.strip("[]")
        for shown in display_domains(display):
            if not related_domains(shown, dom):
                out.append(Finding("subj.display_name",
                                   f"From display name shows {shown} but the address is in {dom}"))
                break
        hit = brand_in_name(display, settings.brand_domains)
        if hit and not related_domains(hit[1], dom):
            out.append(Finding("subj.brand",
                               f"From display name names {hit[0]} (would impersonate {hit[1]}) but the address is in {dom}"))
    if bulk and boxes:
        for value in parsed.get_all("reply-to"):
            try:
                rts = parse_address_list(value)
            except HeaderSyntaxError:
                continue
            for rt in rts:
                if not any(related_domains(rt.domain, b.domain) for b in boxes):
                    out.append(Finding("subj.reply_to_domain",
                                       f"list/bulk mail with Reply-To in {rt.domain_lower}, From in {boxes[0].domain_lower}"))
                    break
    return out


# --------------------------------------------------------------------------------------
# Shared by the check modules: parse the header block once per message
# --------------------------------------------------------------------------------------

_CACHE_KEY = "_parsed_headers"


def parsed_for(tx) -> ParsedHeaders:  # type: ignore[no-untyped-def]
    """The parsed header block of ``tx.message``, cached in ``tx.extra``."""
    data = tx.message or b""
    hit = tx.extra.get(_CACHE_KEY)
    if hit is not None and hit[0] is data:
        return hit[1]
    parsed = parse_headers(data)
    tx.extra[_CACHE_KEY] = (data, parsed)
    return parsed
