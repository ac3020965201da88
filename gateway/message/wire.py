"""Wire-level hygiene of the DATA stream, before any parsing.

Works on the raw bytes exactly as received (after dot-unstuffing). Every
test is a C-speed scan over the whole buffer (``bytes.count``, ``in``,
``isascii``, one compiled regex anchored at line starts), so the cost is
linear in the message size and there is no Python loop per line.

Bare CR / bare LF are refused because they are what SMTP smuggling
(CVE-2023-51764, -51765, -51766 and relatives) rides on: a receiver that
treats ``<LF>.<LF>`` or ``<CR>.<CR>`` as end-of-data sees a second message
the gateway never checked.
"""
from __future__ import annotations

import re

from .findings import Finding

MAX_LINE = 998  # octets, without the CRLF (RFC 5322 2.1.1, RFC 5321 4.5.3.1.6)

_BARE_LF = re.compile(rb"(?<!\r)\n")
_BARE_CR = re.compile(rb"\r(?!\n)")
_NON_ASCII = re.compile(rb"[\x80-\xff]")


def header_end(data: bytes) -> int:
    """Offset of the blank line that ends the header block (len(data) if none)."""
    if data.startswith(b"\r\n") or data.startswith(b"\n"):
        return 0
    # Search "\n\r\n" first: on CRLF mail it is found at the end of the header
    # block, and the "\n\n" search is then bounded by it instead of scanning
    # the whole body. A "\n\n" ending at i + 1 (starting at i - 1) still wins.
    i = data.find(b"\n\r\n")
    if i >= 0:
        j = data.find(b"\n\n", 0, i + 1)
        return (j if j >= 0 else i) + 1
    j = data.find(b"\n\n")
    return j + 1 if j >= 0 else len(data)


def long_line(data: bytes) -> tuple[int, int] | None:
    """(offset, length) of the first line longer than 998 octets, or None.

    Walks the buffer in windows of 1000 bytes, not line by line: a window
    that holds no LF means a line longer than 998 octets plus CR; otherwise
    the next window starts after the window's last LF (``bytes.rfind``). The
    Python loop runs once per ~1 KiB whatever the line lengths.
    """
    n = len(data)
    pos = 0
    win = MAX_LINE + 2  # 998 octets + CR + LF
    while n - pos > MAX_LINE:
        end = pos + win
        if end > n:
            tail = n - pos - (1 if data.endswith(b"\r") else 0)
            if data.find(b"\n", pos) < 0 and tail > MAX_LINE:
                return pos, tail
            j = data.rfind(b"\n", pos)
            if j < 0:
                return None
            pos = j + 1
            continue
        j = data.rfind(b"\n", pos, end)
        if j < 0 or (j == end - 1 and data.find(b"\n", pos, end - 1) < 0 and data[j - 1] != 0x0D):
            # no LF within 1000 bytes; or the only LF is at byte 1000 without CR before it
            nl = data.find(b"\n", pos)
            stop = nl if nl >= 0 else n
            length = stop - pos - (1 if stop > pos and data[stop - 1] == 0x0D else 0)
            return pos, length
        pos = j + 1
    return None


def _line_no(data: bytes, pos: int) -> int:
    return data.count(b"\n", 0, pos) + 1


def check_wire(data: bytes, *, body_8bit: bool, smtputf8: bool) -> list[Finding]:
    """All wire findings of ``data``; at most one per finding id."""
    out: list[Finding] = []
    n_lf = data.count(b"\n")
    n_crlf = data.count(b"\r\n")
    if n_lf != n_crlf:
        m = _BARE_LF.search(data)
        pos = m.start() if m else 0
        out.append(Finding("wire.bare_lf", f"bare LF at line {_line_no(data, pos)} (offset {pos})"))
    if data.count(b"\r") != n_crlf:
        m = _BARE_CR.search(data)
        pos = m.start() if m else 0
        out.append(Finding("wire.bare_cr", f"bare CR at line {_line_no(data, pos)} (offset {pos})"))
    nul = data.find(b"\x00")
    if nul >= 0:
        out.append(Finding("wire.nul", f"NUL byte at line {_line_no(data, nul)} (offset {nul})"))
    hit = long_line(data)
    if hit:
        out.append(Finding("wire.line_length",
                           f"line {_line_no(data, hit[0])} is {hit[1]} octets, limit {MAX_LINE}"))
    if not data.isascii():
        hend = header_end(data)
        head_ascii = data[:hend].isascii()
        if not (body_8bit or smtputf8):
            m = _NON_ASCII.search(data)
            pos = m.start() if m else 0
            where = "header" if pos < hend else "body"
            out.append(Finding("wire.8bit",
                               f"8-bit byte in the {where} at line {_line_no(data, pos)} without BODY=8BITMIME or SMTPUTF8"))
        elif not head_ascii and not smtputf8:
            m = _NON_ASCII.search(data, 0, hend)
            pos = m.start() if m else 0
            out.append(Finding("wire.8bit_header",
                               f"8-bit byte in the header at line {_line_no(data, pos)} without SMTPUTF8"))
    return out
