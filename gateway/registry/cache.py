"""The subscription cache of the RCPT hot path and the channels that keep it
honest across gateways.

Two layers, both answering "the status of (list, address hash)":

- **List snapshots** (``ListSnapshots``): every subscription state of a list
  (confirmed, pending, opted out) held in memory as sorted arrays of the
  96-bit address hashes, 12 bytes per address, so a list of 1,000,000
  subscribers costs ~12 MB and any recipient of it is answered without I/O.
  A list is loaded in the background, page by page, the first time mail for it
  is checked (the per-entry layer answers meanwhile), within a process-wide
  budget of ``snapshot_max_entries`` (least recently used lists are dropped
  beyond it; a bigger list is never loaded and stays on the per-entry layer).
  An invalidation event for (list, hash) marks that hash *dirty* in the
  snapshot: it is then answered by the per-entry layer (the database) until
  the next reload; many dirty hashes, or age (``snapshot_refresh``), reload
  the list in the background while the old snapshot keeps answering.
- **Per-entry cache** (``SubscriptionCache``): one entry per (list, address
  hash), positive and negative, in a bounded LRU, for what the snapshots do
  not answer (lists still loading, too big, dirty hashes).

Entries are dropped by invalidation events that name the list and the
address hash; a full flush (snapshots included) happens whenever a channel
(re)connects. While a channel is down neither layer answers, so every lookup
goes to the database (and fails closed if that is down too).

A generation counter guards against the classic race: a lookup that read
the database before an invalidation arrived must not store its (possibly
old) answer after it. Snapshots have the same guard: a snapshot collects the
events that arrive while it loads (its dirty set), and a flush during the
load discards it.

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
from array import array
from bisect import bisect_left
from collections import OrderedDict
from typing import Any, Awaitable, Callable, Sequence

from .store import Event, RegistryStore, decode_events, encode_events
from ..state.deadline import within
from ..state.background import stop_tasks

log = logging.getLogger("gateway.registry")


# ------------------------------------------------------------------ list snapshots
HASH_DIGITS = 24                       # address hashes: 12 bytes, hex (tokens.Keys.address_hash)
_LO_TYPE = next(t for t in ("I", "L") if array(t).itemsize == 4)
PAGE_SIZE = 5000                       # rows per snapshot page query
STATUSES = ("confirmed", "pending", "unsubscribed")

# fetch_page(list_id, table, after, limit) -> [(address_hash, status), ...] ordered by
# address_hash, hashes > after; table is "subscribers" or "suppressions".
FetchPage = Callable[[str, str, str, int], Awaitable[Sequence[tuple[str, str]]]]


class HashSet:
    """A sorted set of 96-bit keys in two flat arrays (high 64 bits, low 32
    bits): 12 bytes per key, looked up by a C-speed binary search."""

    __slots__ = ("hi", "lo", "_last", "sorted")

    def __init__(self) -> None:
        self.hi = array("Q")
        self.lo = array(_LO_TYPE)
        self._last = -1
        self.sorted = True

    def __len__(self) -> int:
        return len(self.hi)

    def extend(self, keys: list[int]) -> None:
        """Append keys (in order, if the database ordered them as numbers)."""
        if not keys:
            return
        if self.sorted:
            last = self._last
            for k in keys:
                if k <= last:
                    self.sorted = False
                    break
                last = k
            self._last = last
        self.hi.extend([k >> 32 for k in keys])
        self.lo.extend([k & 0xFFFFFFFF for k in keys])

    def finish(self) -> None:
        """Sort, if the pages did not come in numeric order (a collation that
        does not order hex digits as numbers)."""
        if self.sorted:
            return
        keys = sorted(set((h << 32) | lo for h, lo in zip(self.hi, self.lo)))
        self.hi = array("Q", [k >> 32 for k in keys])
        self.lo = array(_LO_TYPE, [k & 0xFFFFFFFF for k in keys])
        self.sorted = True

    def __contains__(self, key: int) -> bool:
        hi = key >> 32
        lo = key & 0xFFFFFFFF
        his = self.hi
        i = bisect_left(his, hi)
        n = len(his)
        while i < n and his[i] == hi:
            if self.lo[i] == lo:
                return True
            i += 1
        return False


class ListSnapshot:
    """Every subscription state of one list, as loaded, plus the hashes
    changed since the load began (answered elsewhere)."""

    __slots__ = ("list_id", "sets", "dirty", "size", "loaded_at", "used")

    def __init__(self, list_id: str):
        self.list_id = list_id
        self.sets = {s: HashSet() for s in STATUSES}
        self.dirty: set[str] = set()
        self.size = 0
        self.loaded_at = 0.0
        self.used = 0

    def lookup(self, address_hash: str) -> str | None:
        """confirmed > pending > unsubscribed > unknown (as the database
        query ranks them); None for a dirty or malformed hash."""
        if address_hash in self.dirty or len(address_hash) != HASH_DIGITS:
            return None
        try:
            key = int(address_hash, 16)
        except ValueError:
            return None
        sets = self.sets
        if key in sets["confirmed"]:
            return "confirmed"
        if key in sets["pending"]:
            return "pending"
        if key in sets["unsubscribed"]:
            return "unsubscribed"
        return "unknown"


class SnapshotTooBig(Exception):
    pass


class ListSnapshots:
    """The snapshots of one process: which lists are loaded, loading one at a
    time in the background, the memory budget, and the events that concern
    them. Serves only while the invalidation channel is healthy (the caller
    checks that)."""

    def __init__(self, fetch_page: FetchPage, *, max_entries: int, refresh: float,
                 clock: Callable[[], float] = time.monotonic, page_size: int = PAGE_SIZE,
                 retry_after: float = 60.0):
        self.fetch_page = fetch_page
        self.max_entries = max_entries
        self.refresh = refresh
        self.clock = clock
        self.page_size = page_size
        self.retry_after = retry_after
        self._ready: dict[str, ListSnapshot] = {}
        self._loading: dict[str, ListSnapshot] = {}
        self._queue: OrderedDict[str, None] = OrderedDict()
        self._not_before: dict[str, float] = {}       # list -> no load attempt before (too big, failed)
        self._worker: asyncio.Task | None = None
        self._tick = 0
        self.epoch = 0                                 # bumped by flush: loads in flight are void
        self.entries = 0                               # addresses held by the ready snapshots
        self.stats = {"hits": 0, "loads": 0, "load_failures": 0, "too_big": 0, "evictions": 0,
                      "discarded": 0, "load_seconds": 0.0}

    def __len__(self) -> int:
        return len(self._ready)

    def ready(self, list_id: str) -> bool:
        return list_id in self._ready

    # ---------------------------------------------------------- hot path
    def lookup(self, list_id: str, address_hash: str) -> str | None:
        snap = self._ready.get(list_id)
        if snap is None:
            self.want(list_id)
            return None
        self._tick += 1
        snap.used = self._tick
        if not self._tick & 1023 and self.clock() - snap.loaded_at > self.refresh:
            self.want(list_id)      # old: reload in the background, keep answering meanwhile
        status = snap.lookup(address_hash)
        if status is None:
            if len(snap.dirty) > max(1000, snap.size // 10):
                self.want(list_id)
            return None
        self.stats["hits"] += 1
        return status

    def want(self, list_id: str) -> None:
        """Have this list loaded (or reloaded) in the background."""
        if list_id in self._loading or list_id in self._queue:
            return
        not_before = self._not_before.get(list_id)
        if not_before is not None:
            if self.clock() < not_before:
                return
            del self._not_before[list_id]
        self._queue[list_id] = None
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._work())

    # ---------------------------------------------------------- events
    def changed(self, list_id: str, address_hash: str) -> None:
        for table in (self._ready, self._loading):
            snap = table.get(list_id)
            if snap is not None:
                snap.dirty.add(address_hash)

    def flush(self) -> None:
        """Forget everything (a channel (re)connected, or an event said so);
        loads in flight are discarded when they finish their page."""
        self.epoch += 1
        self._ready.clear()
        self._loading.clear()
        self._queue.clear()
        self.entries = 0

    def drop(self, list_id: str) -> None:
        snap = self._ready.pop(list_id, None)
        if snap is not None:
            self.entries -= snap.size

    # ---------------------------------------------------------- loading
    async def _work(self) -> None:
        while self._queue:
            list_id, _ = self._queue.popitem(last=False)
            try:
                await self._load(list_id)
            except asyncio.CancelledError:
                raise
            except SnapshotTooBig:
                self.stats["too_big"] += 1
                self._not_before[list_id] = self.clock() + self.refresh
                log.info("registry list %s has more than %d subscription entries: not held in memory "
                         "(snapshot_max_entries); its recipients are looked up one by one", list_id,
                         self.max_entries)
            except Exception as exc:
                self.stats["load_failures"] += 1
                self._not_before[list_id] = self.clock() + self.retry_after
                log.warning("registry list %s: snapshot load failed (%s: %s); retrying in %.0f s, "
                            "lookups read the database meanwhile", list_id, type(exc).__name__, exc,
                            self.retry_after)

    async def _load(self, list_id: str) -> None:
        epoch = self.epoch
        started = time.perf_counter()
        snap = ListSnapshot(list_id)
        self._loading[list_id] = snap
        try:
            size = 0
            for table in ("subscribers", "suppressions"):
                after = ""
                while True:
                    rows = await self.fetch_page(list_id, table, after, self.page_size)
                    if epoch != self.epoch:
                        self.stats["discarded"] += 1
                        return
                    keys: dict[str, list[int]] = {s: [] for s in STATUSES}
                    for address_hash, status in rows:
                        if len(address_hash) != HASH_DIGITS or status not in keys:
                            raise ValueError(f"unexpected row ({address_hash!r}, {status!r})")
                        keys[status].append(int(address_hash, 16))
                    for status, found in keys.items():
                        snap.sets[status].extend(found)
                    size += len(rows)
                    if size > self.max_entries:
                        raise SnapshotTooBig(list_id)
                    if len(rows) < self.page_size:
                        break
                    after = rows[-1][0]
            for s in snap.sets.values():
                s.finish()
        finally:
            if self._loading.get(list_id) is snap:
                del self._loading[list_id]
        snap.size = size
        snap.loaded_at = self.clock()
        self._tick += 1
        snap.used = self._tick
        self.drop(list_id)
        while self.entries + size > self.max_entries and self._ready:
            victim = min(self._ready.values(), key=lambda s: s.used)
            self.drop(victim.list_id)
            self.stats["evictions"] += 1
        self._ready[list_id] = snap
        self.entries += size
        self.stats["loads"] += 1
        elapsed = time.perf_counter() - started
        self.stats["load_seconds"] += elapsed
        log.info("registry list %s held in memory: %d subscription entries, loaded in %.2f s",
                 list_id, size, elapsed)

    async def stop(self) -> None:
        self.flush()
        worker, self._worker = self._worker, None
        await stop_tasks([worker], "list snapshot loader")


class SubscriptionCache:
    def __init__(self, size: int, ttl: float, clock: Callable[[], float] = time.monotonic):
        self.size = size
        self.ttl = ttl
        self.clock = clock
        self.healthy = False            # set by the channel: only then may entries be served
        self.generation = 0
        self._entries: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()
        self._senders: OrderedDict[str, tuple[Any, float]] = OrderedDict()
        self.snapshots: ListSnapshots | None = None    # whole lists in memory (set by the service)
        # called on a list change (its senders may differ): the service forgets
        # the senders it would answer from while the database is away
        self.on_lists_changed: Callable[[], None] | None = None
        self.stats = {"hits": 0, "misses": 0, "invalidations": 0, "flushes": 0}

    def __len__(self) -> int:
        return len(self._entries)

    # --------------------------------------------------------- subscriptions
    def get(self, list_id: str, address_hash: str) -> str | None:
        if not self.healthy:
            self.stats["misses"] += 1
            return None
        if self.snapshots is not None:
            status = self.snapshots.lookup(list_id, address_hash)
            if status is not None:
                return status
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
                if self.snapshots is not None:
                    self.snapshots.changed(list_id, address_hash)
                self.stats["invalidations"] += 1
            elif kind == "l":
                self._senders.clear()
                if self.on_lists_changed is not None:
                    self.on_lists_changed()
            else:
                self.flush()

    def flush(self) -> None:
        self.generation += 1
        self._entries.clear()
        self._senders.clear()
        if self.snapshots is not None:
            self.snapshots.flush()
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
        task, self._task = self._task, None
        await stop_tasks([task], f"registry invalidation channel ({self.name})")

    async def _wait_connected(self, event: asyncio.Event, timeout: float) -> None:
        try:
            await within(event.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("registry invalidation channel (%s) not connected yet: RCPT checks read the "
                        "database until it is", self.name)


class RemoteChannel(Channel):
    """A channel to a server (PostgreSQL LISTEN, Redis pub/sub): one session
    at a time, reconnected with a backoff (0.1 s doubling to 2 s) whenever it
    ends; the cache serves nothing between sessions."""

    def __init__(self, cache: SubscriptionCache):
        super().__init__(cache)
        self._connected = asyncio.Event()
        self._backoff = 0.1

    async def start(self, wait: float = 5.0) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())
        await self._wait_connected(self._connected, wait)

    def _listening(self) -> None:
        """Called by a session once changes reach it: whatever changed before is
        re-read from the database, and the cache may serve again."""
        self.cache.flush()
        self.cache.healthy = True
        self._connected.set()
        self._backoff = 0.1

    async def _session(self) -> None:
        """Connect, call ``_listening()``, apply events until the connection is
        lost (raise), and close what it opened."""
        raise NotImplementedError

    async def _run(self) -> None:
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.cache.healthy:
                    log.warning("registry invalidation channel lost (%s): cache off, reconnecting", exc)
            finally:
                self.cache.healthy = False
            await asyncio.sleep(self._backoff)
            self._backoff = min(self._backoff * 2, 2.0)


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
                version = await within(self.store.version(), max(2.0, self.poll_interval * 4))
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


class PostgresChannel(RemoteChannel):
    name = "postgres"

    def __init__(self, cache: SubscriptionCache, dsn: str, channel: str, ping_interval: float):
        super().__init__(cache)
        self.dsn = dsn
        self.channel = channel
        self.ping_interval = ping_interval
        self.connects = 0

    def _on_notify(self, _conn, _pid, _channel, payload: str) -> None:
        self.cache.apply(decode_events(payload))

    async def _session(self) -> None:
        import asyncpg

        conn = None
        try:
            conn = await asyncpg.connect(self.dsn, timeout=5)
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _c: lost.set())
            await conn.add_listener(self.channel, self._on_notify)
            self._listening()
            self.connects += 1
            while not lost.is_set():
                try:
                    await within(lost.wait(), self.ping_interval)
                except asyncio.TimeoutError:
                    await within(conn.fetchval("SELECT 1"), max(1.0, self.ping_interval * 2))
            raise ConnectionError("LISTEN connection closed")
        finally:
            if conn is not None:
                conn.terminate()


class RedisChannel(RemoteChannel):
    name = "redis"

    def __init__(self, cache: SubscriptionCache, url: str, channel: str, ping_interval: float):
        super().__init__(cache)
        import redis.asyncio as aioredis

        self.client = aioredis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
        self.channel = channel
        self.ping_interval = ping_interval

    async def publish(self, events: Sequence[Event]) -> None:
        for payload in encode_events(events):
            await within(self.client.publish(self.channel, payload), 5)

    async def _session(self) -> None:
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
                        self._listening()
                        confirmed = True
                    elif kind == "message":
                        data = msg["data"]
                        self.cache.apply(decode_events(data.decode() if isinstance(data, bytes) else data))
                    elif kind == "pong":
                        last_pong = now
                if now - last_ping >= self.ping_interval:
                    await pubsub.ping()
                    last_ping = now
                if now - last_pong > self.ping_interval * 4 + 1:
                    raise ConnectionError("no PONG from Redis")
        finally:
            try:
                await pubsub.aclose()
            except Exception:
                pass

    async def stop(self) -> None:
        await super().stop()
        try:
            await self.client.aclose()
        except Exception:
            pass
