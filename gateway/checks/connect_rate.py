"""P-LOAD: new connections per client IP per minute (``[smtp]
connection_rate_per_ip``, burst ``connection_rate_burst``), a GCRA limit on
``services.rate_limiter`` (state/ratelimit.py): shared through Redis when the
counters are, with local scaled limits while Redis is down. Refused at connect
with 421 4.7.0; a refused connection is not charged. The client IP is the one
of the PROXY header when the listener takes one."""
from __future__ import annotations

from typing import Any

from ..core import replies
from ..core.transaction import Outcome, Phase
from ..state.ratelimit import Rate
from .contract import CheckSpec


class ConnectRate:
    name = "connect_rate"
    phase = Phase.CONNECT

    def __init__(self, limiter: Any, rate: Rate | None):
        self.limiter = limiter
        self.rate = rate

    async def run(self, session: Any, item: Any = None) -> Outcome:
        if self.rate is None or self.limiter is None:
            return Outcome.skip(self.name, "off")
        decision = await self.limiter.acquire(f"connrate:ip:{session.peer_ip}", self.rate)
        if not decision.allowed:
            return Outcome.refuse(self.name, replies.CONNECTION_RATE,
                                  f"{session.peer_ip}: more than {self.rate.limit} connections per minute "
                                  f"(burst {self.rate.capacity}); retry in {decision.retry_after:.1f} s")
        return Outcome.ok(self.name)


def build(services: Any) -> ConnectRate:
    s = services.config.smtp
    rate = (Rate(s.connection_rate_per_ip, 60.0, s.connection_rate_burst)
            if s.connection_rate_per_ip else None)
    return ConnectRate(services.rate_limiter, rate)


SPEC = CheckSpec(
    name='connect_rate', phase=Phase.CONNECT, build=build,
    summary='P-LOAD: connection rate per client IP',
    position=25,
    replies=('CONNECTION_RATE',),
    settings=('smtp.connection_rate_per_ip', 'smtp.connection_rate_burst'),
    services=('rate_limiter',),
    # a Redis round trip at most, itself bounded by [counters] timeout
    deadline=5.0)
