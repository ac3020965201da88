"""Block lists in the storage backend (SQLAlchemy Core; SQLite or PostgreSQL).

Every change bumps the single-row counter ``block_version`` in the same
transaction, so a gateway learns that something changed from one cheap
single-row read (see :mod:`.service`).
"""
from __future__ import annotations

import builtins
import time
from typing import Callable

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from ..storage.schema import block_entries, block_version
from .model import (MAX_CREATED_BY, MAX_REASON, BlockEntry, Conflict, NotFound, check_kind, clean_text,
                    normalize)

_COLUMNS = (block_entries.c.kind, block_entries.c.value, block_entries.c.reason,
            block_entries.c.created_by, block_entries.c.created_at)


def _entry(row) -> BlockEntry:
    return BlockEntry(row.kind, row.value, row.reason, row.created_by, row.created_at)


class BlockStore:
    def __init__(self, engine: AsyncEngine, clock: Callable[[], float] = time.time):
        self.engine = engine
        self.clock = clock

    async def _bump(self, conn) -> None:
        res = await conn.execute(block_version.update().where(block_version.c.id == 1)
                                 .values(version=block_version.c.version + 1))
        if res.rowcount == 0:  # the row the migration made was deleted by hand
            await conn.execute(block_version.insert().values(id=1, version=1))

    async def add(self, kind: str, value: str, reason: str = "", created_by: str = "") -> BlockEntry:
        # normalize() checks the kind first
        entry = BlockEntry(kind, normalize(kind, value), clean_text(reason, "reason", MAX_REASON),
                           clean_text(created_by, "created_by", MAX_CREATED_BY), self.clock())
        try:
            async with self.engine.begin() as conn:
                await conn.execute(block_entries.insert().values(
                    kind=entry.kind, value=entry.value, reason=entry.reason, created_by=entry.created_by,
                    created_at=entry.created_at))
                await self._bump(conn)
        except IntegrityError:
            raise Conflict(f"{entry.kind} {entry.value} is blocked already", "value") from None
        return entry

    async def remove(self, kind: str, value: str) -> BlockEntry:
        canonical = normalize(kind, value)   # checks the kind first
        where = (block_entries.c.kind == kind) & (block_entries.c.value == canonical)
        async with self.engine.begin() as conn:
            row = (await conn.execute(sa.select(*_COLUMNS).where(where))).first()
            if row is None:
                raise NotFound(f"{kind} {canonical} is not blocked", "value")
            await conn.execute(block_entries.delete().where(where))
            await self._bump(conn)
        return _entry(row)

    async def list(self, kind: str | None = None) -> list[BlockEntry]:
        query = sa.select(*_COLUMNS).order_by(block_entries.c.kind, block_entries.c.value)
        if kind is not None:
            query = query.where(block_entries.c.kind == check_kind(kind))
        async with self.engine.connect() as conn:
            return [_entry(r) for r in (await conn.execute(query)).all()]

    @staticmethod
    async def _version(conn) -> int:
        return int((await conn.execute(sa.select(block_version.c.version)
                                       .where(block_version.c.id == 1))).scalar() or 0)

    async def version(self) -> int:
        async with self.engine.connect() as conn:
            return await self._version(conn)

    async def load(self) -> tuple[int, builtins.list[BlockEntry]]:   # builtins: the method list() shadows list here
        """The counter and all entries. The counter is read first: entries at
        least as new as the counter can only cause one extra reload later,
        never a missed change."""
        async with self.engine.connect() as conn:
            version = await self._version(conn)
            rows = (await conn.execute(sa.select(*_COLUMNS))).all()
        return version, [_entry(r) for r in rows]
