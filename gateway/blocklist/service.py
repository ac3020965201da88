"""The block lists a running gateway enforces: an in-memory snapshot kept in
step with the database.

Propagation is by polling, not PostgreSQL LISTEN/NOTIFY: every
``poll_interval`` (0.5 s) the refresher reads the one-row change counter and
reloads the entries only when it moved. That keeps a change within 1 s on
every gateway sharing the database, works the same on SQLite (where the CLI
writes from another process) and on PostgreSQL, needs no dedicated
connection outside the pool and no reconnect logic, and costs one indexed
single-row read per gateway per 0.5 s. Block lists change rarely; the read is
the whole price.

On a database error the gateway keeps enforcing the last snapshot and logs
once per outage (and once when it recovers).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from sqlalchemy.ext.asyncio import AsyncEngine

from ..state.background import BackgroundTask
from .matcher import EMPTY, Snapshot
from .model import BlockEntry
from .store import BlockStore
from ..state.deadline import within

log = logging.getLogger("gateway.blocklist")


class BlockList:
    def __init__(self, engine: AsyncEngine, *, clock: Callable[[], float] = time.time,
                 poll_interval: float = 0.5, reload_interval: float = 60.0, timeout: float = 5.0):
        self.store = BlockStore(engine, clock)
        self.poll_interval = poll_interval
        self.reload_interval = reload_interval   # full reload even without a counter change (hand edits)
        self.timeout = timeout                   # bound on one poll / reload
        self.snapshot: Snapshot = EMPTY
        self.failing = False
        self._loaded_at = 0.0
        self._lock = asyncio.Lock()
        self._task = BackgroundTask("blocklist-refresher")

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        await self.refresh()
        self._task.start(self._refresher)

    async def stop(self) -> None:
        await self._task.stop()

    async def refresh(self) -> None:
        """Reload every entry (serialized, so an older load never replaces a newer one)."""
        async with self._lock:
            version, entries = await self.store.load()
            self.snapshot = Snapshot(entries, version)
            self._loaded_at = time.monotonic()
        log.debug("block lists loaded: version %d, %s", version, self.snapshot.counts())

    async def poll_once(self) -> bool:
        """Reload if the counter moved (or the snapshot is old); True if it reloaded."""
        version = await within(self.store.version(), self.timeout)
        if version == self.snapshot.version and time.monotonic() - self._loaded_at < self.reload_interval:
            return False
        await within(self.refresh(), self.timeout)
        return True

    async def _refresher(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep serving the last snapshot; the database may come back
                if not self.failing:
                    log.warning("block list refresh failed, enforcing the last snapshot (version %d): %s",
                                self.snapshot.version, str(exc) or type(exc).__name__)
                self.failing = True
            else:
                if self.failing:
                    log.warning("block list refresh works again (version %d)", self.snapshot.version)
                self.failing = False

    # ------------------------------------------------------------ administration
    async def add(self, kind: str, value: str, reason: str = "", created_by: str = "") -> BlockEntry:
        entry = await self.store.add(kind, value, reason, created_by)
        await self._refresh_after_change()
        return entry

    async def remove(self, kind: str, value: str) -> BlockEntry:
        entry = await self.store.remove(kind, value)
        await self._refresh_after_change()
        return entry

    async def list(self, kind: str | None = None) -> list[BlockEntry]:
        return await self.store.list(kind)

    async def _refresh_after_change(self) -> None:
        # The change is committed; this gateway applies it at once, the others on their next poll.
        try:
            await self.refresh()
        except Exception as exc:
            log.warning("block list reload after a change failed (the refresher retries): %s", exc)
