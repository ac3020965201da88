"""The DNS zone of ``gateway serve --dev``: a text file in the working directory.

Dev mode has no DNS at all (``dns.static_only``): names come from the
built-in dev records (``config.DEV_DNS``) and from this file, which the dev
gateway and the command line read alike and re-read when it changes. One
record a line, in the form of ``dns.static`` (``name TYPE data``); ``#``
starts a comment. ``gateway account domain add`` publishes a domain's TXT
proof here in dev mode (as a customer would in their real zone), so
``gateway account domain verify`` and the gateway's own re-check find it;
``domain remove`` takes it out again. Never used outside dev mode.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from .settings import parse_static_record

log = logging.getLogger("gateway.dns.devzone")

HEADER = """\
# The DNS zone of `gateway serve --dev` (dev mode only; nothing here is ever looked up in real DNS).
# One record a line: "name TYPE data", e.g.
#   myshop.example MX 10 mail.myshop.example
#   mail.myshop.example A 93.184.215.30
#   _gateway-proof.myshop.example TXT "gateway-proof=TOKEN"
# `gateway account domain add` (dev mode) adds the TXT proof of a domain; `domain remove` removes it.
# The dev gateway and the command line re-read this file when it changes.
"""


def read_records(path: str | os.PathLike) -> list[str]:
    """The valid record lines of the zone file ([] when there is none); a bad
    line is logged and skipped, so a typo cannot stop the dev gateway."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("dev zone %s cannot be read: %s", path, exc)
        return []
    out = []
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            parse_static_record(line)
        except ValueError as exc:
            log.warning("dev zone %s line %d skipped: %s", path, n, exc)
            continue
        out.append(line)
    return out


def publish(path: str | os.PathLike, name: str, rtype: str, data: str) -> str:
    """Append ``name rtype data`` (a line in the zone file); returns the line."""
    line = f"{name.rstrip('.').lower()} {rtype} {data}"
    parse_static_record(line)
    p = Path(path)
    new = not p.exists()
    with open(p, "a", encoding="utf-8") as fh:
        if new:
            fh.write(HEADER)
        fh.write(line + "\n")
    return line


def unpublish(path: str | os.PathLike, name: str, rtype: str, data: str | None = None) -> int:
    """Remove the ``name rtype [data]`` records (every one of that name and
    type without ``data``); returns how many lines went."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines(keepends=True)
    except FileNotFoundError:
        return 0
    want = (name.rstrip(".").lower(), rtype.upper())
    kept, removed = [], 0
    for line in lines:
        parts = line.split(None, 2)
        if len(parts) >= 2 and not line.lstrip().startswith("#") \
                and (parts[0].rstrip(".").lower(), parts[1].upper()) == want \
                and (data is None or (parts[2].strip() if len(parts) > 2 else "") == data):
            removed += 1
            continue
        kept.append(line)
    if removed:
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, p)
    return removed


class ZoneFile:
    """Re-reads the zone file when its size or modification time changes."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self.records: list[str] = []

    def changed(self) -> bool:
        """Re-read if the file changed; True when ``records`` is new."""
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = (0, -1)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        self.records = read_records(self.path)
        return True
