"""Violations, stored (P-STRIKE, issue 13 point 1; docs/strikes.md).

Every :class:`~gateway.core.events.Violation` a check publishes (a retry
storm, bulk, a repeat, harvesting) becomes one row of the ``violations``
table in the gateway's storage, shared by every gateway on PostgreSQL: the
account and identity it is charged to, the POLICY rule, the kind, its class
(``[strikes] classes``: negligence or deliberate), the time, the trace id and
client IP, and the evidence (the reply the client got, the session, the
envelope) as JSON. The strike ladder of issue 13 reads these rows.

**Off the reply path.** The subscriber only appends the row to a bounded
queue (``max_queued``; past it rows are dropped, counted in ``dropped`` and
logged once): nothing that records may change or delay a reply. A writer
task inserts the queue in batches (``batch`` rows, at the latest every
``flush_interval`` seconds), each insert under ``timeout``. While the
database fails, the rows stay queued (still bounded) and are written when
it answers again; the failure is logged once per outage. ``stop()`` writes
what is left, within ``timeout``.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any, Callable

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from ..core.events import EventBus, Violation
from ..core.logsafe import json_safe
from ..state.background import BackgroundTask
from ..state.deadline import within
from ..storage.schema import violations

log = logging.getLogger("gateway.strikes")


def _row(v: Violation, class_of: Callable[[str, str], str], now: float, node: str) -> dict[str, Any]:
    tx = v.tx
    evidence: dict[str, Any] = {"reply": v.reply, "session": v.session.id}
    if tx is not None:
        evidence["mail_from"] = tx.mail_from.addr if tx.mail_from is not None else None
        evidence["recipients"] = len(tx.recipients)
    return {
        "at": now, "account": v.account or "", "identity": v.identity, "rule": v.rule, "kind": v.kind,
        "class": class_of(v.rule, v.kind), "detail": v.detail[:2000],
        "trace_id": tx.trace_id if tx is not None else None, "client_ip": v.session.peer_ip,
        "evidence": orjson.dumps(json_safe(evidence)).decode(), "node": node,
    }


class ViolationRecorder:
    def __init__(self, engine: AsyncEngine, events: EventBus, class_of: Callable[[str, str], str], *,
                 clock: Callable[[], float] = time.time, node: str = "", flush_interval: float = 0.2,
                 batch: int = 200, max_queued: int = 10_000, timeout: float = 5.0):
        self.engine = engine
        self.class_of = class_of
        self.clock = clock
        self.node = node
        self.flush_interval = flush_interval
        self.batch = batch
        self.max_queued = max_queued
        self.timeout = timeout
        self._queue: deque[dict[str, Any]] = deque()
        self._wake = asyncio.Event()
        self._task = BackgroundTask("violation-writer")
        self.written = 0
        self.dropped = 0
        self.failing = False
        events.subscribe(Violation, self._on_violation)

    # ------------------------------------------------------------------ events (no I/O)
    def _on_violation(self, v: Violation) -> None:
        if len(self._queue) >= self.max_queued:
            if not self.dropped:
                log.warning("violations: %d waiting to be written; dropping new ones until the queue drains",
                            len(self._queue))
            self.dropped += 1
            return
        self._queue.append(_row(v, self.class_of, self.clock(), self.node))
        if len(self._queue) >= self.batch:
            self._wake.set()

    @property
    def queued(self) -> int:
        return len(self._queue)

    # ------------------------------------------------------------------ writing
    async def start(self) -> None:
        self._task.start(self._writer)

    async def _writer(self) -> None:
        while True:
            try:
                await within(self._wake.wait(), self.flush_interval)
            except TimeoutError:
                pass
            self._wake.clear()
            while self._queue and await self.flush_once():
                pass

    async def flush_once(self) -> bool:
        """Insert up to ``batch`` queued rows; True when written (the rows stay queued on failure)."""
        rows = [self._queue.popleft() for _ in range(min(self.batch, len(self._queue)))]
        if not rows:
            return False
        try:
            await within(self._insert(rows), self.timeout)
        except asyncio.CancelledError:
            self._queue.extendleft(reversed(rows))
            raise
        except Exception as exc:        # the database away or slow: keep them, try again next turn
            self._queue.extendleft(reversed(rows))
            while len(self._queue) > self.max_queued:
                self._queue.pop()
                self.dropped += 1
            if not self.failing:
                self.failing = True
                log.warning("violations: writing %d failed (%s); kept to be written when the database answers",
                            len(rows), type(exc).__name__)
            return False
        if self.failing:
            self.failing = False
            log.warning("violations: written again")
        self.written += len(rows)
        return True

    async def _insert(self, rows: list[dict[str, Any]]) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(violations.insert(), rows)

    async def stop(self) -> None:
        await self._task.stop()
        try:
            async with asyncio.timeout(self.timeout):
                while self._queue and await self.flush_once():
                    pass
        except TimeoutError:
            pass
        if self._queue:
            log.warning("violations: %d not written at shutdown", len(self._queue))


async def list_violations(engine: AsyncEngine, account: str, identity: str | None = None,
                          since: float | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """The account's (or one identity's) violations, newest first."""
    q = sa.select(violations).where(violations.c.account == account)
    if identity is not None:
        q = q.where(violations.c.identity == identity)
    if since is not None:
        q = q.where(violations.c.at >= since)
    q = q.order_by(violations.c.at.desc(), violations.c.id.desc()).limit(limit)
    async with engine.connect() as conn:
        rows = (await conn.execute(q)).mappings().all()
    out = []
    for r in rows:
        d = dict(r)
        d["evidence"] = orjson.loads(d["evidence"] or "{}")
        out.append(d)
    return out
