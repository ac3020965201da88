"""Forwarded mail: the Sender Rewriting Scheme and the recognition rule.

A hosting customer's MTA forwards inbound mail (cPanel/Plesk forwarders,
``.forward``, Sieve ``redirect``, Postfix virtual aliases to an outside
address) through the gateway. Such a message is a third party's: its From,
list headers and DKIM signatures are the author's, so the checks that judge
the *author* (sender authorization, display names, list registration, From
domain) do not apply to it, and it is relayed byte for byte under the
gateway's own trace. Its envelope sender is rewritten with SRS so SPF passes
at the destination; bounces to the SRS address come back through the gateway
and are relayed to the original sender. See docs/forwarding.md.

Everything here is pure (no I/O): :class:`Srs` (SRS0/SRS1 after Shevek's
scheme, as in libsrs2 and Mail::SRS) and :func:`find_evidence` (is this
message forwarded from a mailbox of the account?). The checks and the SMTP
server use them through :func:`forwarded`.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

from .accounts.authorize import ascii_domain, authorize
from .core.address import AddressError, MAX_LOCAL, parse_domain

if TYPE_CHECKING:  # pragma: no cover
    from .accounts.model import Account
    from .message.parse import ParsedHeaders
    from .core.transaction import ForwardingDecision

# ----------------------------------------------------------------------- settings
MIN_SECRET = 16


@dataclass(frozen=True)
class ForwardingSettings:
    """``[forwarding]``: the SRS of forwarded mail (per account: ``gateway account forwarding``)."""

    # Key of the SRS hashes, shared by every gateway that serves the SRS domain
    # (a bounce may come back to any of them). Use "env:NAME". Changing it
    # invalidates the SRS addresses still out there (bounces then get 550).
    srs_secret: str = ""
    # The domain of the rewritten envelope senders; its MX must point at the
    # gateways and its SPF must allow the gateways' outbound addresses. Empty:
    # forwarding with a foreign envelope sender is refused (no SRS).
    srs_domain: str = ""
    srs_max_age_days: int = 21         # how long a bounce to an SRS0 address is taken
    srs_hash_length: int = 6           # base64 characters of the HMAC kept (compared case-insensitively)
    # A message to an SRS address is a bounce: with the null reverse-path only
    # (DSNs, RFC 3834 auto-replies). True also takes a non-null MAIL FROM.
    accept_non_null_bounces: bool = False

    def __post_init__(self) -> None:
        if self.srs_domain:
            try:
                domain = parse_domain(self.srs_domain.strip(), utf8=True)
            except AddressError as exc:
                raise ValueError(f"srs_domain: {self.srs_domain!r} is not a domain name ({exc.detail})") from None
            object.__setattr__(self, "srs_domain", domain)
            if not self.srs_secret:
                raise ValueError("srs_secret: must be set when srs_domain is (e.g. \"env:GATEWAY_SRS_SECRET\", "
                                 "the same on every gateway)")
        if self.srs_secret and len(self.srs_secret) < MIN_SECRET:
            raise ValueError(f"srs_secret: must be at least {MIN_SECRET} characters "
                             "(e.g. 32 random bytes in hex)")
        if not 1 <= self.srs_max_age_days <= 365:
            raise ValueError("srs_max_age_days: must be between 1 and 365")
        if not 4 <= self.srs_hash_length <= 16:
            raise ValueError("srs_hash_length: must be between 4 and 16")

    @property
    def enabled(self) -> bool:
        return bool(self.srs_domain)


# ---------------------------------------------------------------------------- SRS
_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_SEPARATORS = "=+-"
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\u0080-\U0010ffff-]+"   # RFC 5322 atext, UTF-8 (RFC 6531)
_DOT_ATOM = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*\Z")


class SrsError(Exception):
    """An address of the SRS domain that is not (or no longer) a valid SRS address."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind        # "syntax" | "hash" | "expired" | "too_long"
        self.detail = detail


def quote_local(local: str) -> str:
    """The local part as it goes on the wire: dot-atom as is, anything else quoted."""
    if _DOT_ATOM.match(local):
        return local
    return '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'


def unquote_local(local: str) -> str:
    """The value of a local part as sent (``"a b"`` -> ``a b``)."""
    if len(local) >= 2 and local[0] == local[-1] == '"':
        return re.sub(r"\\(.)", r"\1", local[1:-1])
    return local


class Srs:
    """SRS0/SRS1 addresses of one SRS domain (Shevek's scheme).

    ``SRS0=HHH=TT=orig.domain=orig-local@srs.domain``: TT is the day number
    mod 1024 in two base32 characters, HHH the first ``hash_length``
    characters of base64(HMAC-SHA1(secret, lower(TT + domain + local))).
    An SRS0 address of another forwarder is not nested but shortened to
    ``SRS1=HHH=first.forwarder==HHH'=TT=orig.domain=orig-local@srs.domain``
    (HHH over the first forwarder's domain and its SRS0 tail), so a bounce
    goes back to the first forwarder, which decodes its own SRS0. Hashes are
    compared case-insensitively: MTAs fold local parts.
    """

    def __init__(self, secret: bytes, domain: str, *, max_age_days: int = 21, hash_length: int = 6,
                 clock: Callable[[], float] = time.time):
        if len(secret) < MIN_SECRET:
            raise ValueError("SRS secret too short")
        self.secret = secret
        self.domain = domain.lower().rstrip(".")
        self.max_age_days = max_age_days
        self.hash_length = hash_length
        self.clock = clock

    @classmethod
    def from_settings(cls, settings: ForwardingSettings, clock: Callable[[], float] = time.time) -> "Srs | None":
        if not settings.enabled:
            return None
        return cls(settings.srs_secret.encode("utf-8"), settings.srs_domain,
                   max_age_days=settings.srs_max_age_days, hash_length=settings.srs_hash_length, clock=clock)

    # -- pieces
    def _hash(self, *parts: str) -> str:
        mac = hmac.new(self.secret, digestmod=hashlib.sha1)
        for part in parts:
            mac.update(part.lower().encode("utf-8", "surrogateescape"))
        return base64.b64encode(mac.digest()).decode("ascii")[:self.hash_length]

    def _hash_ok(self, given: str, *parts: str) -> bool:
        return hmac.compare_digest(given.lower().encode("ascii", "replace"), self._hash(*parts).lower().encode())

    def _today(self) -> int:
        return int(self.clock() // 86400)

    def timestamp(self) -> str:
        day = self._today() % 1024
        return _B32[day >> 5] + _B32[day & 31]

    def _age(self, stamp: str) -> int | None:
        """Days since ``stamp`` (mod 1024), None if it is not two base32 characters."""
        stamp = stamp.upper()
        if len(stamp) != 2 or any(c not in _B32 for c in stamp):
            return None
        then = _B32.index(stamp[0]) << 5 | _B32.index(stamp[1])
        return (self._today() - then) % 1024

    def owns(self, domain: str) -> bool:
        return domain.lower().rstrip(".") == self.domain

    # -- forward: the envelope sender of a forwarded message
    def forward(self, local: str, domain: str) -> str:
        """The SRS address (``local@srs-domain``, local part quoted if needed) for
        the sender ``local@domain`` (``local`` unquoted, ``domain`` an A-label).

        A sender of the SRS domain itself is returned as is. Raises SrsError
        ("too_long") when the local part would exceed 64 octets (RFC 5321
        4.5.3.1.1), which receivers may refuse."""
        domain = domain.lower().rstrip(".")
        if self.owns(domain):
            return f"{quote_local(local)}@{domain}"
        head, sep, tail = local[:4].upper(), local[4:5], local[5:]
        if head == "SRS0" and sep in _SEPARATORS and sep:
            srs_user = sep + tail               # "=HHH=TT=dom=local" of the first forwarder
            new = f"SRS1={self._hash(domain, srs_user)}={domain}={srs_user}"
        elif head == "SRS1" and sep in _SEPARATORS and sep and tail.count("=") >= 2:
            _old_hash, first_hop, srs_user = tail.split("=", 2)
            srs_user = srs_user if srs_user[:1] in _SEPARATORS and srs_user else "=" + srs_user
            new = f"SRS1={self._hash(first_hop, srs_user)}={first_hop}={srs_user}"
        else:
            stamp = self.timestamp()
            new = f"SRS0={self._hash(stamp, domain, local)}={stamp}={domain}={local}"
        wire = quote_local(new)
        if len(wire.encode("utf-8")) > MAX_LOCAL:
            raise SrsError("too_long", f"the SRS local part would be {len(wire.encode('utf-8'))} octets "
                                       f"(more than {MAX_LOCAL})")
        return f"{wire}@{self.domain}"

    # -- reverse: a bounce to an SRS address
    def reverse(self, local: str) -> tuple[str, str]:
        """(local, domain) of the address a bounce to ``local@srs-domain`` goes
        to (``local`` unquoted). SRS0: the original sender; SRS1: the first
        forwarder's SRS0 address. Raises SrsError."""
        head, sep, tail = local[:4].upper(), local[4:5], local[5:]
        if head == "SRS0" and sep and sep in _SEPARATORS:
            parts = tail.split("=", 3)
            if len(parts) != 4 or not all(parts):
                raise SrsError("syntax", "SRS0 address without hash, timestamp, domain and local part")
            given, stamp, domain, orig_local = parts
            if not self._hash_ok(given, stamp, domain, orig_local):
                raise SrsError("hash", "the SRS0 hash does not verify")
            age = self._age(stamp)
            if age is None:
                raise SrsError("syntax", f"SRS0 timestamp {stamp!r} is not two base32 characters")
            if age > self.max_age_days:
                raise SrsError("expired", f"the SRS0 address is {age} days old (at most {self.max_age_days})")
            return orig_local, domain.lower()
        if head == "SRS1" and sep and sep in _SEPARATORS:
            parts = tail.split("=", 2)
            if len(parts) != 3 or not parts[0] or not parts[1] or parts[2][:1] not in _SEPARATORS or not parts[2]:
                raise SrsError("syntax", "SRS1 address without hash, first forwarder and SRS0 part")
            given, first_hop, srs_user = parts
            if not self._hash_ok(given, first_hop, srs_user):
                raise SrsError("hash", "the SRS1 hash does not verify")
            return "SRS0" + srs_user, first_hop.lower()
        raise SrsError("syntax", "not an SRS0 or SRS1 address")


# ------------------------------------------------------------ recognition rule
# Header fields a delivery or forwarding agent writes naming the mailbox the
# message was delivered to (or re-sent from).
EVIDENCE_FIELDS = ("delivered-to", "x-original-to", "x-forwarded-to", "x-forwarded-for",
                   "resent-from", "resent-to")
# The Received fields read for a "for <address>" clause: the topmost ones, i.e.
# the customer's own MX that took the message and up to two internal hops
# above it (content filter, re-injection after alias expansion).
RECEIVED_HOPS = 3
_ADDRESS = re.compile(r"""[^\s<>()\[\],;:"@]+@[^\s<>()\[\],;:"@]+""")
_RECEIVED_FOR = re.compile(r"\bfor\s+<?([^\s<>;]+@[^\s<>;]+?)>?(?=[\s;]|$)", re.I)


@dataclass(frozen=True, slots=True)
class Evidence:
    field: str          # the header field as named in the message
    address: str        # the account's mailbox it names

    def __str__(self) -> str:
        return f"{self.field}: {self.address}"


def addresses_in(value: str) -> list[str]:
    """The addr-specs in a header value (lenient: X-Forwarded-For has two, space-separated)."""
    return [m.group(0).strip(".") for m in _ADDRESS.finditer(value)]


def find_evidence(parsed: "ParsedHeaders", in_scope: Callable[[str], bool]) -> Evidence | None:
    """The first field that shows the message was delivered to a mailbox
    ``in_scope`` accepts and sent on (pure).

    Read, top to bottom: every Delivered-To, X-Original-To, X-Forwarded-To,
    X-Forwarded-For, Resent-From and Resent-To field, then the ``for`` clause of
    the topmost RECEIVED_HOPS Received fields."""
    for name, value in parsed.fields:
        if name.lower() in EVIDENCE_FIELDS:
            for addr in addresses_in(value):
                if in_scope(addr):
                    return Evidence(name, addr)
    hops = 0
    for name, value in parsed.fields:
        if name.lower() != "received":
            continue
        hops += 1
        if hops > RECEIVED_HOPS:
            break
        m = _RECEIVED_FOR.search(value)
        if m and in_scope(m.group(1)):
            return Evidence(f"{name} for", m.group(1))
    return None


def account_scope(account: "Account") -> Callable[[str], bool]:
    """Which addresses count as the account's forwarding mailboxes: any address
    in its authorized domains when the whole account may forward, else only its
    allowed identities (whose domain must still be authorized)."""

    identities = frozenset(account.forward_identities)

    def in_scope(addr: str) -> bool:
        local, _, domain = addr.rpartition("@")
        dom = ascii_domain(domain)
        if not local or dom is None or not authorize(account, dom).allowed:
            return False
        return account.forwarding or f"{local}@{dom}".lower() in identities

    return in_scope


def scope_text(account: "Account") -> str:
    if account.forwarding:
        names = [d.domain for d in account.domains if d.authorized]
        return "an address in " + (", ".join(names) or "the account's sender domains")
    return ", ".join(account.forward_identities)


def missing_evidence(account: "Account") -> str:
    return ("the message carries no forwarding evidence (Delivered-To, X-Original-To, X-Forwarded-To, "
            f"X-Forwarded-For, Resent-From/-To, or a topmost Received ... for <address>) naming "
            f"{scope_text(account)}")


def forwarded(tx: Any) -> "ForwardingDecision | None":
    """The forwarding decision of ``tx`` when its message is forwarded mail or an
    SRS bounce (the author checks skip it), else None. A MAIL-time candidate is
    decided here, once, when the message is there: confirmed with its evidence,
    or not forwarded."""
    fwd = getattr(tx, "forwarding", None)
    if fwd is None:
        return None
    if fwd.kind == "bounce":
        return fwd
    if fwd.state == "candidate" and tx.message is not None:
        from .message.parse import parsed_for

        evidence = find_evidence(parsed_for(tx), account_scope(fwd.account))
        if evidence is None:
            fwd.state = "no-evidence"
        elif fwd.own_envelope and _from_authorized(tx, fwd.account):
            fwd.state = "own-mail"   # the account's own envelope and From: ordinary mail
        else:
            fwd.state = "confirmed"
            fwd.evidence = str(evidence)
    return fwd if fwd.state == "confirmed" else None


def _from_authorized(tx: Any, account: "Account") -> bool:
    from .message.parse import parsed_address_list, parsed_for

    parsed = parsed_for(tx)
    for header in ("from", "sender"):
        for value in parsed.get_all(header):
            boxes, err = parsed_address_list(parsed, value, allow_group=False)
            if err is not None:
                return False
            for box in boxes:
                dom = ascii_domain(box.domain)
                if dom is None or not authorize(account, dom).allowed:
                    return False
    return True


def normalize_identities(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted({v.lower() for v in values}))
