"""AUTH failure limits per client IP and per account name (P-LOAD):
password guessing is cut off, and stays cut off for the window.

While the shared counters are down the counts are local to this gateway and
each limit is the counters' ``scaled`` share of it (state/counters.py)."""
from __future__ import annotations


class AuthLimiter:
    def __init__(self, counters, max_per_ip: int, max_per_account: int, window: float):
        self.counters = counters
        self.max_per_ip = max_per_ip
        self.max_per_account = max_per_account
        self.window = window

    async def ip_blocked(self, ip: str) -> bool:
        count = await self.counters.get(f"authfail:ip:{ip}", self.window)
        return count >= self.counters.scaled(self.max_per_ip)

    async def account_blocked(self, name: str) -> bool:
        count = await self.counters.get(f"authfail:acct:{name}", self.window)
        return count >= self.counters.scaled(self.max_per_account)

    async def failed(self, ip: str, name: str) -> None:
        await self.counters.incr(f"authfail:ip:{ip}", self.window)
        await self.counters.incr(f"authfail:acct:{name}", self.window)
