"""The mailing-list registry as plain data, plus the rules that need no I/O:
address normalization, sender patterns, List-Id syntax."""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from email.header import Header
from typing import Literal

from ..core.address import AddressError, parse_domain, parse_mailbox

RecipientStatus = Literal["confirmed", "pending", "unsubscribed", "unknown"]
SubscriberState = Literal["pending", "confirmed"]


class RegistryError(Exception):
    """Base of the registry's refusals."""


class RegistryUnavailable(RegistryError):
    """The database cannot be reached and the cache cannot answer: the caller
    must defer (451 4.3.0), never accept."""


class NotFound(RegistryError):
    """No such list/subscriber *for this account* (another account's list is
    reported exactly like one that does not exist: P-HARVEST)."""


class Invalid(RegistryError):
    """A value that does not pass validation; names the field."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class Conflict(RegistryError):
    """The request clashes with the stored state (exists already, opted out)."""

    def __init__(self, field: str, reason: str, code: str = "conflict"):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason
        self.code = code


class RateLimited(RegistryError):
    def __init__(self, reason: str, retry_after: float):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class BudgetExhausted(RateLimited):
    """The account's budget of confirmation mails for the current window
    (registry ``confirmations_per_account`` per ``confirmation_window``) is used
    up. ``retry_after``: until the next window."""


class TokenError(RegistryError):
    """A confirmation/unsubscribe token that is forged, damaged or expired."""

    def __init__(self, reason: str, expired: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.expired = expired


# ------------------------------------------------------------------- addresses
def normalize_address(address: object, field: str = "address") -> str:
    """The one form addresses are stored and compared in: the local part as
    given (NFC when non-ASCII: RFC 6532), the domain as lower-case A-label."""
    if not isinstance(address, str):
        raise Invalid(field, "must be a string")
    text = address.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    if not text:
        raise Invalid(field, "must not be empty")
    try:
        env = parse_mailbox(text, utf8=True)
    except AddressError as exc:
        raise Invalid(field, f"not a valid address: {exc.detail}") from None
    if env.is_literal:
        raise Invalid(field, "address literals are not accepted")
    local = env.local if env.local.isascii() else unicodedata.normalize("NFC", env.local)
    return f"{local}@{env.domain_ascii}"


def display_address(normalized: str) -> str:
    """The address for humans (U-label domain)."""
    local, _, domain = normalized.rpartition("@")
    try:
        import idna
        domain = idna.decode(domain)
    except Exception:
        pass
    return f"{local}@{domain}"


def mask_address(normalized: str) -> str:
    """``b***@example.org``: enough for the person to recognise it on a page
    that anyone holding the link can open."""
    local, _, domain = display_address(normalized).rpartition("@")
    return f"{local[:1]}***@{domain}"


_SENDER_LOCAL = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+\Z")


def normalize_sender_pattern(pattern: str, field: str = "senders") -> str:
    """An envelope sender of a list: an address, or a VERP pattern with ``*``
    in the local part (``bounces-*@lists.example.com``)."""
    if not isinstance(pattern, str) or not pattern.strip():
        raise Invalid(field, "must be a non-empty address or pattern")
    text = pattern.strip()
    local, at, domain = text.rpartition("@")
    if not at or not local:
        raise Invalid(field, f"{text!r} is not local@domain")
    if "*" in domain:
        raise Invalid(field, f"{text!r}: '*' is allowed in the local part only")
    if "*" in local:
        if not _SENDER_LOCAL.match(local) or ".." in local or local.startswith(".") or local.endswith("."):
            raise Invalid(field, f"{text!r}: invalid local part pattern")
        try:
            dom = parse_domain(domain, utf8=True)
        except AddressError as exc:
            raise Invalid(field, f"{text!r}: {exc.detail}") from None
        return f"{local}@{dom}"
    return normalize_address(text, field)


def sender_matcher(pattern: str):
    """A predicate on a normalized MAIL FROM."""
    if "*" not in pattern:
        return pattern.__eq__
    local, _, domain = pattern.rpartition("@")
    rx = re.compile("".join("[^@]*" if c == "*" else re.escape(c) for c in local) + "@" + re.escape(domain) + r"\Z")
    return lambda addr: rx.match(addr) is not None


_LIST_LABEL = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)+\Z")


def normalize_list_id(value: str, field: str = "list_id") -> str:
    """RFC 2919 list identifier (without the angle brackets): a dot-atom with a
    namespace, e.g. ``news.example.com``."""
    if not isinstance(value, str):
        raise Invalid(field, "must be a string")
    text = value.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    if not _LIST_LABEL.match(text) or len(text) > 255:
        raise Invalid(field, "must be a dot-atom like news.example.com (RFC 2919), at most 255 characters")
    return text.lower()


def list_name(value: str, field: str = "name") -> str:
    if not isinstance(value, str) or not value.strip():
        raise Invalid(field, "must not be empty")
    text = value.strip()
    if len(text) > 128:
        raise Invalid(field, "at most 128 characters")
    if any(unicodedata.category(c)[0] == "C" for c in text):
        raise Invalid(field, "must not contain control characters")
    return text


# ------------------------------------------------------------------- records
@dataclass(frozen=True, slots=True)
class MailingList:
    id: str                    # opaque, random (16 hex digits): never sequential
    account_id: int
    account: str               # owner account name
    name: str
    list_id: str               # RFC 2919 identifier, e.g. "news.example.com"
    senders: tuple[str, ...]   # normalized envelope senders / VERP patterns
    confirm_from: str          # From: and MAIL FROM of the confirmation mail
    created_at: float

    @property
    def list_id_header(self) -> str:
        """The List-Id field value (RFC 2919), the name as a quoted phrase."""
        if self.name.isascii():
            phrase = '"' + self.name.replace("\\", "\\\\").replace('"', '\\"') + '"'
        else:  # RFC 2047 encoded word
            phrase = Header(self.name, "utf-8").encode()
        return f"{phrase} <{self.list_id}>"

    def public(self) -> dict:
        return {"id": self.id, "name": self.name, "list_id": self.list_id, "senders": list(self.senders),
                "confirm_from": self.confirm_from, "created_at": self.created_at}


@dataclass(frozen=True, slots=True)
class Subscriber:
    list_id: str
    address: str               # normalized
    status: SubscriberState
    source: str
    requested_at: float
    requested_ip: str
    requested_user_agent: str
    confirmed_at: float | None
    confirmed_ip: str
    confirmed_user_agent: str
    confirmation: str          # last confirmation mail: queued|sending|sent|failed|""
    confirmation_sent_at: float | None
    confirmation_mails: int
    created_at: float

    def public(self) -> dict:
        return {
            "address": self.address, "status": self.status,
            "consent": {
                "source": self.source,
                "requested_at": self.requested_at, "requested_ip": self.requested_ip or None,
                "requested_user_agent": self.requested_user_agent or None,
                "confirmed_at": self.confirmed_at, "confirmed_ip": self.confirmed_ip or None,
                "confirmed_user_agent": self.confirmed_user_agent or None,
            },
            "confirmation": self.confirmation or None,
            "confirmation_sent_at": self.confirmation_sent_at,
            "confirmation_mails": self.confirmation_mails,
            "created_at": self.created_at,
        }


@dataclass(frozen=True, slots=True)
class AddResult:
    subscriber: Subscriber
    confirmation: str          # sent | failed | queued
    detail: str = ""


@dataclass(frozen=True, slots=True)
class UnsubscribeResult:
    list_name: str
    removed: bool              # False: was not subscribed (already gone): still suppressed now
