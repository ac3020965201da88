"""Settings of the mailing-list registry (``[registry]`` in the config file)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

Invalidation = Literal["auto", "postgres", "redis", "local"]


@dataclass(frozen=True)
class RegistrySettings:
    # Key of the confirmation/unsubscribe tokens and of the opt-out hashes. Use
    # "env:NAME". Every gateway sharing a database needs the same value, and it
    # must never change: the opt-out hashes are keyed with it. Empty: dev mode
    # generates one and keeps it in secret_file; otherwise the HTTP side refuses
    # to start, and the registry answers RegistryUnavailable where it needs it.
    secret: str = ""
    secret_file: str = ""              # dev mode only; "" = next to the SQLite database
    public_base_url: str = "http://127.0.0.1:8025"   # where the confirm/unsubscribe pages are reached
    mailto_address: str = ""           # e.g. "unsubscribe@gw.example.net": adds a mailto: List-Unsubscribe
    confirm_token_ttl: float = 7 * 86400.0
    resend_interval: float = 600.0     # least time between two confirmation mails to one subscriber
    max_confirmation_mails: int = 3    # per subscription attempt (first mail included)
    reoptin_interval: float = 30 * 86400.0   # a new opt-in for an opted-out address, at most this often
    confirm_subject: str = "Please confirm your subscription to {list}"
    send_timeout: float = 30.0         # one confirmation mail through the relay
    outbox_interval: float = 2.0       # how often queued confirmation mails (bulk import) are sent
    outbox_batch: int = 200
    outbox_concurrency: int = 8
    # Budget of confirmation mails per account: at most confirmations_per_account
    # in each fixed confirmation_window (aligned to multiples of it), counted in
    # the database, so shared by every gateway on it. A mail beyond it waits in the
    # queue (subscriber pending) until a later window. 0 = no budget.
    confirmations_per_account: int = 500
    confirmation_window: float = 3600.0
    max_bulk: int = 10000              # subscribers per import request
    cache_size: int = 200_000          # (list, address) entries, positive and negative
    cache_ttl: float = 300.0           # an entry is re-read after this even without invalidation
    # Whole lists in memory: every subscription state of a list that gets mail is
    # loaded in the background (12 bytes per address); at most this many
    # addresses over all lists (LRU beyond; a bigger list is never loaded). 0 = off.
    snapshot_max_entries: int = 5_000_000
    snapshot_refresh: float = 3600.0   # a list snapshot is reloaded after this even without invalidation
    lookup_timeout: float = 3.0        # a database lookup on the RCPT path
    # PostgreSQL: RCPT lookups (and the sender map) read through their own asyncpg
    # pool of at most this many connections (read-only fast path); 0 = through
    # the SQLAlchemy engine like everything else. SQLite always uses the engine.
    lookup_pool_size: int = 20
    lookup_batch: bool = True          # misses for one list in one event-loop turn share a query
    invalidation: Invalidation = "auto"   # auto: postgres with PostgreSQL storage, else local
    redis_url: str = "redis://127.0.0.1:6379/0"
    channel: str = "gw_registry"
    ping_interval: float = 0.5         # health check of the invalidation channel
    poll_interval: float = 0.5         # local mode: change counter poll (CLI writes in another process)

    def __post_init__(self) -> None:
        if self.secret and len(self.secret) < 16:
            raise ValueError("secret: must be at least 16 characters (e.g. 32 random bytes in hex)")
        url = urlsplit(self.public_base_url)
        if url.scheme not in ("http", "https") or not url.netloc or url.query or url.fragment:
            raise ValueError(f"public_base_url: {self.public_base_url!r} is not an http(s) base URL")
        if self.mailto_address and (self.mailto_address.count("@") != 1 or "+" in self.mailto_address
                                    or len(self.mailto_address.split("@")[0]) > 10):
            raise ValueError("mailto_address: must be local@domain with a local part of at most 10 "
                             "characters and no '+' (the token is appended as +TOKEN)")
        for name in ("confirm_token_ttl", "resend_interval", "send_timeout", "outbox_interval",
                     "cache_ttl", "lookup_timeout", "ping_interval", "poll_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be greater than 0")
        if self.snapshot_max_entries < 0:
            raise ValueError("snapshot_max_entries: must not be negative (0 = off)")
        if self.snapshot_refresh <= 0:
            raise ValueError("snapshot_refresh: must be greater than 0")
        if not 0 <= self.lookup_pool_size <= 500:
            raise ValueError("lookup_pool_size: must be between 0 (off) and 500")
        if self.reoptin_interval < 0:
            raise ValueError("reoptin_interval: must not be negative")
        for name in ("max_confirmation_mails", "outbox_batch", "outbox_concurrency", "max_bulk", "cache_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1")
        if self.confirmations_per_account < 0:
            raise ValueError("confirmations_per_account: must be 0 (no budget) or more")
        if self.confirmation_window < 1:
            raise ValueError("confirmation_window: must be at least 1 second")
        if "{list}" not in self.confirm_subject:
            raise ValueError("confirm_subject: must contain {list}")
        if not self.channel.replace("_", "").isalnum() or len(self.channel) > 63:
            raise ValueError("channel: letters, digits and _ only (at most 63)")

    @property
    def base_url(self) -> str:
        return self.public_base_url.rstrip("/")
