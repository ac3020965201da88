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
import functools
import re
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone

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
                defects.append(Finding("hdr.field_name", f"header line {n} {what}: {_clip(line)!r}"))
            continue
        fname = line[:colon]
        if not _FIELD_NAME.match(fname):
            stripped = fname.rstrip(" \t")
            if not name_seen:
                name_seen = True
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


def _address_count(value: str, allow_group: bool) -> tuple[int, HeaderSyntaxError | None]:
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
# groups, so _date_timestamp can skip the general pattern and the tz objects.
_DATE_FAST = re.compile(
    r"(?:(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), )?([0-9]{1,2}) (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) "
    r"([0-9]{4}) ([0-9]{2}):([0-9]{2}):([0-9]{2}) (?:([+-])([0-9]{2})([0-9]{2})|GMT)(?: \([A-Za-z]{1,5}\))?\Z")
_MONTHS_CAP = {m.capitalize(): i for m, i in _MONTHS.items()}
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_NUM2 = {f"{i:02d}": i for i in range(100)} | {str(i): i for i in range(10)}  # "07"/"7" -> 7, no int() calls


def _date_timestamp(value: str) -> float:
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
    failures are not cached."""
    codec = codecs.lookup(charset).name
    return _SUPERSET.get(codec, codec)


def _ew_bytes(m: re.Match[str]) -> tuple[str, bytes]:
    charset, enc, text = m.group(1), m.group(2), m.group(3)
    try:
        codec = _codec_for(charset)
    except LookupError:
        raise EncodedWordError(f"unknown charset {charset!r} in encoded-word") from None
    if not text.isascii():
        # RFC 2047 5: an encoded-word is ASCII only (UTF-8 headers of SMTPUTF8
        # mail may carry raw UTF-8, but not inside an encoded-word).
        raise EncodedWordError(f"non-ASCII character inside encoded-word {_clip(m.group(0), 40)!r}")
    if enc in "Bb":
        raw = text.encode("ascii")
        try:
            data = base64.b64decode(raw + b"=" * (-len(raw) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise EncodedWordError(f"bad base64 in encoded-word {_clip(m.group(0), 40)!r}") from None
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


def _decoded(parsed: ParsedHeaders, value: str) -> tuple[str, EncodedWordError | None]:
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
        out.append(Finding("hdr.mime", f"unknown Content-Transfer-Encoding {_clip(cte.strip(), 40)!r} in {where}"))
    if ct is None:
        return
    split = _ct_split(ct)
    if split is None:
        out.append(Finding("hdr.mime", f"Content-Type {_clip(ct.strip(), 50)!r} in {where} does not parse"))
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
    fields = parsed.fields
    if "from" not in idx:
        out.append(Finding("hdr.required", "missing From header"))
    if "date" not in idx:  # its own id: with an account the gateway may add one (RFC 6409 8)
        out.append(Finding("hdr.date_missing", "no Date header"))
    if len(idx) != len(fields):  # some field name occurs more than once
        for name in SINGULAR:
            pos = idx.get(name)
            if pos is not None and len(pos) > 1:
                out.append(Finding("hdr.duplicate", f"duplicate {_CANON[name]} header"))
    # addresses
    from_boxes: list[Mailbox] | None = None
    for name, allow_group in ADDRESS_FIELDS.items():
        positions = idx.get(name)
        if positions is None:
            continue
        for i in positions:
            fname, value = fields[i]
            if not value.strip():
                if name == "bcc":
                    continue  # RFC 5322 3.6.3: Bcc may be empty
                out.append(Finding("hdr.address", f"{fname} header is empty"))
                continue
            if name == "from":  # the mailboxes themselves are wanted by check_subject too
                boxes, err = parsed_address_list(parsed, value, allow_group)
                count = len(boxes)
            else:
                count, err = _address_count(value, allow_group)
            if err is not None:
                out.append(Finding("hdr.address", f"{fname} header does not parse: {err}"))
                continue
            if name == "from":
                if not boxes:
                    out.append(Finding("hdr.address", "From header holds no mailbox"))
                from_boxes = boxes if from_boxes is None else from_boxes
            elif name in ("sender", "resent-sender") and count != 1:
                out.append(Finding("hdr.address", f"{fname} must hold exactly one mailbox"))
    if from_boxes is not None and len(from_boxes) > 1 and "sender" not in idx:
        out.append(Finding("hdr.from_sender", f"From holds {len(from_boxes)} mailboxes and there is no Sender"))
    # date
    positions = idx.get("date")
    if positions:
        date_value = fields[positions[0]][1]
        try:
            ts = _date_timestamp(date_value)
        except ValueError as exc:
            out.append(Finding("hdr.date", f"Date {_clip(date_value, 40)!r}: {exc}"))
        else:
            if now is not None:
                delta = ts - now
                if delta > settings.date_future_seconds:
                    out.append(Finding("hdr.date_window",
                                       f"Date is {_human(delta)} in the future (limit {_human(settings.date_future_seconds)})"))
                elif -delta > settings.date_past_seconds:
                    out.append(Finding("hdr.date_window",
                                       f"Date is {_human(-delta)} in the past (limit {_human(settings.date_past_seconds)})"))
    # message-id
    positions = idx.get("message-id")
    if not positions:
        out.append(Finding("hdr.message_id_missing", "no Message-ID header"))
    else:
        mid = fields[positions[0]][1]
        if not valid_message_id(mid):
            out.append(Finding("hdr.message_id", f"Message-ID {_clip(mid, 50)!r} is not <left@right>"))
    # encoded-words
    for fname, value in fields:
        if "=?" in value:
            err = _decoded(parsed, value)[1]
            if err is not None:
                out.append(Finding("hdr.encoded_word", f"{fname}: {err}"))
                break
    # MIME
    if "content-type" in idx or "content-transfer-encoding" in idx:
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
    received = parsed.index.get("received")
    if not received:
        return out
    own = {h.lower().rstrip(".") for h in hostnames if h}
    if own:
        for i in received:
            value = parsed.fields[i][1]
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

# A reply marker at the start of the Subject: Re (every language), Aw (German
# "Antwort"), Antw (Dutch), any case, an optional counter ("Re[2]:", "Re(2):").
# Forward markers (Fwd/Fw, WG, TR, Doorst, RV, I) are deliberately not here: a
# forward starts a new thread (RFC 5322 3.6.4 ties In-Reply-To/References to
# replies), so a forward without them is normal and never a fake reply.
_REPLY_MARK = re.compile(r"\s*(re|aw|antw)\s*(?:\[\d+\]|\(\d+\))?\s*:", re.I)
# How much of the body the fake-reply rule reads for quoted text (hot path:
# only messages with a reply marker and no thread headers are searched at all).
REPLY_BODY_PREFIX = 32 * 1024
# Text of the earlier message quoted in the body, as the real clients write it
# (quotes_earlier_message). Searched in the lower-cased bytes as sent:
# quoted-printable leaves all of it readable (a "=3d" may stand for "=");
# base64 text is decoded first (_reply_texts). Every search starts with a
# literal (bytes.find, or a regex whose first character is a literal), so a
# 32 KiB body costs about a dozen C-speed scans.
_QUOTE_LINE_STARTS = (b">", b"&gt;")          # >-quoted lines (HTML-escaped in Hotmail/MSN)
# Outlook "-----Original Message-----" (and in German, French, Dutch, Spanish,
# Italian), Hotmail "----Original Message Follows----"
_SEPARATOR = re.compile(rb"---+[ \t]*(?:original message|urspr(?:\xc3\xbc|\xfc|=c3=bc|=fc|ue)ngliche nachricht"
                        rb"|message d'origine|oorspronkelijk bericht|mensaje original|messaggio originale)")
# HTML: Outlook / Exchange (Windows, Mac) reply header, Gmail, Yahoo
_HTML_MARKERS = (b"divrplyfwdmsg", b"olk_src_body_section")
_QUOTE_CLASSES = (b"gmail_", b"yahoo_")        # gmail_quote, yahoo_quoted: found through "quote"
_CITE = re.compile(rb"<blockquote[^>]{0,200}?type=(?:3d)?[\"']?cite")  # Apple Mail, Thunderbird
# Attribution lines end with a colon: "On .. Bob wrote:", AOL's "In a message
# dated .., Bob writes:", "Bob a écrit :", "Bob escribió:", "Bob ha scritto:";
# German and Dutch put the name after the verb: "Am .. schrieb Bob <b@x.de>:",
# "Op .. schreef Bob:". A colon at a line end (or before HTML markup) is found
# first, then the line before it is read.
_COLON_EOL = re.compile(rb":[ \t]*(?:\r?\n|<|=\r?\n|\Z)")
_ATTRIBUTION_ENDS = (b"wrote", b"writes", b"ha scritto", b"escribi\xc3\xb3", b"escribi\xf3", b"escribi=c3=b3",
                     b"escribi=f3", b"escribio", b"a \xc3\xa9crit", b"a \xe9crit", b"a =c3=a9crit", b"a =e9crit",
                     b"a &eacute;crit", b"a &#233;crit", b"a ecrit")
_ATTRIBUTION_VERBS = (b"schrieb", b"schreef")
# French puts a (no-break) space before the colon: "a écrit :", U+00A0 / U+202F, raw, QP or HTML
_TRAILING_SPACE = re.compile(rb"(?:[ \t\xa0]|\xc2\xa0|=c2=a0|=a0|&nbsp;|\xe2\x80\xaf|=e2=80=af)+\Z")
_SPACE_ENDS = (b" ", b"\t", b"\xa0", b"=a0", b"&nbsp;", b"\xaf", b"=af")
# Outlook's header block of the earlier message: "From: .." at a line start or
# right after an HTML tag, and on that line or the next "Sent: .." (bold
# "*From:*" in plain text, <b>From:</b> in HTML).
_HEADER_FROM = re.compile(rb"[\n>][ \t]*\*?(?:from|von|de|van)[ \t]?:")  # at a line start or after a tag
_SENT = re.compile(rb"(?:sent|gesendet|envoy[^\s:]{0,8}|verzonden|enviado|inviato)[ \t]?:")
_MAX_HITS = 64  # occurrences of one key examined per text
# a MIME part in the body prefix: boundary line, its header lines, then base64-alphabet lines
_B64_TEXT_PART = re.compile(
    rb"^--[^\r\n]*\r?\n((?:[^\r\n]+\r?\n){1,30}?)\r?\n([A-Za-z0-9+/=\r\n]+)", re.M)
_TEXT_PART = re.compile(rb"^content-type[ \t]*:[ \t]*text/", re.M)  # in lower-cased part headers
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
    if extra.get("list") is not None or extra.get("bulk"):
        return True
    if not parsed.index.keys().isdisjoint(_LIST_HEADERS):
        return True
    prec = parsed.get("precedence")
    return prec is not None and prec.strip().lower() in ("bulk", "list")


def display_text(box: Mailbox) -> str:
    """What a mail reader shows as the mailbox's name: the display name, and the text
    of comments around it (old ``addr (Name)`` form), encoded-words decoded."""
    display = decode_lenient(box.display)
    if box.comment:
        display = f"{display} {decode_lenient(box.comment)}".strip()
    return display


def display_domains(display: str) -> tuple[list[str], list[str]]:
    """Domains a display name shows: (domains of the e-mail addresses in it, bare domain names)."""
    # both patterns need a literal "@" / "." : most display names hold neither
    addresses = [m.group(1).lower() for m in _EMAIL_IN_NAME.finditer(display)] if "@" in display else []
    rest = _EMAIL_IN_NAME.sub(" ", display) if addresses else display
    bare: list[str] = []
    if "." not in rest:
        return addresses, bare
    for m in _DOMAIN_IN_NAME.finditer(rest):
        tld = m.group(2).lower()
        if len(tld) == 2 or tld in _COMMON_TLDS or tld.startswith("xn--"):
            bare.append(m.group(1).lower())
    return addresses, bare


def _own_domain(domain: str, own: tuple[str, ...]) -> bool:
    """``domain`` is one of ``own`` (the account's sender domains) or below one of them."""
    return any(domain == d or domain.endswith("." + d) for d in own)


def brand_in_name(display: str, brands: dict[str, str]) -> tuple[str, str] | None:
    if not brands:
        return None
    norm = " " + re.sub(r"[^a-z0-9]+", " ", display.lower().translate(_LOOKALIKE)) + " "
    for brand, dom in brands.items():
        b = " " + re.sub(r"[^a-z0-9]+", " ", brand.lower()).strip() + " "
        if b in norm:
            return brand, dom
    return None


def _reply_texts(data: bytes, parsed: ParsedHeaders) -> list[bytes]:
    """The first REPLY_BODY_PREFIX bytes of the body, and the base64 text in them
    decoded (a base64 body, or base64 text/* parts of a multipart)."""
    start = parsed.body_start
    raw = data[start:start + REPLY_BODY_PREFIX]
    out = [raw]
    cte = parsed.get("content-transfer-encoding")
    if cte is not None and cte.strip().lower() == "base64":
        ct = (parsed.get("content-type") or "text/plain").strip().lower()
        if ct.startswith("text/"):
            out.append(_b64_prefix(raw))
    elif b"ase64" in raw:  # cheap pre-filter for "base64"/"Base64"
        for m in _B64_TEXT_PART.finditer(raw):
            head = m.group(1).lower()
            if b"base64" in head and _TEXT_PART.search(head):
                out.append(_b64_prefix(m.group(2)))
    return out


def _b64_prefix(block: bytes) -> bytes:
    """The bytes a (possibly cut-off) base64 block decodes to, as far as it is whole."""
    m = re.match(rb"(?:[A-Za-z0-9+/=]+\r?\n)*", block)
    text = re.sub(rb"\s+", b"", block[:m.end()] if m else b"")
    text = text[:len(text) - len(text) % 4]
    try:
        return binascii.a2b_base64(text)
    except binascii.Error:
        return b""


def quotes_earlier_message(data: bytes, parsed: ParsedHeaders) -> bool:
    """The body's first REPLY_BODY_PREFIX bytes hold quoted text of an earlier
    message, in one of the forms real mail clients write: >-quoted lines,
    Outlook's "-----Original Message-----" or From:/Sent: block, an attribution
    line ("On .. wrote:", "Am .. schrieb ..:", "Le .. a écrit :", AOL's
    "In a message dated .. writes:"), or the HTML quote markers of Apple Mail /
    Thunderbird (<blockquote type="cite">), Outlook (divRplyFwdMsg), Gmail
    (gmail_quote), Yahoo and Thunderbird."""
    return any(_quotes(t) for t in _reply_texts(data, parsed))


def _quotes(text: bytes) -> bool:
    if text.startswith(_QUOTE_LINE_STARTS) or b"\n>" in text or b"\n&gt;" in text:
        return True
    low = text.lower()
    if _SEPARATOR.search(low) or any(k in low for k in _HTML_MARKERS):
        return True
    for i in _hits(low, b"quote"):
        if low.endswith(_QUOTE_CLASSES, 0, i) or (low.endswith(b"<block", 0, i) and _CITE.match(low, i - 6)):
            return True
    for n, m in enumerate(_COLON_EOL.finditer(low)):
        if n >= _MAX_HITS:
            break
        i = m.start()
        line = low[max(low.rfind(b"\n", 0, i) + 1, i - 300):i]
        line = _TRAILING_SPACE.sub(b"", line) if line.endswith(_SPACE_ENDS) else line
        if line.endswith(_ATTRIBUTION_ENDS) or any(v in line for v in _ATTRIBUTION_VERBS):
            return True
    for n, m in enumerate(_HEADER_FROM.finditer(b"\n" + low[:REPLY_BODY_PREFIX])):
        if n >= _MAX_HITS:
            break
        e = m.end() - 1  # offset in low (one "\n" was put in front)
        stop = low.find(b"\n", low.find(b"\n", e) + 1)
        if _SENT.search(low, e, stop if stop >= 0 else len(low)):
            return True
    return False


def _hits(text: bytes, word: bytes):  # type: ignore[no-untyped-def]
    """Offsets of the first _MAX_HITS occurrences of ``word`` in ``text``."""
    i = text.find(word)
    n = 0
    while i >= 0 and n < _MAX_HITS:
        yield i
        n += 1
        i = text.find(word, i + len(word))


def _discussion_list(parsed: ParsedHeaders) -> bool:
    """List-Post names where members post (RFC 2369; "List-Post: NO" = announce-only)."""
    for v in parsed.get_all("list-post"):
        if "<" in v and not v.strip().lower().startswith("no"):
            return True
    return False


def check_subject(data: bytes, parsed: ParsedHeaders, settings: HeaderSettings, extra: dict,
                  own_domains: tuple[str, ...] | list[str] = ()) -> list[Finding]:
    """Misleading-header findings (subj.*).

    Fake replies: a Subject that starts with a reply marker (Re/Aw/Antw, see
    _REPLY_MARK; forwards never count) is a real reply when the message has
    In-Reply-To or References, an Outlook/Exchange Thread-Index, or quoted
    text of the earlier message in the first REPLY_BODY_PREFIX bytes of its
    body (quotes_earlier_message). Otherwise the evidence of a fake is
    *strong*, and ``subj.fake_reply_bulk`` (refused by default) is reported,
    only when all of these hold: the message is list or bulk mail
    (is_bulk), it is not discussion-list mail (no List-Post naming where
    members post: on a discussion list a member's short reply from a client
    that writes no thread headers is ordinary). A base64 text body or text
    part is decoded before it is searched. Any other reply marker without
    evidence is ``subj.fake_reply`` (flagged by default).

    Display names: an e-mail address shown in a From display name whose
    domain is neither related to the From domain (related_domains) nor one
    of ``own_domains`` (the account's verified/approved sender domains, and
    below them) is ``subj.display_name`` (refused by default, P-FORGE); a bare
    domain-like word ("CNET News.com Daily Dispatch") is ``subj.display_domain``
    (flagged by default): brands often look like domains.
    """
    out: list[Finding] = []
    bulk = is_bulk(parsed, extra)
    idx = parsed.index
    fields = parsed.fields
    positions = idx.get("subject")
    if positions:
        decoded = _decoded(parsed, fields[positions[0]][1])[0]
        m = _REPLY_MARK.match(decoded)
        if (m and "in-reply-to" not in idx and "references" not in idx and "thread-index" not in idx
                and not quotes_earlier_message(data, parsed)):
            marker = m.group(1) + ":"
            why = "but has no In-Reply-To, References or Thread-Index and quotes no earlier message"
            if not bulk:
                out.append(Finding("subj.fake_reply", f"message Subject starts with {marker!r} {why}"))
            elif _discussion_list(parsed):
                out.append(Finding("subj.fake_reply",
                                   f"discussion-list mail (List-Post) Subject starts with {marker!r} {why}"))
            else:
                out.append(Finding("subj.fake_reply_bulk", f"list/bulk mail Subject starts with {marker!r} {why}"))
        m = _OBFUSCATION.search(decoded)
        if m:
            out.append(Finding("subj.obfuscated",
                               f"Subject decodes to control or bidi character U+{ord(m.group()):04X}"))
    positions = idx.get("from")
    boxes: list[Mailbox] = parsed_address_list(parsed, fields[positions[0]][1], False)[0] if positions else []
    brands = settings.brand_domains
    own = tuple(d.lower().rstrip(".") for d in own_domains)
    for box in boxes:
        display = display_text(box)
        if not display:
            continue
        dom = box.domain_lower.strip("[]")
        addresses, bare = display_domains(display)
        for shown in addresses:
            if not related_domains(shown, dom) and not _own_domain(shown, own):
                out.append(Finding("subj.display_name",
                                   f"From display name shows an address in {shown} but the address is in {dom}"))
                break
        else:
            for shown in bare:
                if not related_domains(shown, dom) and not _own_domain(shown, own):
                    out.append(Finding("subj.display_domain",
                                       f"From display name shows the domain name {shown} but the address is in {dom}"))
                    break
        hit = brand_in_name(display, brands) if brands else None
        if hit and not related_domains(hit[1], dom):
            out.append(Finding("subj.brand",
                               f"From display name names {hit[0]} (would impersonate {hit[1]}) but the address is in {dom}"))
    if bulk and boxes:
        for i in idx.get("reply-to", ()):
            rts, err = parsed_address_list(parsed, fields[i][1], True)
            if err is not None:
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

def parsed_for(tx) -> ParsedHeaders:  # type: ignore[no-untyped-def]
    """The parsed header block of ``tx.message``, cached in ``tx.parsed_headers``."""
    data = tx.message or b""
    hit = tx.parsed_headers
    if hit is not None and hit[0] is data:
        return hit[1]
    parsed = parse_headers(data)
    tx.parsed_headers = (data, parsed)
    return parsed
