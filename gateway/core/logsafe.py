"""Client-supplied strings made safe for a log line.

What a client sends (HELO, AUTH names, addresses, parameters) is kept as it
came for the checks, and is decoded with ``surrogateescape``, so a non-UTF-8
byte is a lone surrogate in the str. Such a str cannot be encoded as UTF-8
(orjson raises on it), and a CR, LF or terminal escape in a text log line
forges lines. ``json_safe`` makes a record encodable (a non-UTF-8 byte
becomes the text ``\\xNN``) and is applied only when orjson refused the
record, so the common case costs nothing. ``text_safe`` is for the text logs
(stdlib logging): control characters and non-UTF-8 bytes escaped, length
bounded.
"""
from __future__ import annotations

import re
from typing import Any

_CONTROL = re.compile(r"[\x00-\x1f\x7f\x80-\x9f]")


def clean_str(s: str) -> str:
    """``s`` with every lone surrogate written as ``\\xNN`` (or ``\\udNNN``)."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        pass
    try:
        raw = s.encode("utf-8", "surrogateescape")      # the client's bytes back
    except UnicodeEncodeError:                          # a surrogate no byte decoded to
        return s.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def json_safe(value: Any) -> Any:
    """A copy of a log record (dicts, lists, tuples, scalars) orjson can encode."""
    if isinstance(value, str):
        return clean_str(value)
    if isinstance(value, dict):
        return {clean_str(k) if isinstance(k, str) else k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def text_safe(s: str | None, limit: int = 200) -> str:
    """``s`` for a text log line: non-UTF-8 bytes and control characters
    escaped, at most ``limit`` characters (then ``...``)."""
    if s is None:
        return "-"
    s = clean_str(s[: limit * 4])
    s = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", s)
    return s if len(s) <= limit else s[:limit] + "..."
