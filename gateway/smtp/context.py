"""What the SMTP server is given: built once by app.py after start-up, when
every service exists, and shared by all sessions of all listeners. The
server sees exactly this, never the Gateway."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Callable, Mapping, MutableSet, Protocol, Sequence

from ..accounts.limiter import AuthLimiter
from ..accounts.store import AccountStore
from ..config import Config
from ..core.events import EventBus
from ..delivery import Delivery
from ..pipeline import Pipeline
from .evict import Evictable
from .limits import ConnectionTracker

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Session(Evictable, Protocol):
    """What shutdown and eviction need of an open session."""

    def shutdown_if_idle(self) -> bool: ...  # pragma: no cover - protocol

    def force_close(self) -> None: ...  # pragma: no cover - protocol


@dataclass(frozen=True, slots=True)
class SmtpContext:
    config: Config
    pipeline: Pipeline
    accounts: AccountStore
    auth_limiter: AuthLimiter
    connections: ConnectionTracker
    delivery: Delivery
    events: EventBus
    draining: Callable[[], bool]          # True once shutdown began
    proxy_networks: Mapping[str, Sequence[Network]]   # listener name -> trusted PROXY peers
    sessions: MutableSet[Session]         # open sessions, for graceful shutdown
