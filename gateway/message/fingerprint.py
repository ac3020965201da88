"""A fuzzy fingerprint of a message's content, for the bulk detector (issue 12, point 4).

P-UCE is "many similar messages to addressees who did not ask". This module
answers "similar": it turns a message into a MinHash signature of its
normalized text, and the signature into a few *band keys* (MinHash LSH) such
that two near-identical messages share at least one key with high probability
and two different messages almost never do. A counter of distinct recipients
per band key (a later step, in memory or Redis) then counts "recipients of
messages like this one" without comparing messages with each other.

Pipeline (docs/bulk.md has the reasons and the measured figures):

1. Text: the header block is parsed with :mod:`gateway.message.parse`; the
   MIME tree is walked with ``bytes.find`` (as parse.py does), text parts are
   decoded (base64 / quoted-printable, the part's charset through parse.py's
   ``_codec_for``), HTML is reduced to text (scripts, styles, comments and tags
   removed, entities decoded). In a
   multipart/alternative the text/plain part is used when there is one. Only
   the first :data:`MAX_TEXT` characters of text are used, and no part is
   decoded beyond what that needs, so a 25 MiB message costs what its first
   text costs plus a ``find`` per boundary.
2. Normalization: URLs become their host (tracking services put per-recipient
   tokens in the path as well as the query), e-mail addresses are dropped,
   long hex / base64-like tokens are dropped, every number becomes ``0``, the
   name after a greeting ("Dear X,", "Hi X") is dropped, paragraphs of at most
   :data:`SHORT_PARAGRAPH` words ("John,", "Best, Anna") are dropped, case is
   folded. CJK characters count as one word each.
3. Shingles: :data:`SHINGLE` consecutive words *within a paragraph* (so
   reordered paragraphs give the same set), plus the Subject as a paragraph.
4. MinHash by one-permutation hashing (Li, Owen, Zhang, NIPS 2012) with
   densification: each shingle is
   hashed once with MurmurHash3 (mmh3); the hash's top bits pick one of
   :data:`PERMUTATIONS` bins, the rest is the value, the signature is the
   minimum per bin, and an empty bin copies a non-empty one chosen by its own
   probe sequence (optimal densification, Shrivastava, ICML 2017). The
   cost is one C hash per shingle and one sort, not 128 hashes per shingle.
5. LSH: the signature is cut into :data:`BANDS` bands of :data:`ROWS` values;
   each band hashes to one key. P(two messages of Jaccard similarity s share
   a key) = 1 - (1 - s^ROWS)^BANDS.

Pure: bytes in, :class:`Fingerprint` out; never raises on any input.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import html
import operator
import re
import struct
from dataclasses import dataclass
from itertools import repeat

import mmh3

from .parse import (
    ParsedHeaders, _codec_for, _ct_params, _ct_split, _part_headers, _text, decode_lenient, parse_headers,
)

# --------------------------------------------------------------------------------------
# Parameters (docs/bulk.md, "Parameters", explains each and the measured trade-off)
# --------------------------------------------------------------------------------------

VERSION = 1               # in the hash seed: keys of a changed normalization never match old ones
MAX_TEXT = 16 * 1024      # characters of decoded text fingerprinted (the rest is ignored)
HTML_RAW_FACTOR = 2       # at most MAX_TEXT * this characters of HTML are read (markup is not text)
MAX_PARTS = 64            # MIME parts looked at
MAX_DEPTH = 10            # MIME nesting followed
MAX_CANDIDATES = 1024     # delimiter look-alikes searched past per multipart
SHINGLE = 4               # words per shingle
PERMUTATIONS = 128        # signature length (one-permutation hashing bins)
BANDS = 21                # LSH bands ...
ROWS = 6                  # ... of this many signature values each (BANDS * ROWS <= PERMUTATIONS)
THRESHOLD = 0.7           # estimated Jaccard similarity at which two messages are "similar"
SHORT_PARAGRAPH = 2       # paragraphs of at most this many words are dropped (names, sign-offs)
MIN_SHINGLES = 8          # fewer distinct shingles: a "weak" fingerprint (see Fingerprint.weak)
INLINE_LIMIT = 8 * 1024   # fingerprint_async runs larger messages in an executor or in slices

_BIN_BITS = 7             # log2(PERMUTATIONS)
_VALUE_BITS = 32 - _BIN_BITS
_SEED = 0x5eed0000 + VERSION


def _probe_sequences() -> tuple[tuple[int, ...], ...]:
    # each bin's order of donor bins: a permutation of the others, fixed by the seed (mmh3, so
    # the same in every process and on every host)
    return tuple(tuple(sorted((d for d in range(PERMUTATIONS) if d != b),
                              key=lambda d: mmh3.hash(f"{b}:{d}", _SEED, False)))
                 for b in range(PERMUTATIONS))


_PROBES = _probe_sequences()


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """The fingerprint of one message.

    ``signature``: PERMUTATIONS ints (empty when the message has no text);
    ``keys``: the LSH band keys, short strings, the same for every process and
    host (a fixed hash seed), to count distinct recipients by; ``shingles``:
    how many distinct shingles the text gave. ``weak`` fingerprints (fewer than
    MIN_SHINGLES shingles: "thanks, see you", "test") match every other copy of
    the same few words, which many unrelated senders write; a counter should
    count them per sender, not across senders.
    """

    signature: tuple[int, ...]
    keys: tuple[str, ...]
    shingles: int

    @property
    def weak(self) -> bool:
        return self.shingles < MIN_SHINGLES

    def similarity(self, other: Fingerprint) -> float:
        return similarity(self, other)


EMPTY = Fingerprint((), (), 0)


def similarity(a: Fingerprint, b: Fingerprint) -> float:
    """Estimated Jaccard similarity of the two messages' shingle sets (0.0 .. 1.0)."""
    if not a.signature or not b.signature or len(a.signature) != len(b.signature):
        return 0.0
    same = sum(1 for x, y in zip(a.signature, b.signature) if x == y)
    return same / len(a.signature)


def similar(a: Fingerprint, b: Fingerprint, threshold: float = THRESHOLD) -> bool:
    """The decision: are ``a`` and ``b`` copies of one message (estimated similarity >= threshold)?"""
    return similarity(a, b) >= threshold


# --------------------------------------------------------------------------------------
# 1. Text of the message
# --------------------------------------------------------------------------------------

class _Budget:
    __slots__ = ("left", "parts")

    def __init__(self, chars: int):
        self.left = chars
        self.parts = 0


def _charset_codec(params: dict[str, str]) -> str:
    cs = params.get("charset")
    if cs:
        try:
            return _codec_for(cs.strip())
        except LookupError:
            pass
    return "utf-8"


def _decode_body(raw: bytes, cte: str, codec: str, limit: int) -> str:
    """At most ``limit`` characters of a part body, decoding no more than that needs."""
    if cte == "base64":
        # 4 encoded characters per 3 bytes, plus line ends (76 + CRLF per 57 bytes); a
        # character of UTF-8 text is at least a byte, so limit bytes give limit characters
        chunk = re.sub(rb"[^A-Za-z0-9+/]", b"", raw[:limit * 2 + 8])
        chunk = chunk[:len(chunk) - len(chunk) % 4]
        try:
            data = base64.b64decode(chunk)
        except (binascii.Error, ValueError):
            data = b""
    elif cte == "quoted-printable":
        data = binascii.a2b_qp(raw[:limit * 3 + 3])
    else:
        data = raw[:limit * 4]
    if codec == "utf-8" and not data.isascii():
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            # a cut in the middle of a character at the end is expected; anything else
            # says the charset is not UTF-8 (an undeclared 8-bit body): windows-1252
            text = data.decode("utf-8", "replace") if exc.start >= len(data) - 3 else data.decode("cp1252", "replace")
    else:
        try:
            text = data.decode(codec, "replace")
        except (LookupError, UnicodeError, ValueError, TypeError):
            text = data.decode("utf-8", "replace")
    return text[:limit]


def _cte_name(cte: str | None) -> str:
    return cte.strip().lower() if cte else "7bit"


def _leaf(data: bytes, mtype: str, params: dict[str, str], cte: str | None, start: int, end: int,
          budget: _Budget, out: list[str]) -> None:
    if budget.left <= 0:
        return
    html_part = mtype == "text/html"
    limit = budget.left * HTML_RAW_FACTOR if html_part else budget.left
    text = _decode_body(data[start:end], _cte_name(cte), _charset_codec(params), limit)
    if html_part:
        text = html_to_text(text)
    text = text[:budget.left]
    budget.left -= len(text)
    out.append(text)


def _walk(data: bytes, ct: str | None, cte: str | None, start: int, end: int, depth: int,
          budget: _Budget, out: list[str]) -> None:
    budget.parts += 1
    if budget.left <= 0 or budget.parts > MAX_PARTS:
        return
    split = _ct_split(ct) if ct is not None else None
    if split is None:
        mtype, params = "text/plain", {}
    else:
        mtype = split[0]
        params = _ct_params(split[1])
    if mtype == "message/rfc822" or mtype == "message/global":
        if depth < MAX_DEPTH:
            _sub_part(data, start, end, depth, budget, out, subject=True)
        return
    if mtype.startswith("multipart/"):
        if depth < MAX_DEPTH:
            _multipart(data, mtype, params.get("boundary"), start, end, depth, budget, out)
        return
    if mtype.startswith("text/") and mtype not in ("text/calendar", "text/x-vcard", "text/vcard", "text/css",
                                                   "text/csv", "text/rtf", "text/x-vcalendar"):
        _leaf(data, mtype, params, cte, start, end, budget, out)
    # anything else (images, application/*, ...) carries no text we read


def _parts(data: bytes, boundary: str, start: int, end: int) -> list[tuple[int, int]]:
    """(start, end) of each part of a multipart body, at most MAX_PARTS, never raises."""
    delim = b"--" + boundary.encode("utf-8", "surrogateescape")
    dl = len(delim)
    pos = start
    part_start = -1
    spans: list[tuple[int, int]] = []
    # bounded however the body is made: MAX_PARTS parts, and MAX_CANDIDATES occurrences
    # of the delimiter that turn out not to be one (mid-line, or a longer boundary)
    candidates = 0
    while len(spans) < MAX_PARTS and candidates < MAX_CANDIDATES:
        i = data.find(delim, pos, end)
        if i < 0:
            break
        pos = i + dl
        candidates += 1
        if i != start and data[i - 1] != 0x0A:
            continue
        tail_end = data.find(b"\n", pos, end)
        tail = data[pos:tail_end if tail_end >= 0 else end]
        is_close = tail.startswith(b"--")
        rest = tail[2:] if is_close else tail
        if rest.strip(b" \t\r"):
            continue
        if part_start >= 0:
            pend = i - 2 if data[i - 2:i] == b"\r\n" else i - 1
            spans.append((part_start, max(pend, part_start)))
        if is_close:
            return spans
        part_start = tail_end + 1 if tail_end >= 0 else end
    if part_start >= 0 and len(spans) < MAX_PARTS:
        spans.append((part_start, end))
    return spans


def _multipart(data: bytes, mtype: str, boundary: str | None, start: int, end: int, depth: int,
               budget: _Budget, out: list[str]) -> None:
    if not boundary:
        return
    spans = _parts(data, boundary, start, end)
    if mtype == "multipart/alternative" and len(spans) > 1:
        # one rendering of the same content: the plain text when there is one
        # (cheaper, and what a text-only copy of the message says), else the last
        heads = [_part_headers(data, a, b) for a, b in spans]
        pick = len(spans) - 1
        for k, (ct_b, _, _) in enumerate(heads):
            split = _ct_split(_text(ct_b)) if ct_b is not None else ("text/plain", "")
            if split is not None and split[0] == "text/plain":
                pick = k
                break
        spans = [spans[pick]]
    for a, b in spans:
        if budget.left <= 0:
            return
        _sub_part(data, a, b, depth, budget, out)


def _sub_part(data: bytes, start: int, end: int, depth: int, budget: _Budget, out: list[str],
              subject: bool = False) -> None:
    if subject:  # an attached message: its header block, for the Subject
        parsed = parse_headers(data[start:end])
        subj = parsed.get("subject")
        if subj:
            out.append(_no_surrogates(decode_lenient(subj))[:1000])
        ct, cte = parsed.get("content-type"), parsed.get("content-transfer-encoding")
        _walk(data, ct, cte, start + parsed.body_start, end, depth + 1, budget, out)
        return
    ct_b, cte_b, body = _part_headers(data, start, end)
    _walk(data, _text(ct_b) if ct_b is not None else None, _text(cte_b) if cte_b is not None else None,
          body, end, depth + 1, budget, out)


def message_text(message: bytes, max_text: int = MAX_TEXT, parsed: ParsedHeaders | None = None) -> str:
    """The Subject and the decoded text of ``message`` (HTML as text), at most ``max_text`` characters.
    ``parsed``: the message's header block already parsed (``parse.parsed_for(tx)``), if at hand."""
    if parsed is None:
        parsed = parse_headers(message)
    out: list[str] = []
    subj = parsed.get("subject")
    if subj:
        out.append(_SUBJECT_PREFIX.sub("", _no_surrogates(decode_lenient(subj)))[:1000])
    budget = _Budget(max_text)
    _walk(message, parsed.get("content-type"), parsed.get("content-transfer-encoding"),
          parsed.body_start, len(message), 0, budget, out)
    return "\n\n".join(out)


def _no_surrogates(s: str) -> str:
    # raw 8-bit header bytes arrive surrogate-escaped (parse_headers): not text, and not encodable
    return s if s.isascii() else _SURROGATE.sub(" ", s)


_SURROGATE = re.compile("[\ud800-\udfff]")
# "Re:", "Fwd:" ... and a leading "Name," (a personalized subject: "Anna, your order")
_SUBJECT_PREFIX = re.compile(r"^(?:\s*(?:re|fwd?|aw|wg|tr|sv|vs)\s*(?:\[\d+\])?\s*:|\s*[^\s,:]{1,20},(?=\s))+\s*", re.I)

# --------------------------------------------------------------------------------------
# HTML to text (regular expressions: a linear pass each, no tree, no dependency)
# --------------------------------------------------------------------------------------

_HTML_DROP = re.compile(r"<!--.*?(?:-->|\Z)|<(script|style|head|title)\b[^>]*>.*?(?:</\1\s*>|\Z)", re.I | re.S)
_HTML_BREAK = re.compile(r"<(?:/?(?:p|div|tr|li|ul|ol|h[1-6]|table|blockquote|pre|center|section|article|dl|dt|dd|hr)"
                         r"\b[^>]*|br\b[^>]*|/?td\b[^>]*)>", re.I)
_HTML_TAG = re.compile(r"<[^>]*(?:>|\Z)")


def _break(m: re.Match[str]) -> str:
    t = m.group(0)[1:3].lower()
    return "\n" if t in ("br", "td", "/t") else "\n\n"


def html_to_text(s: str) -> str:
    """Visible text of an HTML document, paragraphs separated by a blank line.

    Line ends in HTML source are white space like any other (a copy of the text
    version with "<br>\\n" at each line end reads as the text version does);
    link targets are not text (a text/plain copy shows the URL only where its
    text does)."""
    s = _HTML_DROP.sub(" ", s)
    s = " ".join(s.split())  # str.split: every run of white space, in C
    s = _HTML_BREAK.sub(_break, s)
    s = _HTML_TAG.sub(" ", s)
    s = html.unescape(s)
    return s.replace("\xa0", " ")


# --------------------------------------------------------------------------------------
# 2. Normalization
# --------------------------------------------------------------------------------------

# Every pattern here runs on casefolded text (folded once, in _greeting_off), so none needs
# re.IGNORECASE, and each starts with something the regex engine searches for quickly (a
# literal, or a short alternation of literals): IGNORECASE and a leading character class make
# the engine try a match at every position, which cost 60 to 140 us per 4 KiB each.
_URL = re.compile(r"(?:https?://|ftp://|www\.)(?:[^\s/<>\"'@]*@)?([^\s/<>\"'?#:]+)[^\s<>\"']*")
# an address is found by its "@domain" (a literal first character: a fast search), the local
# part by walking back from the "@" at most 64 characters (RFC 5321 4.5.3.1.1)
_AT_DOMAIN = re.compile(r"@[\w\-]+(?:\.[\w\-]+)+")
# tracking tokens: 12 or more hex / base64 / url-safe characters with a digit among them
_TOKEN = re.compile(r"(?<![\w/+=\-])[a-z0-9_+/=\-]{12,}")
_DIGIT = re.compile(r"\d")
_NUMBER = re.compile(r"\d+")
# the greeting word(s) at a line start (the text is searched with a "\n" in front: a literal
# first character), then a name of up to 40 characters before a comma, colon, "!" or the line
# end; looked for in the first GREETING_SPAN characters only (a greeting opens a message)
_GREETING = re.compile(
    r"\n[ \t>]*(dear|hi|hello|hey|greetings|good\s+(?:morning|afternoon|evening)|hallo|hola|bonjour|salut|ciao|"
    r"liebe[rs]?|sehr\s+geehrte[rs]?|beste|geachte|caro|cara|querido|querida|estimado|estimada)\b[^,:!\n]{0,40}[,:!]?")
GREETING_SPAN = 4096
_PARAGRAPH = re.compile(r"\n[ \t>]*\n\s*")
# CJK ideographs, kana and hangul are one word each (no spaces between words there)
_CJK = "\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff66-\uff9f"
_WORD = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")
# ASCII text (most), in C (str.translate has an ASCII fast path, str.split and str.replace are
# C loops), the same result as the regular expressions give:
# - words: every character but a letter or digit becomes a space, then str.split;
_ASCII_SEP = {c: " " for c in range(128) if not chr(c).isalnum()}
# - paragraphs and words of a whole ASCII text in one translate: what _PARAGRAPH allows between
#   two line ends ([ \t>]) becomes a space, every other separator "\x1f" (white space to
#   str.split, not to _ASCII_PARAGRAPH's " *"), line ends stay;
_ASCII_WORDS = {c: " " if chr(c) in " \t>" else "\x1f" for c in range(128) if not chr(c).isalnum() and c != 10}
_ASCII_PARAGRAPH = re.compile(r"\n *\n")
# - tokens: the maximal runs of token characters (what _TOKEN matches from its start, greedily)
#   are the words of the text with every other character a space; only when one of them is a
#   token does _TOKEN.sub run;
_TOKEN_SEP = {c: " " for c in range(128) if not re.fullmatch(r"[a-z0-9_+/=\-]", chr(c))}
# - numbers: every digit becomes "0", then runs of "0" are folded to one.
_TO_ZERO = {c: "0" for c in range(ord("1"), ord("9") + 1)}


def _drop_addresses(text: str) -> str:
    out: list[str] = []
    pos = 0
    for m in _AT_DOMAIN.finditer(text):
        at = i = m.start()
        stop = max(pos, at - 64)
        while i > stop and (text[i - 1].isalnum() or text[i - 1] in "._+-="):
            i -= 1
        if i == at:  # "@name" alone: a mention, not an address
            continue
        out.append(text[pos:i])
        out.append(" ")
        pos = m.end()
    if not out:
        return text
    out.append(text[pos:])
    return "".join(out)


def _token(m: re.Match[str]) -> str:
    t = m.group(0)
    return " " if _DIGIT.search(t) else t


def _has_token(text: str) -> bool:
    """Would _TOKEN.sub drop anything from this ASCII text (digits already "0")?"""
    return any(len(run) >= 12 and "0" in run for run in text.translate(_TOKEN_SEP).split())


def normalize(text: str) -> list[list[str]]:
    """The paragraphs of ``text`` as lists of normalized words (the personalization removed)."""
    return _long_only(_paragraphs(_greeting_off(text)))


def _greeting_off(text: str) -> str:
    """``text`` casefolded, without CRs, the name after a greeting removed."""
    text = text.replace("\r", "").casefold()
    return _GREETING.sub("\n\\1", "\n" + text[:GREETING_SPAN])[1:] + text[GREETING_SPAN:]


def _paragraphs(text: str) -> list[list[str]]:
    """Every paragraph's words (``text`` as _greeting_off gives it). Nothing here
    reaches across a blank line, so the paragraphs of a text are those of its
    pieces cut at blank lines (_pieces)."""
    if "://" in text or "www." in text:
        text = _URL.sub(lambda m: " " + m.group(1).rstrip(".") + " ", text)
    if "@" in text:
        text = _drop_addresses(text)
    if text.isascii():
        text = text.translate(_TO_ZERO)
        if "0" in text and _has_token(text):
            text = _TOKEN.sub(_token, text)
        while "00" in text:
            text = text.replace("00", "0")
        words = [para.split() for para in _ASCII_PARAGRAPH.split(text.translate(_ASCII_WORDS))]
    else:
        text = _NUMBER.sub("0", _TOKEN.sub(_token, text))
        words = [para.translate(_ASCII_SEP).split() if para.isascii() else _WORD.findall(para)
                 for para in _PARAGRAPH.split(text)]
    return [w for w in words if w]


def _long_only(paragraphs: list[list[str]]) -> list[list[str]]:
    long = [p for p in paragraphs if len(p) > SHORT_PARAGRAPH]
    return long if long else paragraphs


def _pieces(text: str, size: int) -> list[str]:
    """``text`` cut at blank lines into pieces of about ``size`` characters (one piece
    may be longer: a paragraph is never cut)."""
    out = []
    pos = 0
    while len(text) - pos > size:
        m = _PARAGRAPH.search(text, pos + size)
        if m is None:
            break
        out.append(text[pos:m.start()])
        pos = m.start()
    out.append(text[pos:])
    return out


def shingles(paragraphs: list[list[str]], size: int = SHINGLE) -> set[str]:
    """Word ``size``-grams within each paragraph; a shorter paragraph is one shingle."""
    out: set[str] = set()
    for words in paragraphs:
        if len(words) <= size:
            out.add(" ".join(words))
        else:
            out.update(map(" ".join, zip(*(words[i:] for i in range(size)))))
    return out


# --------------------------------------------------------------------------------------
# 3. MinHash (one-permutation hashing, densified) and LSH band keys
# --------------------------------------------------------------------------------------

def signature(items: set[str]) -> tuple[int, ...]:
    """PERMUTATIONS minimum values of ``items``' hashes, one per bin (empty: no items)."""
    if not items:
        return ()
    # each hash's bin is its top bits: with the hashes in descending order, dict() keeps the last,
    # so the smallest, hash of each bin (every step a C loop: map, zip, dict)
    hashes = sorted(map(mmh3.hash, items, repeat(_SEED), repeat(False)), reverse=True)
    smallest = dict(zip(map(operator.rshift, hashes, repeat(_VALUE_BITS)), hashes))
    mask = (1 << _VALUE_BITS) - 1
    # optimal densification (Shrivastava, ICML 2017): an empty bin copies the value of the
    # first non-empty bin of its own fixed pseudo-random probe sequence. Probing per bin, not
    # "the next bin to the right" (rotation, 2014), keeps the bins of a band independent: with
    # rotation a short text fills runs of adjacent bins, so whole bands, from one donor, and
    # two short texts sharing one shingle shared a band key.
    # (filter() with the dict's own __contains__ walks the probe sequence in C.)
    held = smallest.__contains__
    return tuple((smallest[b] if b in smallest else smallest[next(filter(held, _PROBES[b]))]) & mask
                 for b in range(PERMUTATIONS))


def band_keys(sig: tuple[int, ...], bands: int = BANDS, rows: int = ROWS) -> tuple[str, ...]:
    """One short key per band: 2 hex digits of band number, 12 of the band's hash."""
    if not sig:
        return ()
    packed = struct.pack(f"<{len(sig)}Q", *sig)
    width = rows * 8
    keys = []
    for b in range(bands):
        h = mmh3.hash64(packed[b * width:(b + 1) * width], _SEED + b, signed=False)[0]
        keys.append(f"{b:02x}{h >> 16:012x}")
    return tuple(keys)


def fingerprint(message: bytes, *, parsed: ParsedHeaders | None = None, max_text: int = MAX_TEXT,
                shingle: int = SHINGLE, bands: int = BANDS, rows: int = ROWS) -> Fingerprint:
    """The fingerprint of ``message`` (the whole message as received, header block first). Never raises.
    ``parsed`` as for :func:`message_text`; the other arguments are for bench/fingerprint_eval.py."""
    items = shingles(normalize(message_text(message, max_text, parsed)), shingle)
    if not items:
        return EMPTY
    sig = signature(items)
    return Fingerprint(sig, band_keys(sig, bands, rows), len(items))


PIECE = 2048  # characters normalized per event-loop turn by fingerprint_async


async def fingerprint_async(message: bytes, executor: concurrent.futures.Executor | None = None,
                            parsed: ParsedHeaders | None = None) -> Fingerprint:
    """:func:`fingerprint`, without holding the event loop for long; the same result.

    Up to INLINE_LIMIT bytes it runs inline: well under a millisecond (an
    8 KiB message costs 0.3 to 0.4 ms, bench/bench_fingerprint.py). A larger
    message runs, with no ``executor`` (the recommended way), on the loop in
    slices, yielding between them: the MIME walk and decoding, PIECE
    characters of normalization at a time, then the signature; each slice
    measured under a millisecond at 1 MiB. With an ``executor`` it runs there
    instead; but a thread executor shares the GIL (the loop waits up to
    sys.getswitchinterval(), 5 ms, per turn), and a ProcessPoolExecutor pickles
    the whole message to another process and back on every call
    (docs/bulk.md, "Cost").
    """
    if len(message) <= INLINE_LIMIT:
        return fingerprint(message, parsed=parsed)
    if executor is not None:
        return await asyncio.get_running_loop().run_in_executor(executor, fingerprint, message)
    text = _greeting_off(message_text(message, MAX_TEXT, parsed))
    paragraphs: list[list[str]] = []
    for piece in _pieces(text, PIECE):
        await asyncio.sleep(0)
        paragraphs += _paragraphs(piece)
    await asyncio.sleep(0)
    items = shingles(_long_only(paragraphs))
    if not items:
        return EMPTY
    sig = signature(items)
    return Fingerprint(sig, band_keys(sig), len(items))
