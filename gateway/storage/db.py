"""Database engine and schema migrations (SQLite embedded, PostgreSQL shared)."""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Sequence

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ..state.deadline import within
from ..state.background import stop_tasks

MIGRATIONS = Path(__file__).parent / "migrations"

log = logging.getLogger("gateway.storage")

SQLITE_BUSY_TIMEOUT_MS = 30000


def create_engine(url: str, *, connect_timeout: float = 5.0, command_timeout: float = 10.0,
                  pool_timeout: float = 5.0) -> AsyncEngine:
    """The engine for ``url``. On PostgreSQL every wait has a deadline: asyncpg's
    connect (``timeout``) and each statement (``command_timeout``), and the
    pool's hand-out of a connection (``pool_timeout``)."""
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # pragma: no cover - driver callback
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            # Deleted content is overwritten with zeros (in the page, hence in the WAL
            # frame and, after a checkpoint, in the main file), whatever the SQLite build's
            # default: an opted-out address must leave no bytes behind (P-OPTOUT).
            cur.execute("PRAGMA secure_delete=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cur.close()

        return engine
    return create_async_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True, pool_timeout=pool_timeout,
                               connect_args={"timeout": connect_timeout, "command_timeout": command_timeout})


# Query arguments of SQLAlchemy's asyncpg dialect that asyncpg itself does not know
# (asyncpg would send unknown ones to the server as settings).
_SQLALCHEMY_ONLY_ARGS = ("prepared_statement_cache_size", "prepared_statement_name_func", "async_fallback")


def asyncpg_dsn(url: str | URL) -> str | None:
    """The libpq-style DSN asyncpg takes for a SQLAlchemy PostgreSQL URL
    (``postgresql+asyncpg://user:pw@host:5432/db`` -> ``postgresql://user:pw@host:5432/db``),
    or None for any other database. For the registry's read-only fast path."""
    u = make_url(url) if isinstance(url, str) else url
    if u.get_backend_name() != "postgresql":
        return None
    u = u.set(drivername="postgresql").difference_update_query(_SQLALCHEMY_ONLY_ARGS)
    return u.render_as_string(hide_password=False)


def _alembic_config(connection) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


async def migrate(engine: AsyncEngine, revision: str = "head") -> None:
    """Bring the schema to ``revision`` (idempotent; safe with several gateways)."""
    async with engine.begin() as conn:
        await conn.run_sync(lambda sync_conn: command.upgrade(_alembic_config(sync_conn), revision))


class WalCheckpointer:
    """Empties a SQLite database's write-ahead log after personal data was deleted.

    With ``secure_delete`` the page that held a deleted row is zeroed where the
    row was, but the WAL still holds the earlier versions of that page (the
    insert, each update) until a checkpoint copies the newest versions into
    the main file and ``TRUNCATE`` cuts the log to zero bytes.

    ``request()`` asks for a checkpoint that covers every commit made before
    the call and waits for its first attempt, at most ``wait`` seconds; it
    never raises (the deletion it follows is committed already and must not
    fail for this). Requests are coalesced: one checkpoint runs at a time, and
    requests that arrive while it runs are served by the next one. The
    checkpoint runs on the connection's own thread (aiosqlite), never on the
    event loop. It needs every reader to be on the newest snapshot: while a
    reader (another process, a long export, a backup) still reads an older
    one, SQLite waits ``busy_timeout_ms`` and then reports it busy; the WAL is
    left as it is, ``request()`` returns False, and the checkpoint is retried
    in the background after each of ``retry_delays`` (then every last delay),
    at once when another request comes, until it succeeds. ``stats`` counts
    the attempts by result (ok, busy, error)."""

    def __init__(self, engine: AsyncEngine, *, busy_timeout_ms: int = 100,
                 retry_delays: Sequence[float] = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60), wait: float = 1.0):
        self.engine = engine
        self.busy_timeout_ms = busy_timeout_ms
        self.retry_delays = tuple(retry_delays)
        self.wait = wait
        self.stats = {"ok": 0, "busy": 0, "error": 0}
        self._requested = 0     # requests so far
        self._done = 0          # requests covered by a successful checkpoint
        self._failed = 0        # requests covered by an attempt that failed (retried later)
        self._task: asyncio.Task | None = None
        self._changed = asyncio.Event()   # set (and replaced) after every attempt
        self._kick = asyncio.Event()      # cuts a retry delay short
        self._failing_since: float | None = None

    @property
    def pending(self) -> bool:
        return self._done < self._requested

    async def request(self, wait: float | None = None) -> bool:
        """True when the WAL was emptied after this call (within ``wait``)."""
        self._requested += 1
        self._kick.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        return await self._wait_for(self._requested, self.wait if wait is None else wait)

    async def _wait_for(self, target: int, wait: float) -> bool:
        deadline = time.monotonic() + wait
        while self._done < target:
            left = deadline - time.monotonic()
            if left <= 0 or self._failed >= target:
                return False
            try:
                await within(self._changed.wait(), left)
            except asyncio.TimeoutError:
                return False
        return True

    async def close(self, wait: float = 2.0) -> None:
        """Try a pending checkpoint once more (within ``wait`` seconds), then stop retrying."""
        if self._task is None or self._task.done():
            return
        attempts = sum(self.stats.values())
        self._kick.set()
        deadline = time.monotonic() + wait
        while self.pending and sum(self.stats.values()) == attempts:   # one more attempt at most
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                await within(self._changed.wait(), left)
            except asyncio.TimeoutError:
                break
        await stop_tasks([self._task], "SQLite checkpointer")
        if self.pending:
            log.warning("SQLite WAL not checkpointed before shutdown (a reader held it): deleted data stays "
                        "in the -wal file until the next checkpoint (SQLite makes one when the last "
                        "connection closes, or at the next deletion)")

    async def _run(self) -> None:
        attempt = 0
        while self._done < self._requested:
            target = self._requested
            self._kick.clear()
            result = await self._checkpoint()
            self.stats[result] += 1
            if result == "ok":
                attempt = 0
                if self._failing_since is not None:
                    log.info("SQLite WAL checkpoint done after %.1f s of retries",
                             time.monotonic() - self._failing_since)
                    self._failing_since = None
                self._done = target
            else:
                self._failed = target
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()
            if result == "ok":
                continue
            if self._failing_since is None:
                self._failing_since = time.monotonic()
            delay = self.retry_delays[min(attempt, len(self.retry_delays) - 1)]
            attempt += 1
            (log.warning if attempt == 4 else log.debug)(
                "SQLite WAL checkpoint %s (attempt %d): a reader still holds an older snapshot; deleted "
                "data stays in the -wal file until it succeeds; retrying in %g s", result, attempt, delay)
            try:
                await within(self._kick.wait(), delay)
            except asyncio.TimeoutError:
                pass

    async def _checkpoint(self) -> str:
        try:
            async with self.engine.connect() as conn:
                await conn.exec_driver_sql(f"PRAGMA busy_timeout={int(self.busy_timeout_ms)}")
                try:
                    busy = (await conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")).one()[0]   # (busy, log, checkpointed)
                finally:
                    await conn.exec_driver_sql(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        except asyncio.CancelledError:
            raise
        except Exception as exc:   # e.g. "database is locked": retried like busy
            log.debug("SQLite WAL checkpoint failed: %s", exc)
            return "error"
        return "busy" if busy else "ok"


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says the database is away (down, black-holed, refusing,
    over its deadline) rather than that our code is wrong: an outage is
    expected and logged once without a traceback, a bug with one."""
    from sqlalchemy.exc import DBAPIError, TimeoutError as PoolTimeout

    if isinstance(exc, DBAPIError):
        return exc.connection_invalidated or isinstance(exc.orig, (OSError, TimeoutError)) or \
            type(exc).__name__ in ("OperationalError", "InterfaceError")
    return isinstance(exc, (OSError, TimeoutError, PoolTimeout, ConnectionError))
