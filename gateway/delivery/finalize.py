"""The outgoing bytes of one copy, built in one place.

Every copy that leaves the gateway (the shared upstream copy, each list
recipient's own copy, what a service mailbox stores) is built by
:meth:`Finalizer.finalize`: the gateway's trace headers (``Received:`` and
the trace id, trace.py), then the header fields the gateway adds (a
missing Date / Message-ID from the data checks, ``tx.add_headers``;
on list mail the recipient's List-Unsubscribe fields), then the message as
received. A DKIM signature will be computed here, over exactly these bytes.

Forwarded mail and SRS bounces get the trace on top and nothing else: the
author's bytes (and their DKIM signatures) stay intact.
"""
from __future__ import annotations

import time
from typing import Callable

from ..core.transaction import Transaction
from ..forwarding import forwarded
from ..message.edit import remove_fields
from .trace import trace_headers

# Header fields the gateway sets itself on registered list mail.
LIST_FIELDS = frozenset({"list-id", "list-unsubscribe", "list-unsubscribe-post"})


def list_body(message: bytes) -> bytes:
    """A list message without the fields each copy gets anew (RFC 8058): the
    customer's own List-* fields never reach a recipient."""
    return remove_fields(message, set(LIST_FIELDS))


class Finalizer:
    def __init__(self, hostname: str, trace_header: str, clock: Callable[[], float] = time.time):
        self.hostname = hostname
        self.trace_header = trace_header
        self.clock = clock

    def finalize(self, tx: Transaction, rcpt: str | None = None,
                 list_headers: list[tuple[str, str]] | None = None, body: bytes | None = None) -> bytes:
        """The bytes of one copy: for ``rcpt`` alone (a list copy: its
        ``list_headers`` and the ``body`` of :func:`list_body`), else the
        message as every recipient gets it."""
        added = [] if forwarded(tx) is not None else tx.add_headers + (list_headers or [])
        head = trace_headers(tx, self.hostname, self.trace_header, self.clock(), added, rcpt)
        return head + (body if body is not None else (tx.message or b""))
