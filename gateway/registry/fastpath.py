"""Read-only fast path of the RCPT hot path on PostgreSQL.

Three queries of the SMTP side — the subscription status of (list, address
hash), the pages that load a list's in-memory snapshot, and an account's
lists with their envelope senders — are served through a dedicated asyncpg
pool instead of the SQLAlchemy engine:

- no SQLAlchemy/greenlet layer, no ``pool_pre_ping`` ``SELECT 1``, no implicit
  ``BEGIN``/``ROLLBACK``: one prepared statement (asyncpg caches it per
  connection), autocommit, one round trip; a connection goes back to the pool
  without the default ``RESET ALL`` round trip (nothing here changes session
  state);
- its own pool (``registry.lookup_pool_size`` connections, opened on demand),
  so RCPT lookups neither wait for nor starve the engine's pool;
- misses for the same list that reach it in the same event-loop turn are
  answered by one query (``address_hash = ANY($2)``): 50 sessions sending to
  one list put several misses in flight at once. The batch waits for nothing
  but the end of the current loop turn.

Everything that writes, and everything on SQLite, stays on the one
SQLAlchemy code path of ``store.py``; this module only reads, and answers
exactly what ``RegistryStore.lookup_status`` / ``lists(account_name=)``
answer. Errors propagate (the service turns them into RegistryUnavailable);
each query is bounded by ``timeout``.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Iterable

from .model import MailingList, RecipientStatus
from ..state.deadline import within
from ..state.background import stop_tasks

log = logging.getLogger("gateway.registry")

STATUS_SQL = (
    "SELECT address_hash, status FROM list_subscribers"
    " WHERE list_id = $1 AND address_hash = ANY($2::varchar[])"
    " UNION ALL "
    "SELECT address_hash, 'unsubscribed' FROM list_suppressions"
    " WHERE list_id = $1 AND address_hash = ANY($2::varchar[])")

LISTS_SQL = (
    "SELECT m.id, m.account_id, a.name AS account_name, m.name, m.list_id, m.confirm_from, m.created_at,"
    " ARRAY(SELECT s.pattern FROM list_senders s WHERE s.list_id = m.id ORDER BY s.id) AS senders"
    " FROM mailing_lists m JOIN accounts a ON a.id = m.account_id"
    " WHERE a.name = $1 ORDER BY m.created_at, m.id")

PAGE_SQL = {
    "subscribers": "SELECT address_hash, status FROM list_subscribers"
                   " WHERE list_id = $1 AND address_hash > $2 ORDER BY address_hash LIMIT $3",
    "suppressions": "SELECT address_hash, 'unsubscribed' FROM list_suppressions"
                    " WHERE list_id = $1 AND address_hash > $2 ORDER BY address_hash LIMIT $3",
}

_RANK = {"confirmed": 0, "pending": 1, "unsubscribed": 2}
MAX_BATCH = 500          # hashes per query
MAX_RUNNING = 4          # batched status queries at once (per process); more misses wait for a slot


def pick_statuses(rows: Iterable, hashes: Iterable[str]) -> dict[str, RecipientStatus]:
    """{hash: status}; confirmed > pending > unsubscribed > unknown (as lookup_status)."""
    best: dict[str, str] = {}
    for h, status in rows:
        cur = best.get(h)
        if cur is None or _RANK.get(status, 9) < _RANK.get(cur, 9):
            best[h] = status
    return {h: best.get(h, "unknown") for h in hashes}  # type: ignore[misc]  # the stored statuses are RecipientStatus values, typed str


async def _no_reset(_conn) -> None:
    """Pool release without ``RESET ALL``: these connections only ever run
    autocommit SELECTs (asyncpg still rolls back a transaction left open)."""


class FastLookups:
    def __init__(self, dsn: str, *, max_size: int = 20, timeout: float = 3.0, batch: bool = True,
                 max_running: int = MAX_RUNNING):
        self.dsn = dsn
        self.max_size = max_size
        self.max_running = max(1, min(max_running, max_size))
        self._running = 0
        self.timeout = timeout
        self.batch = batch
        self._pool = None
        self._pool_lock: asyncio.Lock | None = None
        self._pending: dict[str, dict[str, asyncio.Future]] = {}
        self._flush_handle: asyncio.Handle | None = None
        self._tasks: set[asyncio.Task] = set()
        # queries/lookups/errors: status queries, hashes asked for, failed status queries
        self.stats = {"queries": 0, "lookups": 0, "errors": 0, "list_queries": 0, "page_queries": 0}

    # ------------------------------------------------------------ pool
    async def _get_pool(self):
        pool = self._pool
        if pool is not None:
            return pool
        if self._pool_lock is None:
            self._pool_lock = asyncio.Lock()
        async with self._pool_lock:
            if self._pool is None:
                import asyncpg

                # min_size=0: creating the pool connects nothing, so it cannot fail;
                # connections open on demand (bounded by timeout) and close after
                # 5 idle minutes.
                self._pool = await asyncpg.create_pool(
                    self.dsn, min_size=0, max_size=self.max_size, reset=_no_reset, timeout=self.timeout,
                    max_inactive_connection_lifetime=300.0,
                    server_settings={"application_name": "gateway-registry-lookup"})
            return self._pool

    async def close(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        pending, self._pending = self._pending, {}
        for futs in pending.values():
            for fut in futs.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("registry lookups stopped"))
                    fut.exception()
        await stop_tasks(list(self._tasks), "registry lookups")
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await within(pool.close(), 5)
            except Exception:
                pool.terminate()

    # ------------------------------------------------------------ queries
    async def _fetch_statuses(self, list_id: str, hashes: list[str]) -> dict[str, RecipientStatus]:
        pool = await self._get_pool()
        self.stats["queries"] += 1
        self.stats["lookups"] += len(hashes)
        async with asyncio.timeout(self.timeout):
            rows = await pool.fetch(STATUS_SQL, list_id, hashes)
        return pick_statuses(rows, hashes)

    async def lookup_status(self, list_id: str, address_hash: str) -> RecipientStatus:
        if not self.batch:
            return (await self._fetch_statuses(list_id, [address_hash]))[address_hash]
        loop = asyncio.get_running_loop()
        futs = self._pending.get(list_id)
        if futs is None:
            futs = self._pending[list_id] = {}
        fut = futs.get(address_hash)
        if fut is None:
            fut = futs[address_hash] = loop.create_future()
        if self._flush_handle is None:
            self._flush_handle = loop.call_soon(self._flush)
        # shield: a caller that gives up (timeout, cancelled session) must not
        # cancel the answer the other callers of this batch wait for.
        return await asyncio.shield(fut)

    def _flush(self) -> None:
        """Start a query per list for what is pending, while fewer than
        ``max_running`` run; the rest waits for the next free slot (and grows:
        under load, batches get bigger instead of queries more numerous)."""
        self._flush_handle = None
        loop = asyncio.get_running_loop()
        while self._pending and self._running < self.max_running:
            list_id = next(iter(self._pending))
            futs = self._pending[list_id]
            if len(futs) <= MAX_BATCH:
                del self._pending[list_id]
                chunk = futs
            else:
                chunk = {}
                for h in list(futs)[:MAX_BATCH]:
                    chunk[h] = futs.pop(h)
            self._running += 1
            task = loop.create_task(self._run_batch(list_id, chunk))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run_batch(self, list_id: str, futs: dict[str, asyncio.Future]) -> None:
        try:
            found = await self._fetch_statuses(list_id, list(futs))
        except BaseException as exc:  # noqa: BLE001 - every waiter must learn of it
            self._done_running()
            self.stats["errors"] += 1
            err = exc if isinstance(exc, Exception) else ConnectionError("registry lookup cancelled")
            for fut in futs.values():
                if not fut.done():
                    fut.set_exception(err)
                    fut.exception()   # retrieved: no "never retrieved" noise if every waiter gave up
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        self._done_running()
        for h, fut in futs.items():
            if not fut.done():
                fut.set_result(found[h])

    def _done_running(self) -> None:
        self._running -= 1
        if self._pending and self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    async def subscription_page(self, list_id: str, table: str, after: str, limit: int) -> list[tuple[str, str]]:
        """One page of a list snapshot's load (as RegistryStore.subscription_page;
        bounded by the caller, RegistryService._snapshot_page, on both paths)."""
        pool = await self._get_pool()
        self.stats["page_queries"] += 1
        rows = await pool.fetch(PAGE_SQL[table], list_id, after, limit)
        return [(r[0], r[1]) for r in rows]

    async def lists(self, account_name: str) -> list[MailingList]:
        """The account's lists with their senders (as RegistryStore.lists(account_name=...))."""
        pool = await self._get_pool()
        self.stats["list_queries"] += 1
        async with asyncio.timeout(self.timeout):
            rows = await pool.fetch(LISTS_SQL, account_name)
        return [MailingList(r["id"], r["account_id"], r["account_name"], r["name"], r["list_id"],
                            tuple(r["senders"] or ()), r["confirm_from"], r["created_at"]) for r in rows]
