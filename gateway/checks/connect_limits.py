"""P-LOAD: global and per-IP connection caps (aiosmtpd has none of its own).

The server counts the connection before the connect phase runs, so the counts
include this one."""
from __future__ import annotations

from ..core import replies
from ..core.transaction import Outcome, Phase
from .contract import CheckSpec


class ConnectLimits:
    name = "connect_limits"
    phase = Phase.CONNECT

    def __init__(self, tracker, max_total: int, max_per_ip: int):
        self.tracker = tracker
        self.max_total = max_total
        self.max_per_ip = max_per_ip

    async def run(self, session, item=None) -> Outcome:
        if self.tracker.total > self.max_total:
            return Outcome.refuse(self.name, replies.TOO_MANY_CONNECTIONS,
                                  f"{self.tracker.total} connections > {self.max_total}")
        n = self.tracker.count(session.peer_ip)
        if n > self.max_per_ip:
            return Outcome.refuse(self.name, replies.TOO_MANY_CONNECTIONS_IP,
                                  f"{n} connections from {session.peer_ip} > {self.max_per_ip}")
        return Outcome.ok(self.name)


def build(services) -> ConnectLimits:
    s = services.config.smtp
    return ConnectLimits(services.connections, s.max_connections, s.max_connections_per_ip)


SPEC = CheckSpec(
    name='connect_limits', phase=Phase.CONNECT, build=build,
    summary='P-LOAD: global and per-IP connection caps',
    position=10,
    replies=('TOO_MANY_CONNECTIONS', 'TOO_MANY_CONNECTIONS_IP'),
    settings=('smtp.max_connections', 'smtp.max_connections_per_ip'),
    services=('connections',))
