"""Shared counters for limits (AUTH failures now; rate limits and bulk
fingerprints later): fixed-window counts keyed by string.

Two implementations behind one narrow interface: in memory (one gateway) and
Redis (several gateways share the counts).

Redis down is a decision, not a crash: every Redis call has a deadline
(``[counters] timeout``, on the client's sockets and around the call). The
first call that fails or overruns it switches the counters to local
per-process counts (logged once, shown in /readyz and /metrics); a limit
checked against them is divided by ``expected_nodes``, the number of
gateways sharing the Redis, so N gateways counting alone together allow
about what the shared count would (``scaled``). While in fallback no call
waits for Redis: a background probe PINGs it after ``retry_interval``,
doubling to ``retry_max``; the first answer switches back (logged once).
The local counts of the outage are then dropped, the Redis counts (which
still hold what was counted before it) are used again.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Generic, Protocol, TypeVar

from .background import BackgroundTask

log = logging.getLogger("gateway.counters")


class Counters(Protocol):
    async def incr(self, key: str, window: float, amount: int = 1) -> int: ...
    async def get(self, key: str, window: float) -> int: ...
    async def get_many(self, keys: list[str], window: float) -> list[int]: ...
    async def reset(self, key: str, window: float) -> None: ...
    def scaled(self, limit: int) -> int: ...
    def health(self) -> dict: ...
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

    async def get_many(self, keys: list[str], window: float) -> list[int]:
        bucket = self._bucket(window)
        return [old[1] if (old := self._data.get(k)) is not None and old[0] == bucket else 0 for k in keys]

    async def reset(self, key: str, window: float) -> None:
        self._data.pop(key, None)

    def _sweep(self, window: float) -> None:
        bucket = self._bucket(window)
        for k in [k for k, (b, _) in self._data.items() if b != bucket]:
            del self._data[k]

    def scaled(self, limit: int) -> int:
        """The limit to hold these counts against: all of it (one gateway)."""
        return limit

    def health(self) -> dict:
        return {"backend": "memory", "state": "memory", "fallbacks": 0, "redis_errors": 0}

    async def close(self) -> None:
        self._data.clear()


class RedisCounters:
    """The same windows in Redis (INCRBY + EXPIRE in one round trip), with a
    local fallback while Redis is unreachable (see the module docstring)."""

    def __init__(self, url: str, prefix: str = "gw:", clock: Callable[[], float] = time.time, *,
                 timeout: float = 0.5, expected_nodes: int = 1, retry_interval: float = 1.0,
                 retry_max: float = 30.0):
        import redis.asyncio as redis  # imported here: only needed when configured
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # No retries inside the client: one deadline per call, then the fallback.
        self._redis = redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout,
                                     retry=Retry(NoBackoff(), 0))
        # The hot path (every call below, the limiter's and the distinct counter's scripts):
        # one pipelined connection of our own, ~6 us of CPU a command instead of ~41 (state/resp.py).
        from .resp import RespClient
        self._fast = RespClient(url)
        self._url = _safe_url(url)
        self._prefix = prefix
        self._clock = clock
        self.timeout = timeout
        self.expected_nodes = expected_nodes
        self.retry_interval = retry_interval
        self.retry_max = retry_max
        self.local = MemoryCounters(clock)
        self.fallback = False
        self.fallbacks = 0              # switches to the local counts
        self.redis_errors = 0           # calls that failed or overran the deadline
        self._probe = BackgroundTask("counters redis probe")

    def _key(self, key: str, window: float) -> str:
        return f"{self._prefix}c:{key}:{int(window)}:{int(self._clock() // window)}"

    async def _call(self, fn):
        """Run one Redis call under the deadline; None when it failed (the
        counters are in fallback from then on)."""
        try:
            async with asyncio.timeout(self.timeout):
                return await fn()
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception as exc:       # RedisError, OSError, the deadline: all mean "not now"
            self.redis_errors += 1
            self._fall_back(exc)
            return None

    def _fall_back(self, exc: BaseException) -> None:
        if self.fallback:
            return
        self.fallback = True
        self.fallbacks += 1
        log.warning("counters: Redis at %s unreachable (%s); counting locally per process with limits divided "
                    "by expected_nodes=%d until it answers again (probed every %g s, up to %g s)",
                    self._url, _describe(exc, self.timeout), self.expected_nodes, self.retry_interval,
                    self.retry_max)
        self._probe = BackgroundTask("counters redis probe")
        self._probe.start(self._reprobe)

    async def _reprobe(self) -> None:
        delay = self.retry_interval
        while True:
            await asyncio.sleep(delay)
            try:
                async with asyncio.timeout(self.timeout):
                    await self._fast.execute("PING")
            except (asyncio.CancelledError, KeyboardInterrupt):
                raise
            except Exception:
                self.redis_errors += 1
                delay = min(delay * 2, self.retry_max)
                continue
            self.fallback = False
            self.local = MemoryCounters(self._clock)     # the outage's local counts are dropped
            log.warning("counters: Redis at %s answers again; counting in Redis again", self._url)
            return

    async def incr(self, key: str, window: float, amount: int = 1) -> int:
        if not self.fallback:
            k = self._key(key, window)

            async def run():
                out = await self._fast.execute_many([("MULTI",), ("INCRBY", k, amount),
                                                     ("EXPIRE", k, int(window) + 1), ("EXEC",)])
                return int(out[3][0])
            count = await self._call(run)
            if count is not None:
                return count
        return await self.local.incr(key, window, amount)

    async def get(self, key: str, window: float) -> int:
        return (await self.get_many([key], window))[0]

    async def get_many(self, keys: list[str], window: float) -> list[int]:
        """The counts of several keys in one round trip (MGET)."""
        if not keys:
            return []
        if not self.fallback:
            ks = [self._key(k, window) for k in keys]
            values = await self._call(lambda: self._fast.execute("MGET", *ks))
            if values is not None:
                return [0 if v is None else int(v) for v in values]
        return await self.local.get_many(keys, window)

    async def reset(self, key: str, window: float) -> None:
        await self.local.reset(key, window)
        if not self.fallback:
            k = self._key(key, window)
            await self._call(lambda: self._fast.execute("DEL", k))

    def scaled(self, limit: int) -> int:
        """The limit to hold a count against: all of it while the count is
        shared, ``limit // expected_nodes`` (at least 1) while local."""
        return max(1, limit // self.expected_nodes) if self.fallback else limit

    def health(self) -> dict:
        return {"backend": "redis", "state": "fallback" if self.fallback else "redis",
                "fallbacks": self.fallbacks, "redis_errors": self.redis_errors}

    @property
    def prefix(self) -> str:
        """The key prefix (``[counters] key_prefix``): the rate limiter's keys
        (state/ratelimit.py) share it."""
        return self._prefix

    @property
    def client(self):
        """The Redis client (redis.asyncio) these counters use: other users of
        the same Redis (the resolver's shared DNS cache) borrow it instead of
        opening their own. It is closed by ``close()``, so borrowers must be
        done with it first."""
        return self._redis

    @property
    def fast(self):
        """The pipelined client of the hot path (state/resp.py), for the structures on these counters."""
        return self._fast

    async def ping(self) -> bool:
        return await self._fast.execute("PING") == b"PONG"

    async def close(self) -> None:
        await self._probe.stop()
        await self._fast.close()
        await self._redis.aclose()


L = TypeVar("L")


class OnRedisCounters(Generic[L]):
    """A structure kept in Redis by one Lua script (the rate limiter, the
    distinct counts), riding on the gateway's :class:`RedisCounters`: their
    client, prefix, per-call deadline, fallback, probe and health. While they
    are in fallback it works on a local copy (``local``), a fresh one per
    outage; ``_eval`` runs the script (loaded once, loaded again on NOSCRIPT)."""

    SCRIPT: str = ""

    def __init__(self, counters: RedisCounters, clock: Callable[[], float], max_keys: int,
                 make_local: Callable[[Callable[[], float], int], L]):
        self._counters = counters
        self._redis = counters.client       # redis-py: tests and tools; the calls go through _fast
        self._fast = counters.fast
        self._prefix = counters.prefix
        self._clock = clock
        self._max_keys = max_keys
        self._make_local = make_local
        self._sha: str | None = None        # SCRIPT LOAD's answer, cached
        self.script_loads = 0
        self._local = make_local(clock, max_keys)
        self._local_epoch = counters.fallbacks

    @property
    def local(self) -> L:
        """The local copy of the current outage (a fresh one per outage)."""
        if self._local_epoch != self._counters.fallbacks:
            self._local = self._make_local(self._clock, self._max_keys)
            self._local_epoch = self._counters.fallbacks
        return self._local

    async def _load(self) -> str:
        sha = await self._fast.execute("SCRIPT", "LOAD", self.SCRIPT)
        self.script_loads += 1
        return sha.decode() if isinstance(sha, bytes) else str(sha)

    async def _eval(self, keys: list[str], args: tuple) -> Any:
        """The script over ``keys`` under the counters' deadline; None when Redis is away."""
        from .resp import RespError

        async def run() -> Any:
            if self._sha is None:
                self._sha = await self._load()
            try:
                return await self._fast.execute("EVALSHA", self._sha, len(keys), *keys, *args)
            except RespError as exc:
                if not exc.noscript:
                    raise
                self._sha = await self._load()      # Redis restarted or its scripts flushed: load again, once
                return await self._fast.execute("EVALSHA", self._sha, len(keys), *keys, *args)
        return await self._counters._call(run)

    def health(self) -> dict:
        return self._counters.health()


def _safe_url(url: str) -> str:
    """The Redis URL without a password, for the log."""
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
