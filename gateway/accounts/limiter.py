"""AUTH failure limits per client IP and per account name (P-LOAD):
password guessing is cut off, and stays cut off for the window.

Lockout back-off: the failure that reaches a limit also locks that IP or
account name out for ``failure_window`` seconds from then, and each further
lockout within ``lockout_memory`` doubles that, up to ``lockout_max``
(``[auth]``). The lock is a GCRA of one unit per lockout period on the rate
limiter (state/ratelimit.py), shared through Redis like the counts.

While the shared counters are down the counts are local to this gateway and
each limit is the counters' ``scaled`` share of it (state/counters.py)."""
from __future__ import annotations

from typing import Any

from ..state.ratelimit import Rate


class AuthLimiter:
    def __init__(self, counters, max_per_ip: int, max_per_account: int, window: float, *,
                 limiter: Any = None, lockout_max: float = 86400.0, lockout_memory: float = 86400.0):
        self.counters = counters
        self.max_per_ip = max_per_ip
        self.max_per_account = max_per_account
        self.window = window
        self.limiter = limiter
        self.lockout_max = max(lockout_max, window)
        self.lockout_memory = lockout_memory

    def lockout(self, level: int) -> float:
        """Seconds of the ``level``-th lockout within lockout_memory (1: failure_window)."""
        return float(min(self.lockout_max, self.window * 2 ** min(max(level, 1) - 1, 40)))

    async def _blocked(self, kind: str, key: str, limit: int) -> bool:
        count = await self.counters.get(f"authfail:{kind}:{key}", self.window)
        if count >= self.counters.scaled(limit):
            return True
        if self.limiter is None:
            return False
        level = await self.counters.get(f"authlock:{kind}:{key}", self.lockout_memory)
        if not level:
            return False
        decision = await self.limiter.acquire(f"authlock:{kind}:{key}", Rate(1, self.lockout(level), 1),
                                              dry_run=True)
        return not decision.allowed

    async def ip_blocked(self, ip: str) -> bool:
        return await self._blocked("ip", ip, self.max_per_ip)

    async def account_blocked(self, name: str) -> bool:
        return await self._blocked("acct", name, self.max_per_account)

    async def failed(self, ip: str, name: str) -> None:
        for kind, key, limit in (("ip", ip, self.max_per_ip), ("acct", name, self.max_per_account)):
            count = await self.counters.incr(f"authfail:{kind}:{key}", self.window)
            if count == self.counters.scaled(limit) and self.limiter is not None:
                level = await self.counters.incr(f"authlock:{kind}:{key}", self.lockout_memory)
                await self.limiter.acquire(f"authlock:{kind}:{key}", Rate(1, self.lockout(level), 1))
