"""Connection accounting for the global and per-IP caps (P-LOAD)."""
from __future__ import annotations

from collections import Counter


class ConnectionTracker:
    def __init__(self) -> None:
        self.total = 0
        self.per_ip: Counter[str] = Counter()

    def opened(self, ip: str) -> None:
        self.total += 1
        self.per_ip[ip] += 1

    def closed(self, ip: str) -> None:
        self.total -= 1
        self.per_ip[ip] -= 1
        if self.per_ip[ip] <= 0:
            del self.per_ip[ip]

    def count(self, ip: str) -> int:
        return self.per_ip.get(ip, 0)
