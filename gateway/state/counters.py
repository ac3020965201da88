"""Shared counters for limits (AUTH failures now; rate limits and bulk
fingerprints later): fixed-window counts keyed by string.

Two implementations behind one narrow interface: in memory (one gateway) and
Redis (several gateways share the counts).
"""
from __future__ import annotations

import time
from typing import Callable, Protocol


class Counters(Protocol):
    async def incr(self, key: str, window: float, amount: int = 1) -> int: ...
    async def get(self, key: str, window: float) -> int: ...
    async def reset(self, key: str, window: float) -> None: ...
    async def close(self) -> None: ...


class MemoryCounters:
    """Fixed windows aligned to multiples of ``window``; expired keys are swept lazily."""

    def __init__(self, clock: Callable[[], float] = time.time, max_keys: int = 1_000_000):
        self._clock = clock
        self._data: dict[str, tuple[int, int]] = {}  # key -> (bucket, count)
        self._max_keys = max_keys

    def _bucket(self, window: float) -> int:
        return int(self._clock() // window)

    async def incr(self, key: str, window: float, amount: int = 1) -> int:
        bucket = self._bucket(window)
        old = self._data.get(key)
        count = amount if old is None or old[0] != bucket else old[1] + amount
        if old is None and len(self._data) >= self._max_keys:
            self._sweep(window)
        self._data[key] = (bucket, count)
        return count

    async def get(self, key: str, window: float) -> int:
        old = self._data.get(key)
        if old is None or old[0] != self._bucket(window):
            return 0
        return old[1]

    async def reset(self, key: str, window: float) -> None:
        self._data.pop(key, None)

    def _sweep(self, window: float) -> None:
        bucket = self._bucket(window)
        for k in [k for k, (b, _) in self._data.items() if b != bucket]:
            del self._data[k]

    async def close(self) -> None:
        self._data.clear()


class RedisCounters:
    """The same windows in Redis: INCRBY + EXPIRE in one round trip."""

    def __init__(self, url: str, prefix: str = "gw:", clock: Callable[[], float] = time.time):
        import redis.asyncio as redis  # imported here: only needed when configured

        self._redis = redis.from_url(url)
        self._prefix = prefix
        self._clock = clock

    def _key(self, key: str, window: float) -> str:
        return f"{self._prefix}c:{key}:{int(window)}:{int(self._clock() // window)}"

    async def incr(self, key: str, window: float, amount: int = 1) -> int:
        k = self._key(key, window)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incrby(k, amount)
            pipe.expire(k, int(window) + 1)
            count, _ = await pipe.execute()
        return int(count)

    async def get(self, key: str, window: float) -> int:
        value = await self._redis.get(self._key(key, window))
        return int(value) if value is not None else 0

    async def reset(self, key: str, window: float) -> None:
        await self._redis.delete(self._key(key, window))

    @property
    def client(self):
        """The Redis client (redis.asyncio) these counters use: other users of
        the same Redis (the resolver's shared DNS cache) borrow it instead of
        opening their own. It is closed by ``close()``, so borrowers must be
        done with it first."""
        return self._redis

    async def ping(self) -> bool:
        return bool(await self._redis.ping())

    async def close(self) -> None:
        await self._redis.aclose()
