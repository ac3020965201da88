"""The hot path of the registry (SMTP side): the list an envelope sender sends
for, and a recipient's status on a list. Cache first; a miss costs one
database round trip, shared by concurrent identical lookups."""
from __future__ import annotations

import asyncio
from typing import Callable

from .base import RegistryBase
from .model import Invalid, MailingList, RecipientStatus, RegistryUnavailable, normalize_address, sender_matcher


class Lookups(RegistryBase):
    _inflight: dict[tuple, tuple[int, asyncio.Task]]

    async def list_for_sender(self, account_name: str, mail_from: str) -> MailingList | None:
        """The account's list whose envelope sender (address or VERP pattern)
        matches ``mail_from``, or None: then the mail is not list mail. Served
        from a per-account cache; on a miss the account's lists are read once.
        Raises RegistryUnavailable only if the database is needed, cannot be
        reached and nothing (not even a stale entry) is cached."""
        if not mail_from:
            return None
        try:
            sender = normalize_address(mail_from)
        except Invalid:
            return None
        entries = self.cache.get_senders(account_name)
        if entries is None:
            try:
                entries = await self._coalesced(("senders", account_name), self._load_senders, account_name)
            except RegistryUnavailable:
                entries = self.cache.get_senders(account_name, allow_stale=True)
                if entries is None:
                    raise
        for match, lst in entries:
            if match(sender):
                return lst
        return None

    async def _load_senders(self, account_name: str) -> tuple:
        gen = self.cache.generation
        lists = await self._db(self.store.lists(account_name=account_name))
        exact: list[tuple[str, MailingList]] = []
        wild: list[tuple[str, MailingList]] = []
        for lst in lists:
            for pattern in lst.senders:
                (wild if "*" in pattern else exact).append((pattern, lst))
        wild.sort(key=lambda item: -len(item[0]))   # the most specific pattern wins
        entries = tuple((sender_matcher(p), lst) for p, lst in exact + wild)
        self.cache.put_senders(account_name, entries, gen)
        return entries

    async def recipient_status(self, list_id: str, address: str) -> RecipientStatus:
        """"confirmed" (may be mailed), "pending", "unsubscribed" (opted out:
        only the keyed hash remains) or "unknown". Only "confirmed" may pass
        RCPT. Cache hit: no I/O. Miss, or invalidation channel down: one
        database round trip (concurrent identical lookups share it). Raises
        RegistryUnavailable when the database cannot answer: defer, never accept."""
        keys = self._need_keys()
        try:
            addr = normalize_address(address)
            addr_hash = keys.address_hash(list_id, addr)
        except (Invalid, ValueError):
            return "unknown"
        hit = self.cache.get(list_id, addr_hash)
        if hit is not None:
            return hit  # type: ignore[return-value]  # the cache holds RecipientStatus values, typed str
        return await self._coalesced(("s", list_id, addr_hash), self._load_status, list_id, addr_hash)

    async def _load_status(self, list_id: str, addr_hash: str) -> RecipientStatus:
        gen = self.cache.generation
        status = await self._db(self.store.lookup_status(list_id, addr_hash))
        self.cache.put(list_id, addr_hash, status, gen)
        return status

    async def _snapshot_page(self, list_id: str, table: str, after: str, limit: int) -> list[tuple[str, str]]:
        async with asyncio.timeout(self.settings.lookup_timeout * 4):
            return await self.store.subscription_page(list_id, table, after, limit)

    async def _coalesced(self, key: tuple, fn, *args):
        current = self._inflight.get(key)
        if current is None or current[0] != self.cache.generation:
            task = asyncio.get_running_loop().create_task(fn(*args))
            current = (self.cache.generation, task)
            self._inflight[key] = current
            task.add_done_callback(self._forget_inflight(key, current))
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)
        return await asyncio.shield(current[1])

    def _forget_inflight(self, key: tuple, current: tuple[int, asyncio.Task]) -> Callable[[asyncio.Task], None]:
        """The done callback of a coalesced load: forget it, unless a newer one took its key."""
        def done(_task: asyncio.Task) -> None:
            if self._inflight.get(key) is current:
                self._inflight.pop(key, None)
        return done
