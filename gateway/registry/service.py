"""RegistryService: the one API of the mailing-list registry.

The SMTP side uses the hot-path part (``list_for_sender``, ``recipient_status``,
``list_headers`` / ``unsubscribe_url`` / ``unsubscribe_token``,
``unsubscribe_by_token``); the HTTP API, the pages and the CLI use the rest.
docs/registry.md describes it.

The service composes its parts (base.py: shared state and guards;
lookups.py, links.py, outbox.py, admin.py) and owns their life cycle: the
invalidation channel, the outbox task, the store.
"""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Callable, Sequence

from .admin import Admin
from .cache import Channel, ListSnapshots, LocalChannel, PostgresChannel, RedisChannel, SubscriptionCache
from .links import OPTOUT_VIAS
from .lookups import Lookups
from .model import RegistryUnavailable
from .settings import RegistrySettings
from .store import Budget, Event, RegistryStore
from .tokens import Keys
from ..state.background import stop_tasks

log = logging.getLogger("gateway.registry")


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


# ------------------------------------------------------------------ the service
class RegistryService(Lookups, Admin):
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

            fast_dsn = asyncpg_dsn(engine.url)
            assert fast_dsn is not None   # None only for an engine that is not PostgreSQL
            fast = FastLookups(fast_dsn, max_size=settings.lookup_pool_size,
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
        self._last_senders: dict[str, tuple] = {}
        self._senders_preloaded = False
        self._senders_probe: asyncio.Task | None = None
        self.cache.on_lists_changed = self._forget_last_senders
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
                assert dsn is not None   # mode "postgres" is refused in __init__ unless the engine is PostgreSQL
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
        if listen:
            try:
                await self.preload_senders()
            except RegistryUnavailable as exc:   # then per account, as the lookups need them
                log.warning("could not read the list senders at start: %s", exc)
        if outbox and self.relay is not None and self.keys is not None:
            self._outbox_task = asyncio.get_running_loop().create_task(self._outbox())

    async def stop(self) -> None:
        outbox, self._outbox_task = self._outbox_task, None
        await stop_tasks([outbox], "registry outbox")
        if self._tasks:   # confirmation sends and the like: a little time to finish, then cancelled
            await asyncio.wait(list(self._tasks), timeout=5)
            await stop_tasks(list(self._tasks), "registry background work")
        probe, self._senders_probe = self._senders_probe, None
        await stop_tasks([probe], "list-sender probe")
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
            self._spawn(self._publish(self.channel, list(events)))

    async def _publish(self, channel: Channel, events: list[Event]) -> None:
        try:
            await channel.publish(events)
        except Exception as exc:  # the others flush when their subscription breaks; cache_ttl bounds the rest
            log.error("cannot publish registry invalidation to Redis: %s", exc)


def build_registry(config, engine, *, relay=None, accounts=None, clock: Callable[[], float] = time.time
                   ) -> RegistryService:
    """The service as the gateway composes it (ConfigError if the key is missing)."""
    secret = registry_secret(config)
    require_secret(config, secret)
    return RegistryService(engine, config.registry, secret=secret, hostname=config.smtp.hostname,
                           relay=relay, accounts=accounts, clock=clock)
