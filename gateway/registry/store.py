"""Registry storage: SQLAlchemy Core queries, one code path for SQLite and
PostgreSQL. Each write runs in one transaction that also announces what it
changed (``pg_notify`` on PostgreSQL, delivered only if the transaction
commits; a change counter in local mode), so caches elsewhere can be
invalidated. Nothing here knows about HTTP or SMTP."""
from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ..storage.db import WalCheckpointer
from ..storage.schema import (account_domains, accounts, api_keys, confirmation_budget, list_senders,
                              list_subscribers, list_suppressions, mailing_lists, registry_state)
from .model import BudgetExhausted, Conflict, MailingList, NotFound, RateLimited, RecipientStatus, Subscriber

if TYPE_CHECKING:
    from .fastpath import FastLookups

log = logging.getLogger("gateway.registry")

# Invalidation events: ("s", list_id, address_hash) one subscription changed;
# ("l", "", "") lists/senders changed; ("f", "", "") flush everything.
Event = tuple[str, str, str]
NOTIFY_LIMIT = 7900          # PostgreSQL payloads must stay under 8000 bytes


def encode_events(events: Sequence[Event]) -> list[str]:
    """Payloads ``s:LIST:HASH,l,f`` chunked under the NOTIFY size limit."""
    out, cur = [], ""
    for kind, list_id, addr_hash in events:
        item = f"s:{list_id}:{addr_hash}" if kind == "s" else kind
        if cur and len(cur) + 1 + len(item) > NOTIFY_LIMIT:
            out.append(cur)
            cur = ""
        cur = f"{cur},{item}" if cur else item
    if cur:
        out.append(cur)
    return out


def decode_events(payload: str) -> list[Event]:
    events: list[Event] = []
    for item in payload.split(","):
        parts = item.split(":")
        if parts[0] == "s" and len(parts) == 3:
            events.append(("s", parts[1], parts[2]))
        elif parts[0] == "l":
            events.append(("l", "", ""))
        else:  # unknown or damaged: be safe
            events.append(("f", "", ""))
    return events


def _subscriber(row) -> Subscriber:
    return Subscriber(
        list_id=row.list_id, address=row.address, status=row.status, source=row.source,
        requested_at=row.requested_at, requested_ip=row.requested_ip, requested_user_agent=row.requested_ua,
        confirmed_at=row.confirmed_at, confirmed_ip=row.confirmed_ip, confirmed_user_agent=row.confirmed_ua,
        confirmation=row.confirm_status, confirmation_sent_at=row.confirm_sent_at,
        confirmation_mails=row.confirm_mails, created_at=row.created_at)


def new_nonce() -> str:
    return secrets.token_hex(8)


@dataclass(frozen=True, slots=True)
class Budget:
    """Confirmation mails per account in fixed windows (registry settings
    ``confirmations_per_account`` / ``confirmation_window``); limit 0: none."""
    limit: int
    window: float

    def start(self, now: float) -> float:
        """The current window: a multiple of ``window``, the same on every gateway."""
        return (now // self.window) * self.window

    @property
    def active(self) -> bool:
        return self.limit > 0


class _ClaimLost(Exception):
    """Another gateway claimed the row first: roll back the budget taken for it."""


class RegistryStore:
    def __init__(self, engine: AsyncEngine, *, channel: str = "gw_registry", bump_version: bool = False,
                 clock: Callable[[], float] = time.time, fast: "FastLookups | None" = None):
        self.engine = engine
        # PostgreSQL only: the read-only fast path of two hot-path queries
        # (lookup_status, lists(account_name=)); see fastpath.py.
        self.fast = fast
        self.channel = channel
        self.postgres = engine.dialect.name == "postgresql"
        self.bump_version = bump_version
        self.clock = clock
        self.own_versions: set[int] = set()   # change-counter values this process wrote (local mode)
        self.on_commit: Callable[[Sequence[Event]], None] | None = None
        # SQLite: after a deletion of personal data (opt-out, subscriber or list
        # deletion) the WAL, which still holds the earlier page versions, is
        # checkpointed and truncated (PostgreSQL: docs/registry.md, "Erasure").
        self.checkpointer = WalCheckpointer(engine) if engine.dialect.name == "sqlite" else None

    # ------------------------------------------------------------ change feed
    async def _announce(self, conn: AsyncConnection, events: Sequence[Event]) -> None:
        if not events:
            return
        if self.postgres:
            for payload in encode_events(events):
                await conn.execute(sa.select(sa.func.pg_notify(self.channel, payload)))
        if self.bump_version:
            version = (await conn.execute(registry_state.update().where(registry_state.c.id == 1)
                                          .values(version=registry_state.c.version + 1)
                                          .returning(registry_state.c.version))).scalar()
            # Recorded before the commit, so the poller never takes our own change for a
            # foreign one. (SQLite holds the write lock from here to the commit, so no other
            # writer can draw the same number unless the commit itself fails.)
            self.own_versions.add(version)

    def _committed(self, events: Sequence[Event]) -> None:
        if events and self.on_commit is not None:
            self.on_commit(events)

    async def erased(self) -> None:
        """Call after a deletion of personal data has committed (``unsubscribe``
        that removed a row, ``delete_list``): empties SQLite's WAL. Waits at most
        ~1 s (retried in the background while a reader holds the WAL); never
        raises. Outside any timeout of the deletion itself, which is done."""
        if self.checkpointer is not None:
            await self.checkpointer.request()

    async def close(self) -> None:
        if self.checkpointer is not None:
            await self.checkpointer.close()
        if self.fast is not None:
            st = self.fast.stats
            if st["lookups"]:
                log.info("registry fast path: %d lookups in %d queries (%.1f per query), %d failed queries",
                         st["lookups"], st["queries"], st["lookups"] / max(1, st["queries"]), st["errors"])
            await self.fast.close()

    async def version(self) -> int:
        async with self.engine.connect() as conn:
            return (await conn.execute(sa.select(registry_state.c.version)
                                       .where(registry_state.c.id == 1))).scalar() or 0

    # ------------------------------------------------------------ accounts
    async def account(self, name: str) -> tuple[int, bool, list[tuple[str, str]]] | None:
        """(id, allow_subdomains, [(domain, status)]) of an account, or None."""
        async with self.engine.connect() as conn:
            row = (await conn.execute(sa.select(accounts.c.id, accounts.c.allow_subdomains)
                                      .where(accounts.c.name == name))).first()
            if row is None:
                return None
            doms = (await conn.execute(sa.select(account_domains.c.domain, account_domains.c.status)
                                       .where(account_domains.c.account_id == row.id))).all()
        return row.id, bool(row.allow_subdomains), [(d.domain, d.status) for d in doms]

    async def add_api_key(self, account_id: int, key_hash: str, label: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(api_keys.insert().values(account_id=account_id, key_hash=key_hash,
                                                        label=label, created_at=self.clock()))

    async def account_for_key(self, key_hash: str) -> str | None:
        async with self.engine.connect() as conn:
            return (await conn.execute(
                sa.select(accounts.c.name).join(api_keys, api_keys.c.account_id == accounts.c.id)
                .where(api_keys.c.key_hash == key_hash))).scalar()

    async def revoke_api_keys(self, account_id: int, label: str | None = None) -> int:
        cond = api_keys.c.account_id == account_id
        if label is not None:
            cond &= api_keys.c.label == label
        async with self.engine.begin() as conn:
            return (await conn.execute(api_keys.delete().where(cond))).rowcount

    # ------------------------------------------------------------ lists
    def _lists_query(self):
        return (sa.select(mailing_lists, accounts.c.name.label("account_name"))
                .join(accounts, accounts.c.id == mailing_lists.c.account_id))

    async def _materialize(self, conn: AsyncConnection, rows) -> list[MailingList]:
        if not rows:
            return []
        ids = [r.id for r in rows]
        senders: dict[str, list[str]] = {}
        for sid, pattern in (await conn.execute(sa.select(list_senders.c.list_id, list_senders.c.pattern)
                                                .where(list_senders.c.list_id.in_(ids))
                                                .order_by(list_senders.c.id))).all():
            senders.setdefault(sid, []).append(pattern)
        return [MailingList(r.id, r.account_id, r.account_name, r.name, r.list_id, tuple(senders.get(r.id, ())),
                            r.confirm_from, r.created_at) for r in rows]

    async def create_list(self, account_id: int, name: str, list_id: str, senders: list[str],
                          confirm_from: str) -> str:
        now = self.clock()
        for _ in range(5):
            lid = secrets.token_hex(8)
            try:
                async with self.engine.begin() as conn:
                    clash = (await conn.execute(sa.select(mailing_lists.c.name, mailing_lists.c.list_id).where(
                        (mailing_lists.c.account_id == account_id)
                        & ((mailing_lists.c.name == name) | (mailing_lists.c.list_id == list_id))))).first()
                    if clash is not None:
                        if clash.name == name:
                            raise Conflict("name", f"you have a list named {name!r} already", "exists")
                        raise Conflict("list_id", f"you have a list with List-Id {list_id!r} already", "exists")
                    taken = (await conn.execute(sa.select(list_senders.c.pattern).where(
                        (list_senders.c.account_id == account_id) & list_senders.c.pattern.in_(senders)))).scalar()
                    if taken is not None:
                        raise Conflict("senders", f"{taken!r} is the sender of another of your lists", "exists")
                    await conn.execute(mailing_lists.insert().values(
                        id=lid, account_id=account_id, name=name, list_id=list_id, confirm_from=confirm_from,
                        created_at=now))
                    await conn.execute(list_senders.insert(), [
                        {"list_id": lid, "account_id": account_id, "pattern": p} for p in senders])
                    await self._announce(conn, [("l", "", "")])
            except IntegrityError as exc:
                if "mailing_lists.id" in str(exc) or "mailing_lists_pkey" in str(exc):
                    continue  # random id taken: draw again
                raise Conflict("name", "a list with this name, List-Id or sender exists already "
                               "(created concurrently)", "exists") from None
            self._committed([("l", "", "")])
            return lid
        raise RuntimeError("cannot draw a free list id")  # pragma: no cover

    async def get_list(self, list_id: str, account_id: int | None = None) -> MailingList | None:
        cond = mailing_lists.c.id == list_id
        if account_id is not None:
            cond &= mailing_lists.c.account_id == account_id
        async with self.engine.connect() as conn:
            rows = (await conn.execute(self._lists_query().where(cond))).all()
            found = await self._materialize(conn, rows)
        return found[0] if found else None

    async def lists(self, account_id: int | None = None, account_name: str | None = None) -> list[MailingList]:
        if self.fast is not None and account_id is None and account_name is not None:
            return await self.fast.lists(account_name)   # the sender map of the SMTP side
        q = self._lists_query().order_by(mailing_lists.c.created_at, mailing_lists.c.id)
        if account_id is not None:
            q = q.where(mailing_lists.c.account_id == account_id)
        if account_name is not None:
            q = q.where(accounts.c.name == account_name)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(q)).all()
            return await self._materialize(conn, rows)

    async def delete_list(self, account_id: int, list_id: str) -> bool:
        async with self.engine.begin() as conn:
            cond = (mailing_lists.c.id == list_id) & (mailing_lists.c.account_id == account_id)
            if (await conn.execute(sa.select(mailing_lists.c.id).where(cond))).first() is None:
                return False
            # Explicit deletes: SQLite cascades only with foreign_keys=ON, be independent of it.
            await conn.execute(list_subscribers.delete().where(list_subscribers.c.list_id == list_id))
            await conn.execute(list_suppressions.delete().where(list_suppressions.c.list_id == list_id))
            await conn.execute(list_senders.delete().where(list_senders.c.list_id == list_id))
            await conn.execute(mailing_lists.delete().where(cond))
            await self._announce(conn, [("f", "", "")])
        self._committed([("f", "", "")])
        return True

    # ------------------------------------------------------------ subscription state
    async def lookup_status(self, list_id: str, address_hash: str) -> RecipientStatus:
        """One round trip: the subscriber's status, or whether the hash is suppressed.
        On PostgreSQL with the fast path: through its asyncpg pool, possibly in
        one query with other misses for the same list (same answer)."""
        if self.fast is not None:
            return await self.fast.lookup_status(list_id, address_hash)
        q = sa.union_all(
            sa.select(list_subscribers.c.status.label("s")).where(
                (list_subscribers.c.list_id == list_id) & (list_subscribers.c.address_hash == address_hash)),
            sa.select(sa.literal("unsubscribed").label("s")).where(
                (list_suppressions.c.list_id == list_id) & (list_suppressions.c.address_hash == address_hash)))
        async with self.engine.connect() as conn:
            found = {r[0] for r in (await conn.execute(q)).all()}
        for status in ("confirmed", "pending", "unsubscribed"):
            if status in found:
                return status
        return "unknown"

    async def subscription_page(self, list_id: str, table: str, after: str, limit: int) -> list[tuple[str, str]]:
        """One page of a list's subscription states for its in-memory snapshot:
        ``(address_hash, status)`` with address_hash > ``after``, ordered by
        address_hash, at most ``limit``; ``table`` is "subscribers" (pending,
        confirmed) or "suppressions" (status "unsubscribed"). An index range
        scan on the unique (list_id, address_hash) index."""
        if self.fast is not None:
            return await self.fast.subscription_page(list_id, table, after, limit)
        status: sa.ColumnElement[str]
        if table == "subscribers":
            t, status = list_subscribers, list_subscribers.c.status
        elif table == "suppressions":
            t, status = list_suppressions, sa.literal("unsubscribed")
        else:
            raise ValueError(f"unknown table {table!r}")
        q = (sa.select(t.c.address_hash, status)
             .where((t.c.list_id == list_id) & (t.c.address_hash > after))
             .order_by(t.c.address_hash).limit(limit))
        async with self.engine.connect() as conn:
            return [(r[0], r[1]) for r in (await conn.execute(q)).all()]

    async def subscriber(self, list_id: str, address_hash: str) -> Subscriber | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(sa.select(list_subscribers).where(
                (list_subscribers.c.list_id == list_id)
                & (list_subscribers.c.address_hash == address_hash)))).first()
        return _subscriber(row) if row else None

    async def suppressed(self, list_id: str, address_hash: str) -> bool:
        async with self.engine.connect() as conn:
            return (await conn.execute(sa.select(list_suppressions.c.id).where(
                (list_suppressions.c.list_id == list_id)
                & (list_suppressions.c.address_hash == address_hash)))).first() is not None

    async def subscriber_nonce(self, list_id: str, address_hash: str) -> tuple[str, str, str] | None:
        """(address, status, nonce) of a subscriber, for building a confirmation mail."""
        async with self.engine.connect() as conn:
            row = (await conn.execute(sa.select(list_subscribers.c.address, list_subscribers.c.status,
                                                list_subscribers.c.nonce).where(
                (list_subscribers.c.list_id == list_id)
                & (list_subscribers.c.address_hash == address_hash)))).first()
        return (row.address, row.status, row.nonce) if row else None

    async def add_pending(self, list_id: str, address: str, address_hash: str, *, source: str,
                          requested_at: float, ip: str, user_agent: str, reoptin: bool,
                          reoptin_interval: float, confirm_status: str, account_id: int | None = None,
                          budget: Budget | None = None) -> tuple[Subscriber, str]:
        """Insert a pending subscriber; (subscriber, nonce). Refuses an existing
        subscriber, and an opted-out address unless ``reoptin`` starts a fresh
        double opt-in (at most once per ``reoptin_interval``). With
        ``confirm_status="sending"`` and a ``budget``, the mail takes one of the
        account's budget in the same transaction; if that is used up the
        subscriber is stored with the mail "queued" instead (the outbox sends it
        in a later window): ``subscriber.confirmation`` tells which."""
        now = self.clock()
        nonce = new_nonce()
        events = [("s", list_id, address_hash)]
        try:
            async with self.engine.begin() as conn:
                await self._check_new(conn, list_id, address_hash, reoptin, reoptin_interval, now)
                if (confirm_status == "sending" and budget is not None and account_id is not None
                        and not await self._reserve(conn, account_id, budget, now)):
                    confirm_status = "queued"
                await conn.execute(list_subscribers.insert().values(
                    list_id=list_id, address=address, address_hash=address_hash, status="pending",
                    nonce=nonce, source=source, requested_at=requested_at, requested_ip=ip,
                    requested_ua=user_agent, confirm_status=confirm_status,
                    confirm_sent_at=now if confirm_status == "sending" else None,
                    confirm_mails=1 if confirm_status == "sending" else 0, created_at=now))
                await self._announce(conn, events)
        except IntegrityError:
            raise Conflict("address", "is a subscriber of this list already (added concurrently)",
                           "exists") from None
        self._committed(events)
        sub = await self.subscriber(list_id, address_hash)
        assert sub is not None
        return sub, nonce

    async def _reserve(self, conn: AsyncConnection, account_id: int, budget: Budget | None, now: float) -> bool:
        """Take one confirmation mail of the account's budget for the current
        window, inside the caller's transaction (a rollback gives it back).
        False: used up. The conditional UPDATE is atomic, so gateways sharing
        the database never overdraw it together."""
        if budget is None or not budget.active:
            return True
        start = budget.start(now)
        row = (confirmation_budget.c.account_id == account_id) & (confirmation_budget.c.window_start == start)
        take = (confirmation_budget.update().where(row & (confirmation_budget.c.sent < budget.limit))
                .values(sent=confirmation_budget.c.sent + 1))
        if (await conn.execute(take)).rowcount == 1:
            return True
        from sqlalchemy.dialects import postgresql, sqlite
        insert = postgresql.insert if self.postgres else sqlite.insert
        new = await conn.execute(insert(confirmation_budget).values(account_id=account_id, window_start=start,
                                                                    sent=0).on_conflict_do_nothing())
        if new.rowcount == 1:  # the account's first mail of this window: forget its older windows
            await conn.execute(confirmation_budget.delete().where(
                (confirmation_budget.c.account_id == account_id) & (confirmation_budget.c.window_start < start)))
        return (await conn.execute(take)).rowcount == 1

    async def _check_new(self, conn, list_id, address_hash, reoptin, reoptin_interval, now) -> None:
        row = (await conn.execute(sa.select(list_subscribers.c.status).where(
            (list_subscribers.c.list_id == list_id)
            & (list_subscribers.c.address_hash == address_hash)))).first()
        if row is not None:
            raise Conflict("address", f"is a subscriber of this list already (status {row.status})", "exists")
        sup = (await conn.execute(sa.select(list_suppressions.c.id, list_suppressions.c.reoptin_at).where(
            (list_suppressions.c.list_id == list_id)
            & (list_suppressions.c.address_hash == address_hash)))).first()
        if sup is None:
            return
        if not reoptin:
            raise Conflict("address", "this address unsubscribed from this list; it can only be added again "
                           "through a new double opt-in that the person confirms: repeat the request with "
                           "\"reoptin\": true to send them a confirmation mail (P-OPTOUT)", "suppressed")
        if sup.reoptin_at is not None and now - sup.reoptin_at < reoptin_interval:
            raise RateLimited("a new opt-in for this opted-out address was started recently",
                              reoptin_interval - (now - sup.reoptin_at))
        await conn.execute(list_suppressions.update().where(list_suppressions.c.id == sup.id)
                           .values(reoptin_at=now))

    async def import_pending(self, list_id: str, rows: list[dict], *, reoptin: bool,
                             reoptin_interval: float) -> list[tuple[str, str]]:
        """Bulk insert pending subscribers (confirmation mail queued). ``rows``
        hold address, address_hash and evidence; returns [(result, reason)] in
        order: ("queued", "") | ("exists", why) | ("suppressed", why) | ("rate_limited", why)."""
        now = self.clock()
        results: list[tuple[str, str]] = []
        events: list[Event] = []
        async with self.engine.begin() as conn:
            hashes = [r["address_hash"] for r in rows]
            existing: dict[str, str] = {}
            suppressed: dict[str, tuple[int, float | None]] = {}
            for i in range(0, len(hashes), 500):
                chunk = hashes[i:i + 500]
                for h, st in (await conn.execute(sa.select(list_subscribers.c.address_hash, list_subscribers.c.status)
                                                 .where((list_subscribers.c.list_id == list_id)
                                                        & list_subscribers.c.address_hash.in_(chunk)))).all():
                    existing[h] = st
                for sid, h, at in (await conn.execute(sa.select(list_suppressions.c.id, list_suppressions.c.address_hash,
                                                                list_suppressions.c.reoptin_at)
                                                      .where((list_suppressions.c.list_id == list_id)
                                                             & list_suppressions.c.address_hash.in_(chunk)))).all():
                    suppressed[h] = (sid, at)
            inserts, reopt_ids = [], []
            for r in rows:
                h = r["address_hash"]
                if h in existing:
                    results.append(("exists", f"is a subscriber already (status {existing[h]})"))
                    continue
                if h in suppressed:
                    sid, at = suppressed[h]
                    if not reoptin:
                        results.append(("suppressed", "unsubscribed from this list; only a new confirmed "
                                        "opt-in (reoptin) can add it again"))
                        continue
                    if at is not None and now - at < reoptin_interval:
                        results.append(("rate_limited", "a new opt-in was started recently"))
                        continue
                    reopt_ids.append(sid)
                existing[h] = "pending"  # a duplicate later in the same batch
                inserts.append({"list_id": list_id, "address": r["address"], "address_hash": h,
                                "status": "pending", "nonce": new_nonce(), "source": r["source"],
                                "requested_at": r["requested_at"], "requested_ip": r["ip"],
                                "requested_ua": r["user_agent"], "confirm_status": "queued",
                                "confirm_sent_at": None, "confirm_mails": 0, "created_at": now})
                events.append(("s", list_id, h))
                results.append(("queued", ""))
            if inserts:
                await conn.execute(list_subscribers.insert(), inserts)
            if reopt_ids:
                await conn.execute(list_suppressions.update().where(list_suppressions.c.id.in_(reopt_ids))
                                   .values(reoptin_at=now))
            await self._announce(conn, events)
        self._committed(events)
        return results

    async def confirm(self, list_id: str, address_hash: str, nonce: str, ip: str,
                      user_agent: str) -> tuple[str, str]:
        """Confirm a pending subscriber: ("confirmed"|"already"|"stale"|"gone", address)."""
        now = self.clock()
        events = [("s", list_id, address_hash)]
        async with self.engine.begin() as conn:
            row = (await conn.execute(sa.select(list_subscribers.c.id, list_subscribers.c.status,
                                                list_subscribers.c.nonce, list_subscribers.c.address).where(
                (list_subscribers.c.list_id == list_id)
                & (list_subscribers.c.address_hash == address_hash)))).first()
            if row is None:
                return "gone", ""
            if row.nonce != nonce:
                return "stale", row.address
            if row.status == "confirmed":
                return "already", row.address
            await conn.execute(list_subscribers.update().where(list_subscribers.c.id == row.id).values(
                status="confirmed", confirmed_at=now, confirmed_ip=ip[:64], confirmed_ua=user_agent[:512]))
            # A fresh confirmed opt-in lifts an earlier opt-out.
            await conn.execute(list_suppressions.delete().where(
                (list_suppressions.c.list_id == list_id) & (list_suppressions.c.address_hash == address_hash)))
            await self._announce(conn, events)
        self._committed(events)
        return "confirmed", row.address

    async def unsubscribe(self, list_id: str, address_hash: str) -> bool:
        """Delete the subscriber and keep only the keyed hash. Idempotent;
        True if a subscriber record was removed."""
        now = self.clock()
        events = [("s", list_id, address_hash)]
        async with self.engine.begin() as conn:
            if (await conn.execute(sa.select(mailing_lists.c.id).where(mailing_lists.c.id == list_id))).first() is None:
                return False  # list deleted: nothing can be mailed through it
            res = await conn.execute(list_subscribers.delete().where(
                (list_subscribers.c.list_id == list_id) & (list_subscribers.c.address_hash == address_hash)))
            exists = (await conn.execute(sa.select(list_suppressions.c.id).where(
                (list_suppressions.c.list_id == list_id)
                & (list_suppressions.c.address_hash == address_hash)))).first()
            if exists is None:
                try:
                    async with conn.begin_nested():
                        await conn.execute(list_suppressions.insert().values(
                            list_id=list_id, address_hash=address_hash, created_at=now))
                except IntegrityError:
                    pass  # a concurrent opt-out of the same address: the hash is there
            await self._announce(conn, events)
        self._committed(events)
        return res.rowcount > 0

    # ------------------------------------------------------------ confirmation mail state
    async def claim_resend(self, list_id: str, address_hash: str, interval: float, max_mails: int, *,
                           account_id: int | None = None, budget: Budget | None = None) -> tuple[str, str]:
        """Reserve one more confirmation mail: (address, nonce), or raise
        (BudgetExhausted when the account's budget for this window is used up)."""
        now = self.clock()
        async with self.engine.begin() as conn:
            row = (await conn.execute(sa.select(list_subscribers).where(
                (list_subscribers.c.list_id == list_id)
                & (list_subscribers.c.address_hash == address_hash)))).first()
            if row is None:
                raise NotFound("no such subscriber")
            if row.status != "pending":
                raise Conflict("address", "is confirmed already", "confirmed")
            if row.confirm_mails >= max_mails:
                raise RateLimited(f"{row.confirm_mails} confirmation mails were sent already; no more are "
                                  f"sent for this subscription (remove and add it again later)", 86400.0)
            if row.confirm_sent_at is not None and now - row.confirm_sent_at < interval:
                raise RateLimited("a confirmation mail was sent recently", interval - (now - row.confirm_sent_at))
            if account_id is not None and not await self._reserve(conn, account_id, budget, now):
                assert budget is not None
                raise BudgetExhausted(
                    f"this account's budget of {budget.limit} confirmation mails per {budget.window:g} seconds "
                    f"is used up; queued confirmation mails go out first when the next window starts",
                    budget.start(now) + budget.window - now)
            res = await conn.execute(list_subscribers.update().where(
                (list_subscribers.c.id == row.id) & (list_subscribers.c.confirm_mails == row.confirm_mails))
                .values(confirm_status="sending", confirm_sent_at=now, confirm_mails=row.confirm_mails + 1))
            if res.rowcount != 1:
                raise RateLimited("a confirmation mail is being sent", interval)
        return row.address, row.nonce

    async def set_confirmation(self, list_id: str, address_hash: str, status: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(list_subscribers.update().where(
                (list_subscribers.c.list_id == list_id) & (list_subscribers.c.address_hash == address_hash)
                & (list_subscribers.c.status == "pending")).values(confirm_status=status))

    async def claim_outbox(self, limit: int, stale_after: float, *, budget: Budget | None = None,
                           on_exhausted: Callable[[int, str, float], None] | None = None
                           ) -> list[tuple[str, str, str, str]]:
        """Claim queued confirmation mails (also ones stuck in 'sending' after a
        crash): [(list_id, address, address_hash, nonce)]. A conditional update
        per row makes the claim safe with several gateways.

        With a ``budget`` each claim also takes one mail of the list owner's
        budget, in the same transaction. Rows of an account whose budget for the
        current window is used up are not claimed (they stay "queued" with
        ``confirm_mails`` unchanged: no send attempt is counted, and they never
        look like a stale claim), and the query leaves them out until the window
        turns, so they cost no reads or writes and never stand in the way of
        other accounts' rows. ``on_exhausted(account_id, account_name,
        window_start)`` is called when a claim finds an account's budget used up."""
        now = self.clock()
        limited = budget if budget is not None and budget.active else None   # the budget in force
        claimed: list[tuple[str, str, str, str]] = []
        # Each pass claims rows, or finds an account exhausted (left out by the next
        # query), or loses its rows to another gateway: a few passes always suffice.
        for _ in range(8):
            q = (sa.select(list_subscribers.c.id, list_subscribers.c.list_id, list_subscribers.c.address,
                           list_subscribers.c.address_hash, list_subscribers.c.nonce,
                           list_subscribers.c.confirm_status, list_subscribers.c.confirm_sent_at,
                           list_subscribers.c.confirm_mails, mailing_lists.c.account_id,
                           accounts.c.name.label("account_name"))
                 .join(mailing_lists, mailing_lists.c.id == list_subscribers.c.list_id)
                 .join(accounts, accounts.c.id == mailing_lists.c.account_id)
                 .where((list_subscribers.c.status == "pending") & (
                     (list_subscribers.c.confirm_status == "queued")
                     | ((list_subscribers.c.confirm_status == "sending")
                        & (list_subscribers.c.confirm_sent_at < now - stale_after)))))
            if limited is not None:
                q = q.where(mailing_lists.c.account_id.not_in(
                    sa.select(confirmation_budget.c.account_id).where(
                        (confirmation_budget.c.window_start == limited.start(now))
                        & (confirmation_budget.c.sent >= limited.limit))))
            async with self.engine.connect() as conn:
                rows = (await conn.execute(q.order_by(list_subscribers.c.id).limit(limit))).all()
            if not rows:
                break
            exhausted: set[int] = set()
            for r in rows:
                if r.account_id in exhausted:
                    continue
                try:
                    async with self.engine.begin() as conn:
                        if limited is not None and not await self._reserve(conn, r.account_id, limited, now):
                            exhausted.add(r.account_id)
                            if on_exhausted is not None:
                                on_exhausted(r.account_id, r.account_name, limited.start(now))
                            continue
                        res = await conn.execute(list_subscribers.update().where(
                            (list_subscribers.c.id == r.id) & (list_subscribers.c.confirm_status == r.confirm_status)
                            & (list_subscribers.c.confirm_mails == r.confirm_mails))
                            .values(confirm_status="sending", confirm_sent_at=now,
                                    confirm_mails=r.confirm_mails + 1))
                        if res.rowcount != 1:
                            raise _ClaimLost
                except _ClaimLost:
                    continue
                claimed.append((r.list_id, r.address, r.address_hash, r.nonce))
            if claimed or not exhausted:
                break
        return claimed

    # ------------------------------------------------------------ reading
    async def subscribers(self, list_id: str, status: str | None, after: int, limit: int
                          ) -> list[tuple[int, Subscriber]]:
        cond = (list_subscribers.c.list_id == list_id) & (list_subscribers.c.id > after)
        if status:
            cond &= list_subscribers.c.status == status
        async with self.engine.connect() as conn:
            rows = (await conn.execute(sa.select(list_subscribers).where(cond)
                                       .order_by(list_subscribers.c.id).limit(limit))).all()
        return [(r.id, _subscriber(r)) for r in rows]

    async def stats(self, list_id: str) -> dict:
        async with self.engine.connect() as conn:
            by_status: dict[str, int] = dict((await conn.execute(
                sa.select(list_subscribers.c.status, sa.func.count())
                .where(list_subscribers.c.list_id == list_id).group_by(list_subscribers.c.status))).all())
            by_mail: dict[str | None, int] = dict((await conn.execute(
                sa.select(list_subscribers.c.confirm_status, sa.func.count())
                .where((list_subscribers.c.list_id == list_id) & (list_subscribers.c.status == "pending"))
                .group_by(list_subscribers.c.confirm_status))).all())
            suppressed = (await conn.execute(sa.select(sa.func.count()).select_from(list_suppressions)
                                             .where(list_suppressions.c.list_id == list_id))).scalar()
        return {"confirmed": by_status.get("confirmed", 0), "pending": by_status.get("pending", 0),
                "unsubscribed": suppressed or 0,
                "confirmation_mails": {k or "none": v for k, v in by_mail.items()}}


def chunked(items: Iterable, size: int):
    buf = []
    for item in items:
        buf.append(item)
        if len(buf) >= size:
            yield buf
            buf = []
    if buf:
        yield buf
