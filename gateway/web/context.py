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
# "draining" from the first SIGTERM on (a load balancer stops sending),
# "no_upstream" while every upstream's circuit breaker is open (background
# probes close them again without traffic; SMTP is still served meanwhile).
Readiness = Literal["ready", "starting", "draining", "no_upstream"]


@dataclass(frozen=True, slots=True)
class WebContext:
    http: HttpSettings                      # the [http] section: the admin key
    accounts: AccountStore                  # suspension of an API key's account (P-STRIKE)
    blocklist: BlockList                    # /admin/blocklist (P-BLOCK)
    readiness: Callable[[], Readiness]      # /readyz
    metrics: Callable[[], bytes]            # /metrics: the Prometheus text exposition
    health: Callable[[], dict] | None = None  # /readyz details: upstream breakers, counters store
    registry: RegistryService | None = None  # /api/v1, /confirm, /unsubscribe; not mounted without it


def readiness_of(*, ready: bool, draining: bool, upstream: bool = True) -> Readiness:
    """The /readyz state of a gateway that is ``ready`` (listening) and perhaps
    ``draining``, with at least one ``upstream`` whose breaker is not open."""
    if draining:
        return "draining"
    if not ready:
        return "starting"
    return "ready" if upstream else "no_upstream"


def health_of(relay, counters) -> dict:
    """The details /readyz shows: each upstream's breaker (relay/breaker.py),
    the upstream connections open, their bound and the transactions waiting
    for one (relay/pool.py: a full pool defers, it does not make the gateway
    unready), and the counters' store (state/counters.py: memory, redis or
    fallback)."""
    out: dict = {}
    if relay is not None:
        out["upstreams"] = relay.health()
        out["upstream_connections"] = relay.connections()
    if counters is not None and hasattr(counters, "health"):
        out["counters"] = counters.health()
    return out
