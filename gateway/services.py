"""The services a check may use, composed once by the app and passed down.

Each check names the fields it uses in its SPEC (gateway/checks/contract.py)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from .config import Config


@dataclass
class Services:
    config: Config
    accounts: Any                      # accounts.store.AccountStore
    counters: Any                      # state.counters.Counters
    connections: Any                   # smtp.limits.ConnectionTracker
    clock: Callable[[], float] = time.time
    resolver: Any = None               # dns.resolver.Resolver
    dnsbl: Any = None                  # dns.dnsbl.Dnsbl
    registry: Any = None               # registry service (mailing lists)
    blocklist: Any = None              # blocklist.service.BlockList (operator block lists)
