"""Settings of the message-content checks (issue 5).

Plain frozen dataclasses with a default for every field, so a config loader
can build them from TOML with ``HeaderSettings(**table)``. Semantic validation
happens in ``__post_init__`` and raises ``ValueError`` naming the field.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .findings import ACTIONS, DEFAULT_ACTIONS, RULES

_HOST = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z")


@dataclass(frozen=True)
class HeaderSettings:
    # finding id -> "reject" | "flag" | "off". Only overrides need to be given:
    # ids left out keep their default (findings.DEFAULT_ACTIONS).
    actions: dict[str, str] = field(default_factory=dict)
    # Date window around the gateway clock (services.clock()). The past side is
    # longer than the queue lifetime of the customers' MTAs (Postfix
    # maximal_queue_lifetime 5 days, Exim and Sendmail alike): a message they
    # retry, or one this gateway deferred with 451, keeps its original Date.
    date_past_seconds: int = 7 * 86400
    date_future_seconds: int = 15 * 60
    # A missing Date / Message-ID in a session with an account (SMTP AUTH or a
    # client network): "add" one (RFC 6409 8; the relay puts it below its trace
    # headers) or "refuse" the message. Sessions without an account get no
    # header added: their finding's action in `actions` decides (hdr.date_missing
    # refuses, hdr.message_id_missing flags, by default).
    date: str = "add"
    message_id: str = "add"
    # Right-hand side of generated Message-IDs; "" = smtp.hostname.
    message_id_domain: str = ""
    # Host names that only the gateway writes into Received "by"/"from";
    # smtp.hostname is always included.
    own_hostnames: list[str] = field(default_factory=list)
    # Brand name -> the brand's domain, for subj.brand (display-name
    # impersonation, e.g. {"PayPal": "paypal.com"}). Empty = check inactive.
    brand_domains: dict[str, str] = field(default_factory=dict)
    # Deepest MIME nesting walked by hdr.mime; deeper is itself a finding.
    mime_max_depth: int = 30

    def __post_init__(self) -> None:
        merged = dict(DEFAULT_ACTIONS)
        for key, value in self.actions.items():
            if key not in RULES:
                raise ValueError(f"headers.actions: unknown finding id {key!r}")
            if value not in ACTIONS:
                raise ValueError(f"headers.actions[{key!r}]: {value!r} is not one of {', '.join(ACTIONS)}")
            merged[key] = value
        object.__setattr__(self, "actions", merged)
        if self.date_past_seconds < 0:
            raise ValueError("headers.date_past_seconds must be >= 0")
        if self.date_future_seconds < 0:
            raise ValueError("headers.date_future_seconds must be >= 0")
        for key in ("date", "message_id"):
            if getattr(self, key) not in ("add", "refuse"):
                raise ValueError(f"headers.{key}: {getattr(self, key)!r} is not 'add' or 'refuse'")
        if self.message_id_domain and not _HOST.match(self.message_id_domain):
            raise ValueError(f"headers.message_id_domain: {self.message_id_domain!r} is not a host name")
        for h in self.own_hostnames:
            if not _HOST.match(h):
                raise ValueError(f"headers.own_hostnames: {h!r} is not a host name")
        for brand, dom in self.brand_domains.items():
            if not brand.strip():
                raise ValueError("headers.brand_domains: empty brand name")
            if not _HOST.match(dom):
                raise ValueError(f"headers.brand_domains[{brand!r}]: {dom!r} is not a domain")
        if not 1 <= self.mime_max_depth <= 200:
            raise ValueError("headers.mime_max_depth must be within 1..200")
