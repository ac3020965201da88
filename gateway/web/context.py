"""What the HTTP side is given: a typed context, built once after start-up.

The web app sees exactly these services, never the composition root
(``gateway.app``): the routers are plain functions of the context, so a test
builds the app from a context alone, and nothing under ``gateway/web/``
imports ``gateway.app``. State that changes while the gateway runs (ready,
draining, the metrics) is read through callables at request time; the
services themselves are fixed once started.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from ..accounts.store import AccountStore
from ..blocklist.service import BlockList
from ..config import HttpSettings
from ..registry.service import RegistryService

# /readyz: 200 only for "ready"; "starting" until every listener serves,
# "draining" from the first SIGTERM on (a load balancer stops sending).
Readiness = Literal["ready", "starting", "draining"]


@dataclass(frozen=True, slots=True)
class WebContext:
    http: HttpSettings                      # the [http] section: the admin key
    accounts: AccountStore                  # suspension of an API key's account (P-STRIKE)
    blocklist: BlockList                    # /admin/blocklist (P-BLOCK)
    readiness: Callable[[], Readiness]      # /readyz
    metrics: Callable[[], bytes]            # /metrics: the Prometheus text exposition
    registry: RegistryService | None = None  # /api/v1, /confirm, /unsubscribe; not mounted without it


def readiness_of(*, ready: bool, draining: bool) -> Readiness:
    """The /readyz state of a gateway that is ``ready`` (listening) and perhaps ``draining``."""
    if draining:
        return "draining"
    return "ready" if ready else "starting"
