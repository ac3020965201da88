"""P-LOAD: near the connection cap, idle sessions that never authenticated
give their slots to newcomers.

Without this, 1,000 idle connections from 20 addresses (within the per-IP
cap) lock every other client out with ``421 4.7.0`` until they time out.
Once more than ``smtp.evict_unauthenticated_at`` x ``max_connections``
sessions are open, a newcomer that passed the connect checks closes the
oldest *idle unauthenticated* session(s) with ``421 4.7.0`` and is greeted
instead. Idle means: greeted, not inside a command (EHLO, STARTTLS, an AUTH
exchange), not inside a transaction, no command bytes waiting. Authenticated
sessions (SMTP AUTH or a client network) and busy ones are never closed. A
newcomer the connect checks refuse (per-IP cap, block list, DNSBL) closes
nobody, which is why the threshold is below the cap: the headroom between
them is for newcomers still in the connect phase.

The choice is plain code (:func:`threshold`, :func:`victims`); the session
closes itself (:meth:`Evictable.evict`) and :func:`make_room` logs one line
per eviction. The open sessions are kept in connect order
(:class:`ConnectOrder`), so finding the oldest idle one walks past the
older busy or authenticated sessions only, not all of them: under a flood
each newcomer above the threshold costs a few checks, not one per open
session (about 1 ms for 900 sessions, the cap scanned whole).
"""
from __future__ import annotations

import logging
from itertools import islice
from typing import Iterable, Iterator, MutableSet, Protocol, TypeVar

from ..core.logsafe import text_safe
from ..core.transaction import SessionInfo

log = logging.getLogger("gateway.smtp.evict")


class Evictable(Protocol):
    """What eviction needs of an open session (smtp/server.py GatewaySMTP)."""

    @property
    def opened_at(self) -> float: ...  # pragma: no cover - protocol; monotonic time of connect

    @property
    def session_info(self) -> SessionInfo | None: ...  # pragma: no cover - protocol

    def evictable(self) -> bool: ...  # pragma: no cover - protocol; idle and unauthenticated

    def evict(self) -> None: ...  # pragma: no cover - protocol; 421 4.7.0 and close


S = TypeVar("S", bound=Evictable)
T = TypeVar("T")


class ConnectOrder(MutableSet[T]):
    """The open sessions (SmtpContext.sessions), iterated oldest first: a
    dict keeps insertion order, and a session is added at connect."""

    def __init__(self) -> None:
        self._items: dict[T, None] = {}

    def __contains__(self, item: object) -> bool:
        return item in self._items

    def __iter__(self) -> Iterator[T]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: T) -> None:
        self._items[item] = None

    def discard(self, item: T) -> None:
        self._items.pop(item, None)


def threshold(max_connections: int, fraction: float) -> int | None:
    """Open sessions above which a newcomer evicts; None: eviction is off."""
    if fraction <= 0:
        return None
    return int(max_connections * fraction + 1e-9)   # 0.7 * 10 is 7.000000000000001


def victims(sessions: Iterable[S], open_now: int, limit: int | None) -> list[S]:
    """The sessions to close so that ``open_now`` (the newcomer counted)
    comes back to ``limit``: the first evictable ones of ``sessions``
    (oldest first, :class:`ConnectOrder`), at most as many as it is over;
    fewer (or none) when not enough are idle."""
    if limit is None or open_now <= limit:
        return []
    return list(islice((s for s in sessions if s.evictable()), open_now - limit))


def make_room(sessions: Iterable[S], open_now: int, limit: int | None, now: float) -> int:
    """Close the victims (one log line each); how many were closed."""
    chosen = victims(sessions, open_now, limit)
    for victim in chosen:
        info = victim.session_info
        victim.evict()
        if info is not None:
            log.info("evicted idle unauthenticated session %s: client %s, listener %s, HELO %s, age %.1f s "
                     "(%d open, threshold %s)", info.id, text_safe(info.peer_ip, 64), text_safe(info.listener, 64),
                     text_safe(info.helo, 100), now - victim.opened_at, open_now, limit)
    return len(chosen)


__all__ = ["ConnectOrder", "Evictable", "make_room", "threshold", "victims"]
