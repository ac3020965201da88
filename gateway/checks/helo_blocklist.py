"""Operator block lists on the HELO/EHLO name (P-BLOCK): exact host-name
entries and suffix entries (``.bad.example``)."""
from __future__ import annotations

from typing import Any

from ..core import replies
from ..core.transaction import Outcome, Phase, SessionInfo
from .contract import CheckSpec


class HeloBlocklist:
    name = "helo_blocklist"
    phase = Phase.HELO

    def __init__(self, blocklist: Any):
        self.blocklist = blocklist

    async def run(self, tx: SessionInfo, item: Any = None) -> Outcome:
        if self.blocklist is None:
            return Outcome.skip(self.name, "block lists not loaded")
        helo = tx.helo or ""
        if not helo or helo.startswith("["):
            return Outcome.skip(self.name, "no host name (address literal)")
        hit = self.blocklist.snapshot.match_hostname(helo)
        if hit is None:
            return Outcome.ok(self.name)
        return Outcome.refuse(self.name, replies.BLOCKED_HELO.with_detail(f"{helo} ({hit.value})"),
                              hit.log_detail(f"HELO {helo}"))


def build(services: Any) -> HeloBlocklist:
    return HeloBlocklist(getattr(services, "blocklist", None))


SPEC = CheckSpec(
    name='helo_blocklist', phase=Phase.HELO, build=build,
    summary='P-BLOCK: operator block lists on the HELO name',
    position=10,
    replies=('BLOCKED_HELO',),
    services=('blocklist',))
