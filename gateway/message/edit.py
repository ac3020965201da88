"""The few edits the gateway makes to a message's header block: removing
fields it replaces (the unsubscribe headers of registered list mail).
Everything else stays byte for byte as received."""
from __future__ import annotations


def remove_fields(data: bytes, names: set[str]) -> bytes:
    """``data`` without the header fields named in ``names`` (lower-case),
    including their folded continuation lines. The body is untouched."""
    end = data.find(b"\r\n\r\n")
    head_len = len(data) if end < 0 else end + 2
    head = data[:head_len]
    lines = head.split(b"\r\n")
    out: list[bytes] = []
    dropping = False
    for line in lines[:-1] if head.endswith(b"\r\n") else lines:
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                out.append(line)
            continue
        name = line.split(b":", 1)[0].strip().lower()
        dropping = name.decode("ascii", "replace") in names
        if not dropping:
            out.append(line)
    kept = b"\r\n".join(out) + (b"\r\n" if out else b"")
    return kept + data[head_len:]
