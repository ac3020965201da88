"""RegistryService: the one API of the mailing-list registry.

The SMTP side uses the hot-path part (``list_for_sender``, ``recipient_status``,
``list_headers`` / ``unsubscribe_url`` / ``unsubscribe_token``,
``unsubscribe_by_token``); the HTTP API, the pages and the CLI use the rest.
docs/registry.md describes it.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import secrets
import time
import unicodedata
from dataclasses import dataclass
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, formatdate, make_msgid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import quote

from .cache import Channel, ListSnapshots, LocalChannel, PostgresChannel, RedisChannel, SubscriptionCache
from .model import (AddResult, BudgetExhausted, Invalid, MailingList, NotFound, RecipientStatus, RegistryError,
                    RegistryUnavailable, Subscriber, TokenError, UnsubscribeResult, display_address,
                    list_name, mask_address, normalize_address, normalize_list_id, normalize_sender_pattern,
                    sender_matcher)
from .settings import RegistrySettings
from .store import Budget, Event, RegistryStore
from .tokens import UNSUBSCRIBE_TOKEN_CHARS, Keys, api_key_hash

log = logging.getLogger("gateway.registry")

# How an opt-out reached the gateway: the RFC 8058 one-click POST of a mail
# client, the button of the unsubscribe page, a mail to the mailto: address,
# a removal through the API (the list owner on the person's behalf).
OPTOUT_VIAS = ("one-click", "page", "mailto", "api")

_TOKEN_IN_TEXT = re.compile(r"(?<![a-z2-7])([a-z2-7]{%d})(?![a-z2-7])" % UNSUBSCRIBE_TOKEN_CHARS)


# ------------------------------------------------------------------ the secret
def registry_secret(config) -> bytes | None:
    """The configured key; in dev mode a generated one kept in a file (0600)."""
    from ..configload import ConfigError

    settings: RegistrySettings = config.registry
    if settings.secret:
        return settings.secret.encode("utf-8")
    if not config.dev.enabled:
        return None
    path = Path(settings.secret_file) if settings.secret_file else _default_secret_file(config.storage.url)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(config.source, "registry.secret_file", f"cannot create {path}: {exc.strerror}") from None
    else:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
    for _ in range(50):  # another dev process may be writing it right now
        try:
            text = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(config.source, "registry.secret_file", f"cannot read {path}: {exc.strerror}") from None
        if len(text) >= 16:
            return text.encode("utf-8")
        time.sleep(0.02)
    raise ConfigError(config.source, "registry.secret_file", f"{path} does not hold a key")


def _default_secret_file(url: str) -> Path:
    if url.startswith("sqlite") and ":///" in url:
        db = url.split(":///", 1)[1].split("?", 1)[0]
        if db and db != ":memory:":
            return Path(db + ".registry-key")
    return Path("registry-key")


def require_secret(config, secret: bytes | None) -> None:
    """Start-up check: the HTTP side hands out tokens, so it needs the key."""
    from ..configload import ConfigError

    if secret is None and config.http.enabled:
        raise ConfigError(config.source, "registry.secret",
                          "must be set when the HTTP side is enabled (e.g. secret = \"env:GATEWAY_REGISTRY_SECRET\" "
                          "with 32 random bytes in hex); it keys the confirmation/unsubscribe links and the "
                          "opt-out hashes, every gateway sharing the database needs the same value, and it must "
                          "never change")


# ------------------------------------------------------------------ helpers
def _clean_text(value: Any, field: str, limit: int) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise Invalid(field, "must be a string")
    text = value.strip()
    if len(text) > limit:
        raise Invalid(field, f"at most {limit} characters")
    if any(unicodedata.category(c)[0] == "C" for c in text):
        raise Invalid(field, "must not contain control characters")
    return text


def _clean_ip(value: Any, field: str) -> str:
    if value in (None, ""):
        return ""
    try:
        return str(ipaddress.ip_address(str(value).strip()))
    except ValueError:
        raise Invalid(field, f"{value!r} is not an IP address") from None


def _when(value: Any, field: str, now: float) -> float:
    if value is None:
        return now
    if isinstance(value, datetime):
        value = value.timestamp() if value.tzinfo else value.replace(tzinfo=timezone.utc).timestamp()
    if isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise Invalid(field, "must be an ISO 8601 time or unix seconds") from None
        return _when(dt, field, now)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Invalid(field, "must be an ISO 8601 time or unix seconds")
    if value > now + 300:
        raise Invalid(field, "lies in the future")
    if value < 946684800:  # 2000-01-01
        raise Invalid(field, "lies before 2000")
    return float(value)


def _domain_authorized(domain: str, allow_sub: bool, domains: list[tuple[str, str]]) -> bool:
    for dom, status in domains:
        if status not in ("verified", "approved"):
            continue
        if domain == dom or (allow_sub and domain.endswith("." + dom)):
            return True
    return False


@dataclass(frozen=True, slots=True)
class PageInfo:
    """What a confirmation/unsubscribe page may show (nothing more)."""
    list_name: str
    masked_address: str
    state: str                 # pending | confirmed | gone | stale | subscribed | unsubscribed


# ------------------------------------------------------------------ the service
class RegistryService:
    def __init__(self, engine, settings: RegistrySettings, *, secret: bytes | None, hostname: str = "localhost",
                 relay=None, accounts=None, clock: Callable[[], float] = time.time):
        self.settings = settings
        self.engine = engine
        self.hostname = hostname
        self.relay = relay
        self.accounts = accounts          # AccountStore, for the account status (optional)
        self.clock = clock
        self.keys = Keys(secret) if secret else None
        mode = settings.invalidation
        if mode == "auto":
            mode = "postgres" if engine.dialect.name == "postgresql" else "local"
        if mode == "postgres" and engine.dialect.name != "postgresql":
            raise ValueError("registry.invalidation: postgres needs PostgreSQL storage")
        self.mode = mode
        fast = None
        if engine.dialect.name == "postgresql" and settings.lookup_pool_size > 0:
            from ..storage.db import asyncpg_dsn
            from .fastpath import FastLookups

            fast = FastLookups(asyncpg_dsn(engine.url), max_size=settings.lookup_pool_size,
                               timeout=settings.lookup_timeout, batch=settings.lookup_batch)
        self.store = RegistryStore(engine, channel=settings.channel, bump_version=mode == "local", clock=clock,
                                   fast=fast)
        self.store.on_commit = self._on_commit
        self.cache = SubscriptionCache(settings.cache_size, settings.cache_ttl)
        if settings.snapshot_max_entries > 0:
            self.cache.snapshots = ListSnapshots(self._snapshot_page, max_entries=settings.snapshot_max_entries,
                                                 refresh=settings.snapshot_refresh)
        self.channel: Channel | None = None
        self._inflight: dict[tuple, tuple[int, asyncio.Task]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._outbox_task: asyncio.Task | None = None
        self._outbox_kick = asyncio.Event()
        self.stats = {"confirmations_sent": 0, "confirmations_failed": 0, "unsubscribes": 0,
                      "confirmations_deferred": 0, "confirmation_budget_exhausted": 0}
        # opt-outs by the way they came (OPTOUT_VIAS) and result (removed: a subscriber record
        # was deleted; already: none was left, e.g. a repeated one-click)
        self.optouts: dict[tuple[str, str], int] = {(v, r): 0 for v in OPTOUT_VIAS for r in ("removed", "already")}
        # The per-account budget of confirmation mails: at most confirmations_per_account
        # per fixed confirmation_window (0: none), so a bought list imported at once does
        # not make the gateway mail thousands of strangers; the rest waits in the queue for
        # later windows. Counted in the database (table confirmation_budget, one row per
        # account and window), not in the gateway's Counters: every gateway sharing the
        # registry database shares the database, but not necessarily the counters (the
        # memory backend is per process), and a reservation is a conditional UPDATE in the
        # *same transaction* as the claim of the mail (add_pending, claim_resend,
        # claim_outbox), so a claim lost to another gateway or rolled back never consumes
        # budget, and gateways together never overdraw it. Not derived from
        # confirm_sent_at either: a resend overwrites it and a removed subscriber takes it
        # away, which would let an add/remove loop reset the budget.
        self.budget = Budget(settings.confirmations_per_account, settings.confirmation_window)
        self._budget_warned: dict[int, float] = {}   # account id -> window whose exhaustion was logged

    # ============================================================ life cycle
    async def start(self, *, listen: bool = True, outbox: bool = True, connect_wait: float = 5.0) -> None:
        """Start the invalidation channel (``listen``; waits up to ``connect_wait``
        for it, lookups read the database until it is up) and the sender of
        queued confirmation mails (``outbox``, needs a relay)."""
        if listen:
            if self.mode == "postgres":
                from ..storage.db import asyncpg_dsn

                dsn = asyncpg_dsn(self.engine.url)
                self.channel = PostgresChannel(self.cache, dsn, self.settings.channel, self.settings.ping_interval)
            elif self.mode == "redis":
                self.channel = RedisChannel(self.cache, self.settings.redis_url, self.settings.channel,
                                            self.settings.ping_interval)
            else:
                self.channel = LocalChannel(self.cache, self.store, self.settings.poll_interval)
            await self.channel.start(connect_wait)
        elif self.mode == "redis":  # a CLI process: publish only, never serve from the cache
            self.channel = RedisChannel(self.cache, self.settings.redis_url, self.settings.channel,
                                        self.settings.ping_interval)
        if outbox and self.relay is not None and self.keys is not None:
            self._outbox_task = asyncio.get_running_loop().create_task(self._outbox())

    async def stop(self) -> None:
        if self._outbox_task is not None:
            self._outbox_task.cancel()
            try:
                await self._outbox_task
            except (asyncio.CancelledError, Exception):
                pass
            self._outbox_task = None
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
            for t in self._tasks:
                t.cancel()
        if self.channel is not None:
            await self.channel.stop()
            self.channel = None
        if self.cache.snapshots is not None:
            await self.cache.snapshots.stop()
        await self.store.close()

    @property
    def channel_healthy(self) -> bool:
        return self.cache.healthy

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_commit(self, events: Sequence[Event]) -> None:
        # This process sees its own change at once; the channel tells the others.
        self.cache.apply(events)
        if self.mode == "redis" and self.channel is not None:
            self._spawn(self._publish(list(events)))

    async def _publish(self, events: list[Event]) -> None:
        try:
            await self.channel.publish(events)
        except Exception as exc:  # the others flush when their subscription breaks; cache_ttl bounds the rest
            log.error("cannot publish registry invalidation to Redis: %s", exc)

    def _need_keys(self) -> Keys:
        if self.keys is None:
            raise RegistryUnavailable("registry.secret is not configured")
        return self.keys

    # ============================================================ hot path (SMTP side)
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
        exact, wild = [], []
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
            return hit  # type: ignore[return-value]
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
            task.add_done_callback(lambda t, k=key, c=current: self._inflight.pop(k, None)
                                   if self._inflight.get(k) is c else None)
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)
        return await asyncio.shield(current[1])

    async def _db(self, coro, *, bounded: bool = True):
        """Await a store call; any database failure becomes RegistryUnavailable.
        ``bounded``: within lookup_timeout (not for bulk work: imports, exports)."""
        try:
            # no extra task, unlike wait_for
            async with asyncio.timeout(self.settings.lookup_timeout if bounded else None):
                return await coro
        except asyncio.CancelledError:
            raise
        except RegistryError:
            raise
        except Exception as exc:
            raise RegistryUnavailable(f"registry database unavailable: {type(exc).__name__}") from None

    # ------------------------------------------------------------ header injection
    def _list_and_hash(self, lst: MailingList | str, address: str) -> tuple[str, str]:
        keys = self._need_keys()
        list_id = lst.id if isinstance(lst, MailingList) else lst
        return list_id, keys.address_hash(list_id, normalize_address(address))

    def unsubscribe_token(self, lst: MailingList | str, address: str) -> str:
        """50 characters of lower-case base32; never expires; fits a mailto local part."""
        list_id, addr_hash = self._list_and_hash(lst, address)
        return self.keys.unsubscribe_token(list_id, addr_hash)

    def unsubscribe_url(self, lst: MailingList | str, address: str) -> str:
        """The RFC 8058 https URL (GET: page with a button; POST: one-click)."""
        return self._unsubscribe_url(self.unsubscribe_token(lst, address))

    def unsubscribe_mailto(self, lst: MailingList | str, address: str) -> str | None:
        """``mailto:u+TOKEN@host?subject=unsubscribe%20TOKEN`` if registry.mailto_address is set."""
        if not self.settings.mailto_address:
            return None
        return self._unsubscribe_mailto(self.unsubscribe_token(lst, address))

    def _unsubscribe_url(self, token: str) -> str:
        return f"{self.settings.base_url}/unsubscribe/{token}"

    def _unsubscribe_mailto(self, token: str) -> str:
        local, _, domain = self.settings.mailto_address.rpartition("@")
        return f"mailto:{local}+{token}@{domain}?subject={quote('unsubscribe ' + token)}"

    def list_headers(self, lst: MailingList, address: str) -> list[tuple[str, str]]:
        """The header fields to add to list mail for one recipient (P-STD, RFC 2369/2919/8058)."""
        token = self.unsubscribe_token(lst, address)
        targets = [f"<{self._unsubscribe_url(token)}>"]
        if self.settings.mailto_address:
            targets.append(f"<{self._unsubscribe_mailto(token)}>")
        return [("List-Id", lst.list_id_header),
                ("List-Unsubscribe", ", ".join(targets)),
                ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click")]

    @staticmethod
    def token_from_mailto(local_part: str, subject: str = "") -> str | None:
        """The unsubscribe token of a mail to the mailto: address: from the
        ``+TOKEN`` of the local part, else from the subject."""
        _, plus, tail = local_part.partition("+")
        if plus and len(tail) == UNSUBSCRIBE_TOKEN_CHARS:
            return tail.lower()
        m = _TOKEN_IN_TEXT.search((subject or "").lower())
        return m.group(1) if m else None

    # ============================================================ opt-out
    async def unsubscribe_by_token(self, token: str, *, via: str) -> UnsubscribeResult:
        """Opt out: delete the subscriber record and keep only the keyed hash in
        the list's suppression set. Idempotent. Raises TokenError (forged or
        damaged token) or RegistryUnavailable. ``via`` (one of OPTOUT_VIAS:
        one-click, page, mailto) is logged and counted."""
        if via not in OPTOUT_VIAS:
            raise ValueError(f"unknown opt-out way {via!r}")
        claim = self._need_keys().read_unsubscribe(token)
        lst = await self._db(self.store.get_list(claim.list_id))
        if lst is None:
            self._count_optout(via, False, "")
            return UnsubscribeResult("", False)
        removed = await self._db(self.store.unsubscribe(claim.list_id, claim.address_hash))
        self._count_optout(via, removed, lst.id)
        if removed:
            await self.store.erased()
        return UnsubscribeResult(lst.name, removed)

    def _count_optout(self, via: str, removed: bool, list_id: str) -> None:
        self.stats["unsubscribes"] += 1
        self.optouts[(via, "removed" if removed else "already")] += 1
        log.info("opt-out list=%s removed=%s via=%s", list_id or "-", removed, via)

    async def unsubscribe_view(self, token: str) -> PageInfo:
        claim = self._need_keys().read_unsubscribe(token)
        lst = await self._db(self.store.get_list(claim.list_id))
        if lst is None:
            return PageInfo("", "", "gone")
        sub = await self._db(self.store.subscriber(claim.list_id, claim.address_hash))
        if sub is None:
            return PageInfo(lst.name, "", "unsubscribed")
        return PageInfo(lst.name, mask_address(sub.address), "subscribed")

    # ============================================================ opt-in (confirmation)
    async def confirmation_view(self, token: str) -> PageInfo:
        """What the GET page shows. Confirms nothing."""
        claim = self._need_keys().read_confirm(token, self.clock())
        lst = await self._db(self.store.get_list(claim.list_id))
        if lst is None:
            raise TokenError("this list no longer exists")
        found = await self._db(self.store.subscriber_nonce(claim.list_id, claim.address_hash))
        if found is None:
            raise TokenError("this subscription request no longer exists (it was withdrawn or removed)")
        address, status, nonce = found
        if nonce != claim.nonce:
            raise TokenError("this link was replaced by a newer confirmation mail; use the newest one")
        return PageInfo(lst.name, mask_address(address), status)

    async def confirm(self, token: str, *, ip: str = "", user_agent: str = "") -> PageInfo:
        """Confirm the subscription (the POST of the page). Idempotent. Records
        when and from which IP/user agent. Lifts an earlier opt-out of the address."""
        claim = self._need_keys().read_confirm(token, self.clock())
        lst = await self._db(self.store.get_list(claim.list_id))
        if lst is None:
            raise TokenError("this list no longer exists")
        result, address = await self._db(self.store.confirm(claim.list_id, claim.address_hash, claim.nonce,
                                                            _clean_ip(ip, "ip") if ip else "",
                                                            (user_agent or "")[:512]))
        if result == "gone":
            raise TokenError("this subscription request no longer exists (it was withdrawn or removed)")
        if result == "stale":
            raise TokenError("this link was replaced by a newer confirmation mail; use the newest one")
        return PageInfo(lst.name, mask_address(address), "confirmed")

    def confirm_url(self, lst: MailingList, address_hash: str, nonce: str) -> tuple[str, float]:
        expires = self.clock() + self.settings.confirm_token_ttl
        token = self._need_keys().confirm_token(lst.id, address_hash, nonce, expires)
        return f"{self.settings.base_url}/confirm/{token}", expires

    def confirmation_message(self, lst: MailingList, address: str, address_hash: str,
                             nonce: str) -> tuple[bytes, bool]:
        """The confirmation mail (RFC 5322, text/plain UTF-8, quoted-printable);
        returns (bytes, needs SMTPUTF8). It shows the list and the address, never
        the consent evidence: ``source`` is the customer's internal note (a
        form, a campaign, an import file name), kept for the API and exports."""
        from email import policy

        url, expires = self.confirm_url(lst, address_hash, nonce)
        utf8 = not (address.isascii() and lst.confirm_from.isascii())
        msg = EmailMessage(policy=policy.SMTPUTF8 if utf8 else policy.SMTP)
        msg["From"] = Address(display_name=lst.name, addr_spec=lst.confirm_from)
        msg["To"] = address
        msg["Subject"] = self.settings.confirm_subject.replace("{list}", lst.name)
        msg["Date"] = formatdate(self.clock(), localtime=False)
        msg["Message-ID"] = make_msgid("confirm", domain=self.hostname)
        msg["Auto-Submitted"] = "auto-generated"
        until = format_datetime(datetime.fromtimestamp(expires, timezone.utc))
        lines = [
            "Hello,",
            "",
            f"someone, hopefully you, asked to subscribe {display_address(address)} to the",
            f"mailing list \"{lst.name}\" <{lst.list_id}>.",
            "",
            "To confirm, open this link and press the \"Confirm\" button:",
            "",
            url,
            "",
            f"The link is valid until {until}.",
            "If you did not ask for this, ignore this mail: you will not be subscribed.",
            "",
            "-- ",
            f"sent by the mail gateway {self.hostname} on behalf of the list owner",
        ]
        msg.set_content("\n".join(lines) + "\n", charset="utf-8", cte="quoted-printable")
        return bytes(msg) if not utf8 else msg.as_bytes(policy=policy.SMTPUTF8), utf8

    async def _send_confirmation(self, lst: MailingList, address: str, address_hash: str,
                                 nonce: str) -> tuple[bool, str]:
        if self.relay is None:
            return False, "no relay in this process"
        data, utf8 = self.confirmation_message(lst, address, address_hash, nonce)
        try:
            async with asyncio.timeout(self.settings.send_timeout):
                utx, reply = await self.relay.begin(lst.confirm_from, [], utf8=utf8, eight_bit=False,
                                                    size=len(data))
                if utx is None:
                    return False, reply.render()
                try:
                    reply = await utx.rcpt(address, [])
                    if not reply.is_positive:
                        return False, reply.render()
                    reply = await utx.data(data)
                    if not reply.is_positive:
                        return False, reply.render()
                finally:
                    await utx.close()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # TimeoutError, connection trouble
            return False, f"{type(exc).__name__}: {exc}"
        return True, reply.render()

    def _budget_exhausted(self, account_id: int, account_name: str, window_start: float) -> None:
        """A confirmation mail was held back by the budget: count it, and warn
        once per account and window (per gateway process): operators want to
        notice bought-list imports."""
        self.stats["confirmations_deferred"] += 1
        if self._budget_warned.get(account_id) == window_start:
            return
        if len(self._budget_warned) > 10_000:
            self._budget_warned = {a: w for a, w in self._budget_warned.items() if w >= window_start}
        self._budget_warned[account_id] = window_start
        self.stats["confirmation_budget_exhausted"] += 1
        b = self.budget
        log.warning("account %s used up its budget of %d confirmation mails per %g s; further confirmation "
                    "mails stay queued until %s (a bought or old list being imported?)", account_name, b.limit,
                    b.window, format_datetime(datetime.fromtimestamp(window_start + b.window, timezone.utc)))

    async def _deliver(self, lst: MailingList, address: str, address_hash: str, nonce: str) -> str:
        ok, detail = await self._send_confirmation(lst, address, address_hash, nonce)
        status = "sent" if ok else "failed"
        self.stats["confirmations_sent" if ok else "confirmations_failed"] += 1
        if not ok:
            log.warning("confirmation mail for list %s failed: %s", lst.id, detail)
        try:
            await self.store.set_confirmation(lst.id, address_hash, status)
        except Exception:
            log.warning("cannot record confirmation state", exc_info=True)
        return status

    async def _outbox(self) -> None:
        """Send queued confirmation mails (bulk imports, CLI, single adds over
        the budget). Several gateways may run this: claims are atomic per
        subscriber and take the account's budget in the same transaction;
        accounts over budget are skipped until their window turns."""
        sem = asyncio.Semaphore(self.settings.outbox_concurrency)
        stale_after = max(60.0, self.settings.send_timeout * 2)
        while True:
            try:
                await asyncio.wait_for(self._outbox_kick.wait(), self.settings.outbox_interval)
            except asyncio.TimeoutError:
                pass
            self._outbox_kick.clear()
            try:
                while True:
                    batch = await self.store.claim_outbox(self.settings.outbox_batch, stale_after,
                                                          budget=self.budget,
                                                          on_exhausted=self._budget_exhausted)
                    if not batch:
                        break
                    lists = {lid: await self.store.get_list(lid) for lid in {item[0] for item in batch}}

                    async def one(item):
                        list_id, address, address_hash, nonce = item
                        lst = lists[list_id]   # noqa: B023 - awaited below, within this iteration
                        if lst is not None:
                            async with sem:
                                await self._deliver(lst, address, address_hash, nonce)

                    await asyncio.gather(*(one(item) for item in batch))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("confirmation outbox run failed", exc_info=True)

    def kick_outbox(self) -> None:
        self._outbox_kick.set()

    # ============================================================ accounts, API keys
    async def _account(self, account_name: str) -> tuple[int, bool, list[tuple[str, str]]]:
        acc = await self._db(self.store.account(account_name))
        if acc is None:
            raise NotFound(f"no account {account_name!r}")
        return acc

    async def issue_api_key(self, account_name: str, label: str = "") -> str:
        """A new API key for the account; only its SHA-256 is stored."""
        acc_id, _, _ = await self._account(account_name)
        key = "gwk_" + secrets.token_urlsafe(32)
        await self._db(self.store.add_api_key(acc_id, api_key_hash(key), _clean_text(label, "label", 128)))
        return key

    async def revoke_api_keys(self, account_name: str, label: str | None = None) -> int:
        acc_id, _, _ = await self._account(account_name)
        return await self._db(self.store.revoke_api_keys(acc_id, label))

    async def account_for_api_key(self, key: str) -> str | None:
        if not key or len(key) > 200:
            return None
        return await self._db(self.store.account_for_key(api_key_hash(key)))

    # ============================================================ lists
    async def create_list(self, account_name: str, *, name: str, list_id: str, senders: Sequence[str],
                          confirm_from: str) -> MailingList:
        """Register a list. Senders and the confirmation From must be in the
        account's verified/approved sender domains (P-FORGE)."""
        acc_id, allow_sub, domains = await self._account(account_name)
        name = list_name(name)
        lid = normalize_list_id(list_id)
        if not senders:
            raise Invalid("senders", "at least one envelope sender is needed")
        if len(senders) > 20:
            raise Invalid("senders", "at most 20")
        patterns = []
        for i, s in enumerate(senders):
            p = normalize_sender_pattern(s, f"senders[{i}]")
            if not _domain_authorized(p.rpartition("@")[2], allow_sub, domains):
                raise Invalid(f"senders[{i}]", f"domain of {s!r} is not a verified sender domain of your account")
            if p not in patterns:
                patterns.append(p)
        cf = normalize_address(confirm_from, "confirm_from")
        if not _domain_authorized(cf.rpartition("@")[2], allow_sub, domains):
            raise Invalid("confirm_from", "domain is not a verified sender domain of your account")
        new_id = await self._db(self.store.create_list(acc_id, name, lid, patterns, cf))
        lst = await self._db(self.store.get_list(new_id))
        assert lst is not None
        return lst

    async def get_list(self, account_name: str, list_id: str) -> MailingList:
        """The account's list; NotFound for another account's list exactly as for none (P-HARVEST)."""
        acc_id, _, _ = await self._account(account_name)
        if not re.fullmatch(r"[0-9a-f]{16}", list_id or ""):
            raise NotFound("no such list")
        lst = await self._db(self.store.get_list(list_id, acc_id))
        if lst is None:
            raise NotFound("no such list")
        return lst

    async def lists(self, account_name: str) -> list[MailingList]:
        acc_id, _, _ = await self._account(account_name)
        return await self._db(self.store.lists(account_id=acc_id))

    async def delete_list(self, account_name: str, list_id: str) -> None:
        """Delete a list with its subscribers and suppression set."""
        lst = await self.get_list(account_name, list_id)
        if not await self._db(self.store.delete_list(lst.account_id, lst.id)):
            raise NotFound("no such list")
        await self.store.erased()

    # ============================================================ subscribers
    def _evidence(self, row: dict, prefix: str, default_source: str = "") -> dict:
        now = self.clock()
        address = normalize_address(row.get("address"), f"{prefix}address")
        return {"address": address,
                "source": _clean_text(row.get("source") or default_source, f"{prefix}source", 255),
                "ip": _clean_ip(row.get("ip"), f"{prefix}ip"),
                "user_agent": _clean_text(row.get("user_agent"), f"{prefix}user_agent", 512),
                "requested_at": _when(row.get("requested_at"), f"{prefix}requested_at", now)}

    async def add_subscriber(self, account_name: str, list_id: str, address: str, *, source: str = "",
                             ip: str = "", user_agent: str = "", requested_at: Any = None,
                             reoptin: bool = False) -> AddResult:
        """Add a pending subscriber and send the confirmation mail now.
        Conflict("exists") if subscribed/pending, Conflict("suppressed") if the
        address opted out and ``reoptin`` is false; with ``reoptin`` a fresh
        double opt-in starts (RateLimited if one was started within
        reoptin_interval). ``confirmation`` of the result: sent | failed, or
        queued when the account's budget of confirmation mails for this window
        is used up (the outbox sends it in a later window)."""
        lst = await self.get_list(account_name, list_id)
        keys = self._need_keys()
        ev = self._evidence({"address": address, "source": source, "ip": ip, "user_agent": user_agent,
                             "requested_at": requested_at}, "")
        addr_hash = keys.address_hash(lst.id, ev["address"])
        budget = self.budget
        sub, nonce = await self._db(self.store.add_pending(
            lst.id, ev["address"], addr_hash, source=ev["source"], requested_at=ev["requested_at"], ip=ev["ip"],
            user_agent=ev["user_agent"], reoptin=reoptin, reoptin_interval=self.settings.reoptin_interval,
            confirm_status="sending", account_id=lst.account_id, budget=budget))
        if sub.confirmation == "queued":
            self._budget_exhausted(lst.account_id, lst.account, budget.start(self.clock()))
            return AddResult(sub, "queued", "the account's budget of confirmation mails for this window is used "
                                            "up; the mail is queued and goes out in a later window")
        status = await self._deliver(lst, ev["address"], addr_hash, nonce)
        sub = await self._db(self.store.subscriber(lst.id, addr_hash)) or sub
        return AddResult(sub, status)

    async def import_subscribers(self, account_name: str, list_id: str, rows: Sequence[Any], *,
                                 reoptin: bool = False, source: str = "") -> list[dict]:
        """Bulk add. Each row is validated on its own: a bad one gets the result
        ``invalid`` with the ``field`` (address, source, ip, user_agent,
        requested_at) and the reason, and the good rows are imported anyway.
        Each new address becomes pending with its confirmation mail queued (sent
        by the outbox within outbox_interval, as far as the account's budget of
        confirmation mails allows; the rest in later windows). Returns one
        result per row, in order: {"address", "result":
        queued|exists|suppressed|rate_limited|duplicate|invalid, "reason"
        [, "field"]}, with the row's "line" if it had one (CSV files).
        ``Invalid`` only for the request as a whole (more than max_bulk rows)."""
        lst = await self.get_list(account_name, list_id)
        keys = self._need_keys()
        if len(rows) > self.settings.max_bulk:
            raise Invalid("subscribers", f"at most {self.settings.max_bulk} per request")
        clean, seen, out, positions = [], set(), [], []
        for row in rows:
            res: dict = {}
            if isinstance(row, dict) and isinstance(row.get("line"), int):
                res["line"] = row["line"]
            out.append(res)
            if not isinstance(row, dict):
                res.update(address="", result="invalid", field="", reason="must be an object")
                continue
            try:
                ev = self._evidence(row, "", source)
            except Invalid as exc:
                given = row.get("address")
                res.update(address=given[:320] if isinstance(given, str) else "", result="invalid", field=exc.field,
                           reason=exc.reason)
                continue
            res["address"] = ev["address"]
            if ev["address"] in seen:
                res.update(result="duplicate", reason="appears earlier in this import")
                continue
            seen.add(ev["address"])
            ev["address_hash"] = keys.address_hash(lst.id, ev["address"])
            positions.append(len(out) - 1)
            clean.append(ev)
        for chunk_start in range(0, len(clean), 1000):
            chunk = clean[chunk_start:chunk_start + 1000]
            results = await self._db(self.store.import_pending(
                lst.id, chunk, reoptin=reoptin, reoptin_interval=self.settings.reoptin_interval), bounded=False)
            for j, (result, reason) in enumerate(results):
                out[positions[chunk_start + j]].update(result=result, reason=reason)
        if clean:
            self.kick_outbox()
        return out

    async def subscriber(self, account_name: str, list_id: str, address: str) -> Subscriber:
        lst = await self.get_list(account_name, list_id)
        sub = await self._db(self.store.subscriber(*self._list_and_hash(lst, address)))
        if sub is None:
            raise NotFound("not a subscriber of this list")
        return sub

    async def is_suppressed(self, account_name: str, list_id: str, address: str) -> bool:
        lst = await self.get_list(account_name, list_id)
        return await self._db(self.store.suppressed(*self._list_and_hash(lst, address)))

    async def subscribers(self, account_name: str, list_id: str, *, status: str | None = None,
                          cursor: int = 0, limit: int = 100) -> tuple[list[Subscriber], int | None]:
        """A page of subscribers with consent evidence; the next cursor or None."""
        lst = await self.get_list(account_name, list_id)
        if status not in (None, "pending", "confirmed"):
            raise Invalid("status", "must be pending or confirmed")
        limit = max(1, min(limit, 1000))
        rows = await self._db(self.store.subscribers(lst.id, status, cursor, limit), bounded=False)
        nxt = rows[-1][0] if len(rows) == limit else None
        return [s for _, s in rows], nxt

    async def iter_subscribers(self, account_name: str, list_id: str, status: str | None = None):
        """All subscribers, in pages (export)."""
        cursor: int | None = 0
        while cursor is not None:
            page, cursor = await self.subscribers(account_name, list_id, status=status, cursor=cursor, limit=1000)
            for sub in page:
                yield sub

    async def remove_subscriber(self, account_name: str, list_id: str, address: str) -> bool:
        """Remove a subscriber on the person's behalf: the same permanent removal
        as an opt-out (the keyed hash stays in the suppression set)."""
        lst = await self.get_list(account_name, list_id)
        removed = await self._db(self.store.unsubscribe(*self._list_and_hash(lst, address)))
        self._count_optout("api", removed, lst.id)
        if removed:
            await self.store.erased()
        return removed

    async def resend_confirmation(self, account_name: str, list_id: str, address: str) -> str:
        """Send the confirmation mail again: RateLimited within resend_interval
        of the last one or after max_confirmation_mails, BudgetExhausted (a
        RateLimited, retry_after = until the next window) when the account's
        budget of confirmation mails is used up; "sent" | "failed"."""
        lst = await self.get_list(account_name, list_id)
        _, addr_hash = self._list_and_hash(lst, address)
        budget = self.budget
        try:
            address, nonce = await self._db(self.store.claim_resend(
                lst.id, addr_hash, self.settings.resend_interval, self.settings.max_confirmation_mails,
                account_id=lst.account_id, budget=budget))
        except BudgetExhausted:
            self._budget_exhausted(lst.account_id, lst.account, budget.start(self.clock()))
            raise
        return await self._deliver(lst, address, addr_hash, nonce)

    async def list_stats(self, account_name: str, list_id: str) -> dict:
        lst = await self.get_list(account_name, list_id)
        return await self._db(self.store.stats(lst.id), bounded=False)


def build_registry(config, engine, *, relay=None, accounts=None, clock: Callable[[], float] = time.time
                   ) -> RegistryService:
    """The service as the gateway composes it (ConfigError if the key is missing)."""
    secret = registry_secret(config)
    require_secret(config, secret)
    return RegistryService(engine, config.registry, secret=secret, hostname=config.smtp.hostname,
                           relay=relay, accounts=accounts, clock=clock)
