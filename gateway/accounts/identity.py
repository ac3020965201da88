"""The end user inside an account (issue 12, point 2; docs/sender-auth.md
"Identities inside an account").

A hosting account serves many sites; limits, fingerprints, the harvest guard
and strikes key on (account, identity) (``Transaction.charged_to``). The
identity comes from:

- a SASL sub-login ``account/user``: AUTH as ``account`` with the account's
  password, the part after the separator is the session's identity;
- a header the customer's own server sets (``X-AuthUser``, ``X-PHP-Script``),
  read at DATA by checks/data_identity.py from the accounts listed in
  ``[identity] trusted_accounts`` only. The configured fields are removed
  from every relayed copy, whoever sent them (delivery/finalize.py).

Identities are lower-cased and limited to letters, digits and ``. _ @ + - /
~`` (header values are normalized to that), at most ``max_length``
characters: one site cannot dodge its limit by changing case, and nothing a
client sends reaches a key, a log line or a header unchecked.

The transaction log carries the identity in clear; the relayed copy carries
only :func:`opaque` (a keyed hash), so a recipient cannot read the customer's
site names while an abuse report (the trace id, or the hash itself) leads
back to it.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from dataclasses import dataclass, field

from ..core.address import AddressError, parse_domain

log = logging.getLogger("gateway.accounts")

# An account name (accounts/store.py _NAME) never contains "/": the separator
# is unambiguous.
SEPARATOR = "/"
_ACCOUNT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}\Z")
_FIELD = re.compile(r"[!-9;-~]{1,76}\Z")      # RFC 5322 ftext
_SAFE = re.compile(r"[a-z0-9._@+~/-]+\Z")
_UNSAFE = re.compile(r"[^a-z0-9._@+~/-]+")


@dataclass(frozen=True)
class IdentitySettings:
    """``[identity]``. ``headers``: the fields a customer's server may set to
    name the end user, in order of preference; removed from every relayed
    copy. ``trusted_accounts``: the accounts whose header is believed (for
    every other account the field is removed and ignored). ``max_length``:
    the longest identity kept (a longer sub-login is refused, a longer
    header value cut). ``secret``: the key of the opaque identity in the
    Received header ("env:NAME" reads it from the environment); empty: the
    registry's secret, else one made at start (then hashes change with each
    restart, the log still maps them)."""
    headers: list[str] = field(default_factory=lambda: ["X-AuthUser", "X-PHP-Script", "X-PHP-Originating-Script"])
    trusted_accounts: list[str] = field(default_factory=list)
    max_length: int = 64
    secret: str = ""

    def __post_init__(self) -> None:
        for name in self.headers:
            if not isinstance(name, str) or not _FIELD.match(name):
                raise ValueError(f"headers: {name!r} is not a header field name")
        if {h.lower() for h in self.headers} & {"received", "from", "to", "date", "message-id", "subject"}:
            raise ValueError("headers: a standard field cannot be an identity header (it would be removed)")
        for name in self.trusted_accounts:
            if not isinstance(name, str) or not _ACCOUNT.match(name):
                raise ValueError(f"trusted_accounts: {name!r} is not an account name")
        if self.trusted_accounts and not self.headers:
            raise ValueError("trusted_accounts: no identity header is configured ([identity] headers)")
        if not 1 <= self.max_length <= 255:
            raise ValueError(f"max_length: must be within 1..255, got {self.max_length}")

    @property
    def field_names(self) -> frozenset[str]:
        return frozenset(h.lower() for h in self.headers)


class IdentityError(ValueError):
    """A sub-login whose identity part is not acceptable (says why)."""


def split_login(login: str, max_length: int = 64) -> tuple[str, str | None]:
    """(account name, identity or None) of an AUTH login. Raises IdentityError
    for ``account/`` with an empty, over-long or unsafe identity."""
    account, sep, user = login.partition(SEPARATOR)
    if not sep:
        return login, None
    ident = user.lower()
    if not ident:
        raise IdentityError("empty identity after the account name")
    if len(ident) > max_length:
        raise IdentityError(f"identity longer than {max_length} characters")
    if not _SAFE.match(ident):
        raise IdentityError("identity may hold letters, digits and . _ @ + ~ / - only")
    return account, ident


def from_header(value: str, max_length: int = 64) -> str | None:
    """A stable identity from a header value, or None when nothing usable is left.

    ``X-PHP-Script: example.com/wp-content/plugins/x.php for 1.2.3.4`` (PHP's
    mail.add_x_header) becomes ``example.com/wp-content/plugins/x.php``: the
    client address after `` for `` changes with every visitor and is dropped,
    as is a query string. Anything else unsafe becomes ``_``."""
    text = " ".join(value.split()).strip()
    if " for " in text:
        text = text.rsplit(" for ", 1)[0]
    text = text.split("?", 1)[0].split("#", 1)[0].strip().lower()
    host, slash, path = text.partition("/")
    if host:
        try:
            host = parse_domain(host, utf8=True).lower()
        except AddressError:
            pass
    text = _UNSAFE.sub("_", (host + slash + path)).strip("_/")
    text = text[:max_length].rstrip("_/")
    return text or None


def identity_secret(settings: IdentitySettings, registry_key: bytes | None) -> bytes:
    """The HMAC key of :func:`opaque`: ``[identity] secret``, else the
    registry's secret, else one made now (hashes then differ per process and
    restart; the transaction log still names the identity)."""
    if settings.secret:
        return settings.secret.encode("utf-8")
    if registry_key:
        # a key of its own, derived: a hash in a header says nothing of the registry's
        return hmac.new(registry_key, b"gateway identity trace", hashlib.sha256).digest()
    log.info("[identity] secret and [registry] secret are not set: the opaque identity in the Received header "
             "changes with each restart (the transaction log names the identity in clear)")
    return secrets.token_bytes(32)


def opaque(key: bytes, account: str, identity: str) -> str:
    """What the relayed copy says of the identity: 16 hex digits of an
    HMAC-SHA256 over ``account/identity`` (recompute it from the log to match
    an abuse report)."""
    mac = hmac.new(key, f"{account}{SEPARATOR}{identity}".encode("utf-8", "surrogateescape"), hashlib.sha256)
    return mac.hexdigest()[:16]
