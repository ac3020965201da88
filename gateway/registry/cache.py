"""The subscription cache of the RCPT hot path and the channels that keep it
honest across gateways.

The cache holds one entry per (list, address hash), positive and negative
("unknown", "unsubscribed" are cached too), in a bounded LRU: a list with a
million subscribers costs one entry per address actually looked up, never a
load of the list. Entries are dropped by invalidation events that name the
list and the address hash; a full flush happens whenever a channel
(re)connects. While a channel is down the cache answers nothing, so every
lookup goes to the database (and fails closed if that is down too).

A generation counter guards against the classic race: a lookup that read
the database before an invalidation arrived must not store its (possibly
old) answer after it.

Channels:
- ``postgres``: LISTEN on a dedicated asyncpg connection; the writers'
  ``pg_notify`` is part of their transaction, so a committed change is always
  announced. The connection is pinged every ``ping_interval``.
- ``redis``: pub/sub; writers publish after commit.
- ``local``: one process owns the database (SQLite): writers invalidate in
  process; a change counter in the database, polled, catches writes from
  other processes (the CLI).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Any, Callable, Sequence

from .store import Event, RegistryStore, decode_events, encode_events

log = logging.getLogger("gateway.registry")


class SubscriptionCache:
    def __init__(self, size: int, ttl: float, clock: Callable[[], float] = time.monotonic):
        self.size = size
        self.ttl = ttl
        self.clock = clock
        self.healthy = False            # set by the channel: only then may entries be served
        self.generation = 0
        self._entries: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()
        self._senders: OrderedDict[str, tuple[Any, float]] = OrderedDict()
        self.stats = {"hits": 0, "misses": 0, "invalidations": 0, "flushes": 0}

    def __len__(self) -> int:
        return len(self._entries)

    # --------------------------------------------------------- subscriptions
    def get(self, list_id: str, address_hash: str) -> str | None:
        if not self.healthy:
            self.stats["misses"] += 1
            return None
        key = (list_id, address_hash)
        hit = self._entries.get(key)
        if hit is None or self.clock() - hit[1] > self.ttl:
            self.stats["misses"] += 1
            return None
        self._entries.move_to_end(key)
        self.stats["hits"] += 1
        return hit[0]

    def put(self, list_id: str, address_hash: str, status: str, generation: int) -> None:
        if generation != self.generation or not self.healthy:
            return  # something changed (or the channel dropped) while we read: do not keep it
        key = (list_id, address_hash)
        self._entries[key] = (status, self.clock())
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    # --------------------------------------------------------- sender map (per account)
    def get_senders(self, account: str, allow_stale: bool = False) -> Any:
        hit = self._senders.get(account)
        if hit is None:
            return None
        if not allow_stale and (not self.healthy or self.clock() - hit[1] > self.ttl):
            return None
        self._senders.move_to_end(account)
        return hit[0]

    def put_senders(self, account: str, value: Any, generation: int) -> None:
        if generation != self.generation or not self.healthy:
            return
        self._senders[account] = (value, self.clock())
        while len(self._senders) > max(1000, self.size // 100):
            self._senders.popitem(last=False)

    # --------------------------------------------------------- invalidation
    def apply(self, events: Sequence[Event]) -> None:
        self.generation += 1
        for kind, list_id, address_hash in events:
            if kind == "s":
                self._entries.pop((list_id, address_hash), None)
                self.stats["invalidations"] += 1
            elif kind == "l":
                self._senders.clear()
            else:
                self.flush()

    def flush(self) -> None:
        self.generation += 1
        self._entries.clear()
        self._senders.clear()
        self.stats["flushes"] += 1


class Channel:
    """Base: in-process only. ``healthy`` says whether remote changes reach us."""

    name = "local"

    def __init__(self, cache: SubscriptionCache):
        self.cache = cache
        self._task: asyncio.Task | None = None

    async def start(self, wait: float = 5.0) -> None:
        self.cache.flush()
        self.cache.healthy = True

    async def publish(self, events: Sequence[Event]) -> None:
        """Tell the other gateways (after commit). Local: nothing to do."""

    async def stop(self) -> None:
        self.cache.healthy = False
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None

    async def _wait_connected(self, event: asyncio.Event, timeout: float) -> None:
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("registry invalidation channel (%s) not connected yet: RCPT checks read the "
                        "database until it is", self.name)


class LocalChannel(Channel):
    """Single process owns the database. The change counter catches writes by
    other processes (e.g. ``gateway list import`` run beside a gateway)."""

    name = "local"

    def __init__(self, cache: SubscriptionCache, store: RegistryStore, poll_interval: float):
        super().__init__(cache)
        self.store = store
        self.poll_interval = poll_interval
        self._seen = 0
        self._ready = asyncio.Event()

    async def start(self, wait: float = 5.0) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())
        await self._wait_connected(self._ready, wait)

    async def _run(self) -> None:
        first = True
        while True:
            try:
                version = await asyncio.wait_for(self.store.version(), max(2.0, self.poll_interval * 4))
                foreign = [v for v in range(self._seen + 1, version + 1) if v not in self.store.own_versions]
                if first or foreign or version < self._seen:
                    self.cache.flush()
                self.store.own_versions = {v for v in self.store.own_versions if v > version}
                self._seen = version
                self.cache.healthy = True
                first = False
                self._ready.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.cache.healthy:
                    log.warning("registry change counter unreadable (%s): cache off until it is", exc)
                self.cache.healthy = False
                first = True
            await asyncio.sleep(self.poll_interval)


class PostgresChannel(Channel):
    name = "postgres"

    def __init__(self, cache: SubscriptionCache, dsn: str, channel: str, ping_interval: float):
        super().__init__(cache)
        self.dsn = dsn
        self.channel = channel
        self.ping_interval = ping_interval
        self._connected = asyncio.Event()
        self.connects = 0

    async def start(self, wait: float = 5.0) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())
        await self._wait_connected(self._connected, wait)

    def _on_notify(self, _conn, _pid, _channel, payload: str) -> None:
        self.cache.apply(decode_events(payload))

    async def _run(self) -> None:
        import asyncpg

        backoff = 0.1
        while True:
            conn = None
            try:
                conn = await asyncpg.connect(self.dsn, timeout=5)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c: lost.set())
                await conn.add_listener(self.channel, self._on_notify)
                # Listening now: whatever changed before is re-read from the database.
                self.cache.flush()
                self.cache.healthy = True
                self.connects += 1
                self._connected.set()
                backoff = 0.1
                while not lost.is_set():
                    try:
                        await asyncio.wait_for(lost.wait(), self.ping_interval)
                    except asyncio.TimeoutError:
                        await asyncio.wait_for(conn.fetchval("SELECT 1"), max(1.0, self.ping_interval * 2))
                raise ConnectionError("LISTEN connection closed")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.cache.healthy:
                    log.warning("registry invalidation channel lost (%s): cache off, reconnecting", exc)
            finally:
                self.cache.healthy = False
                if conn is not None:
                    conn.terminate()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)


class RedisChannel(Channel):
    name = "redis"

    def __init__(self, cache: SubscriptionCache, url: str, channel: str, ping_interval: float):
        super().__init__(cache)
        import redis.asyncio as aioredis

        self.client = aioredis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
        self.channel = channel
        self.ping_interval = ping_interval
        self._connected = asyncio.Event()

    async def start(self, wait: float = 5.0) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())
        await self._wait_connected(self._connected, wait)

    async def publish(self, events: Sequence[Event]) -> None:
        for payload in encode_events(events):
            await asyncio.wait_for(self.client.publish(self.channel, payload), 5)

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            pubsub = self.client.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                confirmed = False
                last_pong = time.monotonic()
                last_ping = 0.0
                while True:
                    msg = await pubsub.get_message(timeout=self.ping_interval / 2)
                    now = time.monotonic()
                    if msg is not None:
                        kind = msg.get("type")
                        if kind == "subscribe" and not confirmed:
                            self.cache.flush()
                            self.cache.healthy = True
                            self._connected.set()
                            confirmed = True
                            backoff = 0.1
                        elif kind == "message":
                            data = msg["data"]
                            self.cache.apply(decode_events(data.decode() if isinstance(data, bytes) else data))
                        elif kind == "pong" or (kind == "message" and msg.get("data") in (b"PONG", "PONG")):
                            last_pong = now
                    if now - last_ping >= self.ping_interval:
                        await pubsub.ping()
                        last_ping = now
                    if now - last_pong > self.ping_interval * 4 + 1:
                        raise ConnectionError("no PONG from Redis")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.cache.healthy:
                    log.warning("registry invalidation channel lost (%s): cache off, reconnecting", exc)
            finally:
                self.cache.healthy = False
                try:
                    await pubsub.aclose()
                except Exception:
                    pass
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def stop(self) -> None:
        await super().stop()
        try:
            await self.client.aclose()
        except Exception:
            pass
