"""The hot path of the registry (SMTP side): the list an envelope sender sends
for, and a recipient's status on a list. Cache first; a miss costs one
database round trip, shared by concurrent identical lookups."""
from __future__ import annotations

import asyncio
from typing import Callable

from .base import RegistryBase, log
from .model import Invalid, MailingList, RecipientStatus, RegistryUnavailable, normalize_address, sender_matcher


SENDERS_PROBE_INTERVAL = 2.0   # seconds between the background retries while the database is down
# How long MAIL waits for the database when it knows an earlier answer for the
# account: past this the earlier answer is used and the read goes on in the
# background (a black-holed database costs MAIL this, not lookup_timeout).
SENDERS_STALE_WAIT = 0.25


class Lookups(RegistryBase):
    _inflight: dict[tuple, tuple[int, asyncio.Task]]
    # The sender map survives what the cache forgets (TTL, invalidation, a
    # dropped channel): the last entries read per account, and whether every
    # account's were read at once (then an account missing here had no list).
    _last_senders: dict[str, tuple]
    _senders_preloaded: bool
    _senders_probe: asyncio.Task | None

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
            last = self._last_senders.get(account_name, () if self._senders_preloaded else None)
            if last is not None and self._senders_probe is not None:
                # The database failed a moment ago and a background task retries
                # it: answer from what was last read instead of waiting again.
                # (Plain relay of an authenticated session needs no database.)
                entries = last
            else:
                try:
                    entries = await self._coalesced(("senders", account_name), self._load_senders, account_name,
                                                    wait=SENDERS_STALE_WAIT if last is not None else None)
                except RegistryUnavailable:
                    # the database failed, or is slower than the earlier answer is worth waiting for
                    entries = self.cache.get_senders(account_name, allow_stale=True)
                    if entries is None:
                        entries = last
                    if entries is None:
                        self._senders_down()
                        raise
        for match, lst in entries:
            if match(sender):
                return lst
        return None

    async def _load_senders(self, account_name: str) -> tuple:
        gen = self.cache.generation
        try:
            lists = await self._db(self.store.lists(account_name=account_name))
        except RegistryUnavailable:
            self._senders_down()      # from now on answered from memory while a probe retries
            raise
        entries = self._sender_entries(lists)
        self.cache.put_senders(account_name, entries, gen)
        self._last_senders[account_name] = entries
        return entries

    @staticmethod
    def _sender_entries(lists: list[MailingList]) -> tuple:
        exact: list[tuple[str, MailingList]] = []
        wild: list[tuple[str, MailingList]] = []
        for lst in lists:
            for pattern in lst.senders:
                (wild if "*" in pattern else exact).append((pattern, lst))
        wild.sort(key=lambda item: -len(item[0]))   # the most specific pattern wins
        return tuple((sender_matcher(p), lst) for p, lst in exact + wild)

    async def preload_senders(self) -> None:
        """Read every account's lists at once (start-up, and the retry while the
        database is down): from then on an account the database cannot be asked
        about is answered from here, and one that had no list has none."""
        lists = await self._db(self.store.lists())
        by_account: dict[str, list[MailingList]] = {}
        for lst in lists:
            by_account.setdefault(lst.account, []).append(lst)
        self._last_senders = {name: self._sender_entries(found) for name, found in by_account.items()}
        self._senders_preloaded = True

    def _forget_last_senders(self) -> None:
        """A list changed (here or on another gateway): what was last read may
        lack its senders, so it is no answer while the database is away. Until
        the next read, list mail of an account needs the database (else 451),
        never plain relay past the opt-in checks."""
        self._last_senders = {}
        self._senders_preloaded = False

    def _senders_down(self) -> None:
        if self._senders_probe is None:
            log.warning("registry database unavailable: list senders are answered from memory until it is back")
            self._senders_probe = asyncio.get_running_loop().create_task(self._probe_senders())

    async def _probe_senders(self) -> None:
        try:
            while True:
                await asyncio.sleep(SENDERS_PROBE_INTERVAL)
                try:
                    await self.preload_senders()
                except RegistryUnavailable:
                    continue
                log.warning("registry database answers again: list senders are read from it")
                return
        finally:
            self._senders_probe = None

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

    async def _coalesced(self, key: tuple, fn, *args, wait: float | None = None):
        """``fn(*args)`` as one task shared by concurrent callers with the same
        ``key``; this caller waits for it at most ``wait`` seconds (default
        lookup_timeout + 0.5), the task itself runs to its own deadline."""
        current = self._inflight.get(key)
        if current is None or current[0] != self.cache.generation:
            task = asyncio.get_running_loop().create_task(fn(*args))
            current = (self.cache.generation, task)
            self._inflight[key] = current
            task.add_done_callback(self._forget_inflight(key, current))
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)
        # The caller's own deadline: the shared load has lookup_timeout, but a
        # driver that blocks in its cancellation (asyncpg cancelling on a
        # black-holed connection) must not hold this caller beyond it.
        limit = self.settings.lookup_timeout + 0.5 if wait is None else wait
        try:
            async with asyncio.timeout(limit):
                return await asyncio.shield(current[1])
        except TimeoutError:
            raise RegistryUnavailable(f"registry database did not answer within {limit:g} s") from None

    def _forget_inflight(self, key: tuple, current: tuple[int, asyncio.Task]) -> Callable[[asyncio.Task], None]:
        """The done callback of a coalesced load: forget it, unless a newer one took its key."""
        def done(_task: asyncio.Task) -> None:
            if self._inflight.get(key) is current:
                self._inflight.pop(key, None)
        return done
