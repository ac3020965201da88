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

The identity header fields (``[identity] headers``, accounts/identity.py)
are removed from every other copy, from trusted accounts and untrusted ones
alike: they name the customer's sites (and PHP's X-PHP-Script the visitor's
address), and a forged one must not reach anyone. The identity itself is in
the Received header only as its keyed hash (trace.py).
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
    def __init__(self, hostname: str, trace_header: str, clock: Callable[[], float] = time.time, *,
                 strip_fields: frozenset[str] = frozenset(), identity_key: bytes | None = None):
        self.hostname = hostname
        self.trace_header = trace_header
        self.clock = clock
        self.strip_fields = strip_fields                  # lower-case names of the identity header fields
        self.identity_key = identity_key                  # HMAC key of the opaque identity (None: not shown)
        self._strip_bytes = tuple(name.encode("ascii") for name in sorted(strip_fields))

    def finalize(self, tx: Transaction, rcpt: str | None = None,
                 list_headers: list[tuple[str, str]] | None = None, body: bytes | None = None) -> bytes:
        """The bytes of one copy: for ``rcpt`` alone (a list copy: its
        ``list_headers`` and the ``body`` of :func:`list_body`), else the
        message as every recipient gets it."""
        is_forwarded = forwarded(tx) is not None
        added = [] if is_forwarded else tx.add_headers + (list_headers or [])
        head = trace_headers(tx, self.hostname, self.trace_header, self.clock(), added, rcpt,
                             identity_key=self.identity_key)
        message = body if body is not None else (tx.message or b"")
        if self.strip_fields and not is_forwarded and self._has_strip_field(message):
            message = remove_fields(message, set(self.strip_fields))
        return head + message

    def _has_strip_field(self, message: bytes) -> bool:
        """Might the header block hold an identity field? (A look at the header
        alone, about 4 us for 1.3 KB; the removal copies the whole message.)"""
        end = message.find(b"\r\n\r\n")
        head = (message if end < 0 else message[:end]).lower()
        return any(name in head for name in self._strip_bytes)
