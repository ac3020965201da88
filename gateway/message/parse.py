"""RFC 5322 / MIME parsing of a message's header block (issue 5).

Only the header block is parsed with Python code; the body is touched by the
MIME walk alone, and that walks boundaries with ``bytes.find``, so a 25 MiB
message costs about what its header block and boundary lines cost.

Here: the header block (:func:`parse_headers` -> :class:`ParsedHeaders`),
address lists, dates, Message-ID, encoded words, content types, the MIME walk,
Received clauses, and :func:`parsed_for` (one parse per message for the check
modules). Everything is pure: bytes in, parsed values and syntax findings out.
The policy rules over the parse are in :mod:`gateway.message.rules`.
"""
from __future__ import annotations

import base64
import binascii
import codecs
import functools
import re
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Any, Protocol

from .findings import Finding
from .wire import header_end

# --------------------------------------------------------------------------------------
# Header block
# --------------------------------------------------------------------------------------

_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+\Z")


@dataclass(slots=True)
class ParsedHeaders:
    """The header block of one message, fields in order, values unfolded."""

    fields: list[tuple[str, str]]           # (name as sent, unfolded value, leading WSP stripped)
    body_start: int                         # offset of the first body byte in the message
    defects: list[Finding] = field(default_factory=list)  # field-name / folding / utf-8 findings
    index: dict[str, list[int]] = field(default_factory=dict)  # lower-case name -> positions
    # per-message results shared by the rule functions (address lists, ...);
    # keyed by the field value, so it can never go stale.
    memo: dict = field(default_factory=dict, compare=False, repr=False)

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


# A well-formed field at a line start: name, colon, value with its continuation lines.
_FIELD_LINE = re.compile(r"^([\x21-\x39\x3b-\x7e]+):([^\n]*(?:\n[ \t][^\n]*)*)\n", re.M)
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
        # fast path: one findall of whole fields (name, colon, value with its
        # continuation lines), anchored at line starts. Every line that is not a
        # continuation must start a field, so the block is well formed exactly
        # when there are as many fields as such lines; any irregularity falls
        # back to the line walk.
        found = _FIELD_LINE.findall(text)
        lines = text.count("\n")
        if "\n " in text or "\n\t" in text:
            lines -= text.count("\n ") + text.count("\n\t")
            fields = [(name, (value.replace("\r\n", "").replace("\n", "") if "\n" in value else value).strip(" \t\r"))
                      for name, value in found]
        else:
            fields = [(name, value.strip(" \t\r")) for name, value in found]
        if len(found) == lines:
            index: dict[str, list[int]] = {}
            for i, (name, _) in enumerate(found):
                low = name.lower()
                pos = index.get(low)
                if pos is None:
                    index[low] = [i]
                else:
                    pos.append(i)
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
    # only the first defect of each kind is recorded
    folding_seen = any(d.id == "hdr.folding" for d in defects)
    name_seen = any(d.id == "hdr.field_name" for d in defects)
    for n, line in enumerate(lines, 1):
        if line.endswith("\r"):
            line = line[:-1]
        if line[:1] in (" ", "\t"):
            if name is None:
                if not folding_seen:
                    folding_seen = True
                    defects.append(Finding("hdr.folding", f"header line {n} is a continuation with no field before it"))
                continue
            if not line.strip(" \t"):
                if not folding_seen:
                    folding_seen = True
                    defects.append(Finding("hdr.folding", f"folded line {n} of {name} holds only white space"))
            parts.append(line)
            continue
        if name is not None:
            _add_field(fields, index, name, parts)
            name = None
        colon = line.find(":")
        if colon <= 0:
            if not name_seen:
                name_seen = True
                what = "starts with a colon" if colon == 0 else "has no colon"
                defects.append(Finding("hdr.field_name", f"header line {n} {what}: {clip(line)!r}"))
            continue
        fname = line[:colon]
        if not _FIELD_NAME.match(fname):
            stripped = fname.rstrip(" \t")
            if not name_seen:
                name_seen = True
                why = ("white space before the colon" if stripped and _FIELD_NAME.match(stripped)
                       else "characters outside printable ASCII")
                defects.append(Finding("hdr.field_name", f"field name {clip(fname)!r} has {why}"))
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


def clip(s: str, n: int = 60) -> str:
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
# atext or any non-ASCII character (RFC 6532 UTF-8, surrogate-escaped bytes too):
# one character class, so the regex engine runs it as a tight single-character loop
# (the same set as the alternation "[atext]|[^\x00-\x7f]").
_ATEXT_U = rf"[{_ATEXT}\x80-\U0010ffff]"
_TOKEN = re.compile(
    r'(?P<ws>[ \t\r\n]+)'
    rf'|(?P<atom>{_ATEXT_U}+)'
    r'|(?P<qs>"(?:[^"\\]|\\[\s\S])*")'
    r'|(?P<dl>\[(?:[^\[\]\\]|\\[\s\S])*\])'
    r'|(?P<sp>[<>@,;:.])'
    r'|(?P<cm>\()'
)
_COMMENT = re.compile(r"\((?:[^()\\]|\\[\s\S])*\)")
_QP_UNESCAPE = re.compile(r"\\(.)")  # a quoted-pair; no re.S, as the re.sub calls it replaces
_SIMPLE_ADDR = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*@[{_ATEXT}]+(?:\.[{_ATEXT}]+)*\Z")
_DOT_ATOM = rf"{_ATEXT_U}+(?:\.{_ATEXT_U}+)*"
_WORD_U = rf"{_ATEXT_U}+"
# One mailbox of the forms nearly all software writes, then "," or the end:
# ["Quoted"|Plain Words] <local@domain>   or   local@domain
_FAST_BOX = re.compile(
    rf'[ \t]*(?:(?:"([^"\\\r\n]*(?:\\.[^"\\\r\n]*)*)"|({_WORD_U}(?:[ \t]+{_WORD_U})*))?[ \t]*<({_DOT_ATOM})@({_DOT_ATOM})>'
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
            toks.append((kind, m.group()))  # type: ignore[arg-type]  # every alternative is a named group: lastgroup is set
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
    if "<" not in v and _SIMPLE_ADDR.match(v):  # fast path: the bare addr-spec most software writes
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
            display = (_QP_UNESCAPE.sub(r"\1", q) if "\\" in q else q) if q is not None else (plain or "")
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


def address_count(value: str, allow_group: bool) -> tuple[int, HeaderSyntaxError | None]:
    """(len(parse_address_list(value, allow_group=...)), None) or (0, the error),
    without building Mailbox objects for the plain forms (same fast paths)."""
    v = value.strip()
    if "<" not in v and _SIMPLE_ADDR.match(v):
        return 1, None
    count, pos, n = 0, 0, len(v)
    match = _FAST_BOX.match
    while pos < n:
        m = match(v, pos)
        if m is None:
            break
        count += 1
        pos = m.end()
        if not m.group(7):
            return count, None
    else:
        return count, None
    # The mailboxes before v[pos] are complete and each followed by ",": the full
    # parser reaches v[pos] in the same state (tokens never span that comma), so only
    # the rest needs it. Comments, which the full parser spreads over every mailbox,
    # do not change the count.
    # (str.strip() also drops white space such as U+00A0 that the tokenizer does
    # not skip: then the full value goes to the full parser, as parse_address_list does.)
    rest = v[pos:] if len(v) == len(value.strip(" \t\r\n")) else value
    try:
        return (count if rest is not value else 0) + len(_AddrParser(_tokenize(rest)).address_list(allow_group)), None
    except HeaderSyntaxError as exc:
        return 0, exc


def parsed_address_list(parsed: ParsedHeaders, value: str, allow_group: bool
                        ) -> tuple[list[Mailbox], HeaderSyntaxError | None]:
    """``parse_address_list(value, allow_group=...)`` once per message: (mailboxes, None)
    or ([], the error). The rule functions and the checks share the result through
    ``parsed.memo`` (:func:`check_structure` parses From with ``allow_group=False``);
    callers must not change the returned list."""
    key = ("addr", value, allow_group)
    hit = parsed.memo.get(key)
    if hit is None:
        try:
            hit = (parse_address_list(value, allow_group=allow_group), None)
        except HeaderSyntaxError as exc:
            hit = ([], exc)
        parsed.memo[key] = hit
    return hit


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


# The form nearly all software writes ("Tue, 14 Nov 2023 22:13:20 +0000", optionally
# with a "(UTC)"-style comment): a strict subset of what _DATE accepts, with the same
# groups, so date_timestamp can skip the general pattern and the tz objects.
_DATE_FAST = re.compile(
    r"(?:(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), )?([0-9]{1,2}) (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) "
    r"([0-9]{4}) ([0-9]{2}):([0-9]{2}):([0-9]{2}) (?:([+-])([0-9]{2})([0-9]{2})|GMT)(?: \([A-Za-z]{1,5}\))?\Z")
_MONTHS_CAP = {m.capitalize(): i for m, i in _MONTHS.items()}
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_NUM2 = {f"{i:02d}": i for i in range(100)} | {str(i): i for i in range(10)}  # "07"/"7" -> 7, no int() calls


def date_timestamp(value: str) -> float:
    """``parse_date(value).timestamp()``, with a fast path for the common form."""
    m = _DATE_FAST.match(value)
    if m is not None:
        day, mon, year, hh, mm, ss, sign, zh, zm = m.groups()
        h, mi, sec = _NUM2[hh], _NUM2[mm], _NUM2[ss]
        off: int | None = 0
        if sign is not None:
            oh, om = _NUM2[zh], _NUM2[zm]
            off = None if om >= 60 or oh > 23 else (oh * 60 + om) * (60 if sign == "+" else -60)
        if off is not None and h <= 23 and mi <= 59 and sec <= 59:
            try:
                days = date(int(year), _MONTHS_CAP[mon], _NUM2[day]).toordinal() - _EPOCH_ORDINAL
            except ValueError:
                pass  # impossible date: parse_date says why
            else:
                return float(days * 86400 + h * 3600 + mi * 60 + sec - off)
    return parse_date(value).timestamp()


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


@functools.lru_cache(maxsize=256)
def _codec_for(charset: str) -> str:
    """The codec an encoded-word charset is decoded with (LookupError if none);
    failures are not cached.

    A charset is an ASCII token (RFC 2047 2): a name with an 8-bit byte, a NUL
    or a control is no charset, and neither is a codec that does not turn
    bytes into text (base64, zlib, rot13, "undefined")."""
    if not charset.isascii() or not charset.isprintable():
        raise LookupError(f"not a charset name: {charset!r}")
    try:
        info = codecs.lookup(charset)
    except ValueError:  # e.g. "embedded null character" from a name lookup() rejects late
        raise LookupError(f"not a charset name: {charset!r}") from None
    if not getattr(info, "_is_text_encoding", True) or info.name == "undefined":
        raise LookupError(f"not a text charset: {charset!r}")
    return _SUPERSET.get(info.name, info.name)


def _ew_bytes(m: re.Match[str]) -> tuple[str, bytes]:
    charset, enc, text = m.group(1), m.group(2), m.group(3)
    try:
        codec = _codec_for(charset)
    except LookupError:
        raise EncodedWordError(f"unknown charset {charset!r} in encoded-word") from None
    if not text.isascii():
        # RFC 2047 5: an encoded-word is ASCII only (UTF-8 headers of SMTPUTF8
        # mail may carry raw UTF-8, but not inside an encoded-word).
        raise EncodedWordError(f"non-ASCII character inside encoded-word {clip(m.group(0), 40)!r}")
    if enc in "Bb":
        raw = text.encode("ascii")
        try:
            data = base64.b64decode(raw + b"=" * (-len(raw) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise EncodedWordError(f"bad base64 in encoded-word {clip(m.group(0), 40)!r}") from None
    else:
        raw = text.encode("ascii")
        n_eq = raw.count(b"=")
        if not n_eq:
            data = raw.replace(b"_", b" ")
        elif n_eq == len(_Q_HEX.findall(raw)):
            # every "=" starts a valid =XX escape: binascii decodes exactly like the
            # regex below ("_" is a space, "=XX" a byte, all else as is), in C
            data = binascii.a2b_qp(raw, header=True)
        else:
            data = _Q_HEX.sub(_q_byte, raw.replace(b"_", b" "))
    return codec, data


def _q_byte(h: re.Match[bytes]) -> bytes:
    return bytes((int(h.group(1), 16),))


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
            except UnicodeError:  # UnicodeDecodeError, or a codec's own refusal
                raise EncodedWordError(f"encoded-word is not valid {pend_codec}: {clip(pend_src, 40)!r}") from None
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


def decoded_once(parsed: ParsedHeaders, value: str) -> tuple[str, EncodedWordError | None]:
    """``decode_words(value)`` once per message: (text, None), or (value, the error)."""
    if "=?" not in value:
        return value, None
    key = ("ew", value)
    hit = parsed.memo.get(key)
    if hit is None:
        try:
            hit = (decode_words(value), None)
        except EncodedWordError as exc:
            hit = (value, exc)
        parsed.memo[key] = hit
    return hit


def decode_lenient(value: str) -> str:
    try:
        return decode_words(value)
    except EncodedWordError:
        return value


# --------------------------------------------------------------------------------------
# MIME structure (RFC 2045 / 2046), walked with bytes.find
# --------------------------------------------------------------------------------------

_CT = re.compile(r"\s*([!#$%&'*+\-.^_`|~0-9A-Za-z]+)\s*/\s*([!#$%&'*+\-.^_`|~0-9A-Za-z]+)\s*(.*)\Z", re.S)
_PARAM = re.compile(r'''\s*;\s*([^\s=;"]+)\s*=\s*("[^"\\]*(?:\\.[^"\\]*)*"|[^\s;"]*)''', re.S)
_UNFOLD = re.compile(r"\r?\n(?=[ \t])")
KNOWN_CTE = frozenset(("7bit", "8bit", "binary", "quoted-printable", "base64"))
_PART_HDR = re.compile(rb"^(content-type|content-transfer-encoding)[ \t]*:((?:[^\r\n]*(?:\r?\n[ \t][^\r\n]*)*))",
                       re.I | re.M)


def parse_content_type(value: str) -> tuple[str, dict[str, str]] | None:
    """("type/subtype" lower-case, params with lower-case names) or None if it does not parse.

    Comments are removed outside quoted strings only (inside one, "(" is an
    ordinary character: ``boundary="Boundary_(ID_x)"``); quoted strings are
    unquoted, quoted-pairs undone; RFC 2231 parameters (``name*=``,
    ``name*0=``, ``name*1*=``, charset and language, %-encoding) are joined
    and decoded under their plain name, and win over a plain fallback of the
    same name. Malformed RFC 2231 input is read leniently (never an error):
    sections in numeric order even with gaps, a bad %-escape kept as text,
    an unknown charset read as UTF-8 with replacement characters.
    """
    split = _ct_split(value)
    if split is None:
        return None
    return split[0], _ct_params(split[1])


def _strip_comments(value: str) -> str:
    """``value`` with every comment outside quoted strings replaced by a space
    (RFC 5322 3.2.2 / RFC 2045 5.1; nested comments and quoted-pairs in both
    honoured). A comment that is never closed is left as text, as is an
    unclosed quoted string."""
    if "(" not in value:
        return value
    out: list[str] = []
    i, n, start = 0, len(value), 0
    while i < n:
        c = value[i]
        if c == '"':  # skip the quoted string, quoted-pairs included
            i += 1
            while i < n and value[i] != '"':
                i += 2 if value[i] == "\\" else 1
            i += 1
            continue
        if c != "(":
            i += 1
            continue
        depth, j = 0, i
        while j < n:
            d = value[j]
            if d == "\\":
                j += 2
                continue
            if d == "(":
                depth += 1
            elif d == ")":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        if j >= n:  # unclosed: not a comment after all
            break
        out.append(value[start:i])
        out.append(" ")
        i = start = j + 1
    out.append(value[start:])
    return "".join(out)


def _ct_split(value: str) -> tuple[str, str] | None:
    """("type/subtype" lower-case, the unparsed parameter text) or None if it does not parse.
    The parameters never make a Content-Type unparseable, so the MIME walk only
    parses them for the types that need one (multipart: boundary)."""
    value = _strip_comments(value)
    m = _CT.match(value)
    if not m:
        return None
    return f"{m.group(1).lower()}/{m.group(2).lower()}", m.group(3)


# RFC 2231 parameter names: "name*" (encoded), "name*0" (section), "name*0*" (encoded section)
_RFC2231_NAME = re.compile(r"([^*]+)\*(?:(\d{1,4})(\*)?)?\Z")
_PCT = re.compile(rb"%([0-9A-Fa-f]{2})")


def _ct_params(rest: str) -> dict[str, str]:
    params: dict[str, str] = {}
    if not rest:
        return params
    extended: dict[str, dict[int, tuple[bool, str]]] | None = None
    for name, v in _PARAM.findall(rest):
        if v.startswith('"'):
            v = v[1:-1]
            if "\\" in v:
                v = _QP_UNESCAPE.sub(r"\1", v)
        name = name.lower()
        if "*" in name:
            m = _RFC2231_NAME.match(name)
            if m is not None:
                base, section, star = m.groups()
                # "name*" alone is section -1: used only when there are no numbered sections
                key, encoded = (-1, True) if section is None else (int(section), star is not None)
                if extended is None:
                    extended = {}
                extended.setdefault(base, {}).setdefault(key, (encoded, v))
                continue
        params.setdefault(name, v)
    if extended:
        for base, sections in extended.items():
            params[base] = _join_rfc2231(sections)
    return params


def _join_rfc2231(sections: dict[int, tuple[bool, str]]) -> str:
    """The value of one RFC 2231 parameter from its sections (section -1 = "name*")."""
    numbered = sorted(k for k in sections if k >= 0)
    order = numbered if numbered else [-1]
    charset: str | None = None
    raw = bytearray()
    for pos, key in enumerate(order):
        encoded, v = sections[key]
        if pos == 0 and encoded:
            # charset'language'text (RFC 2231 4); both may be empty
            parts = v.split("'", 2)
            if len(parts) == 3:
                charset, v = parts[0] or None, parts[2]
        b = v.encode("utf-8", "surrogateescape")
        raw += _PCT.sub(_pct_byte, b) if encoded and b"%" in b else b
    codec = "utf-8"
    if charset is not None:
        try:
            codec = _codec_for(charset)
        except LookupError:
            pass
    return bytes(raw).decode(codec, "replace")


def _pct_byte(h: re.Match[bytes]) -> bytes:
    return bytes((int(h.group(1), 16),))


def _cte_ok(cte: str) -> bool:
    c = cte.strip().lower()
    if "(" in c:
        c = _strip_comments(c).strip()
    return c in KNOWN_CTE or c.startswith("x-")


def _part_headers(data: bytes, start: int, end: int) -> tuple[bytes | None, bytes | None, int]:
    """Content-Type and Content-Transfer-Encoding of the part at data[start:end], and its body start."""
    if data.startswith(b"\r\n", start) or data.startswith(b"\n", start):
        return None, None, data.find(b"\n", start) + 1
    # as wire.header_end: the "\n\n" search is bounded by a "\n\r\n" found first
    i = data.find(b"\n\r\n", start, end)
    j = data.find(b"\n\n", start, i + 1 if i >= 0 else end)
    if i < 0 and j < 0:
        hend = body = end
    else:
        hend = (j if j >= 0 else i) + 1
        body = data.find(b"\n", hend, end) + 1
    ct = cte = None
    for name, value in _PART_HDR.findall(data, start, hend):
        if len(name) == 12:  # "content-type"; the other alternative is 25 long
            if ct is None:
                ct = value
        elif cte is None:
            cte = value
    return ct, cte, body


def _text(b: bytes) -> str:
    t = b.decode("utf-8", "replace")
    return _UNFOLD.sub("", t) if "\n" in t else t


def check_mime(data: bytes, parsed: ParsedHeaders, max_depth: int = 30) -> list[Finding]:
    """MIME structure findings (hdr.mime, hdr.mime_close) of the whole message."""
    out: list[Finding] = []
    idx = parsed.index
    if "content-type" not in idx and "content-transfer-encoding" not in idx:
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
        out.append(Finding("hdr.mime", f"unknown Content-Transfer-Encoding {clip(cte.strip(), 40)!r} in {where}"))
    if ct is None:
        return
    split = _ct_split(ct)
    if split is None:
        out.append(Finding("hdr.mime", f"Content-Type {clip(ct.strip(), 50)!r} in {where} does not parse"))
        return
    mtype = split[0]
    if mtype == "message/rfc822" and depth < max_depth:
        _sub_part(data, start, end, depth, max_depth, out, f"{where} > message/rfc822")
        return
    if not mtype.startswith("multipart/"):
        return
    if depth >= max_depth:
        out.append(Finding("hdr.mime", f"MIME nesting deeper than {max_depth}"))
        return
    boundary = _ct_params(split[1]).get("boundary")
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
        out.append(Finding("hdr.mime", f"{mtype} in {where}: boundary {clip(boundary, 40)!r} never found"))
        return
    if not closed:
        if part_start >= 0:
            _sub_part(data, part_start, end, depth, max_depth, out, f"{where} > {mtype} part {nparts}")
        out.append(Finding("hdr.mime_close", f"{mtype} in {where}: closing boundary {clip(boundary, 40)!r} not found"))


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
# Shared by the check modules: parse the header block once per message
# --------------------------------------------------------------------------------------

class _Cached(Protocol):
    """What parsed_for needs of a transaction (core.transaction.Transaction)."""
    message: bytes | None
    parsed_headers: Any


def parsed_for(tx: _Cached) -> ParsedHeaders:
    """The parsed header block of ``tx.message``, cached in ``tx.parsed_headers``."""
    data = tx.message or b""
    hit = tx.parsed_headers
    if hit is not None and hit[0] is data:
        return hit[1]
    parsed = parse_headers(data)
    tx.parsed_headers = (data, parsed)
    return parsed
