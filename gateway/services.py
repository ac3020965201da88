"""The services a check may use, composed once by the app and passed down.

Each check names the fields it uses in its SPEC (gateway/checks/contract.py)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from .accounts.store import AccountStore
from .blocklist.service import BlockList
from .config import Config
from .core.events import EventBus
from .dns.dnsbl import Dnsbl
from .dns.resolver import Resolver
from .smtp.limits import ConnectionTracker
from .state.counters import Counters
from .state.ratelimit import RateLimiter
from .state.distinct import DistinctCounter

if TYPE_CHECKING:  # pragma: no cover
    # imported by app.py only where it is made, in start(); it imports nothing of this module
    from .registry.service import RegistryService


@dataclass
class Services:
    config: Config
    accounts: AccountStore
    counters: Counters
    connections: ConnectionTracker
    clock: Callable[[], float] = time.time
    resolver: Resolver | None = None
    dnsbl: Dnsbl | None = None
    registry: RegistryService | None = None     # mailing lists
    blocklist: BlockList | None = None          # operator block lists
    rate_limiter: RateLimiter | None = None     # rate limits, on the counters' backend (state/ratelimit.py)
    distinct: DistinctCounter | None = None     # distinct recipients per key (state/distinct.py): data_bulk
    events: EventBus | None = None              # for checks that publish (Violation) or follow sessions
