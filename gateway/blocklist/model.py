"""Block-list entries: kinds, normalization and validation (no I/O).

Three kinds, each stored in one canonical form so that a value is unique
however the operator wrote it:

- ``ip``: a network in CIDR form (``ipaddress.ip_network(strict=False)``);
  a single address becomes ``/32`` or ``/128``. IPv4-mapped IPv6 networks
  (``::ffff:192.0.2.0/120``) are stored as the IPv4 network they mean.
- ``domain``: a sender (MAIL FROM) domain as a lower-case A-label; it also
  matches every subdomain.
- ``hostname``: a HELO/EHLO or reverse-DNS host name; ``mx.bad.example``
  matches that name only, ``.bad.example`` (or ``*.bad.example``) every name
  below ``bad.example`` but not ``bad.example`` itself.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from ..core.address import AddressError, parse_domain

KINDS = ("ip", "domain", "hostname")
MAX_REASON = 255
MAX_CREATED_BY = 128

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_V4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


class BlockError(Exception):
    """A block-list request that cannot be done; names the field and the problem."""

    status = 400
    code = "error"

    def __init__(self, reason: str, field: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}" if self.field else self.reason


class Invalid(BlockError):
    status = 422
    code = "invalid"


class NotFound(BlockError):
    status = 404
    code = "not_found"


class Conflict(BlockError):
    status = 409
    code = "exists"


@dataclass(frozen=True, slots=True)
class BlockEntry:
    kind: str
    value: str
    reason: str = ""
    created_by: str = ""
    created_at: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value, "reason": self.reason,
                "created_by": self.created_by, "created_at": self.created_at}

    def log_detail(self, subject: str) -> str:
        """For the ledger / transaction log only (the reason is the operator's, never sent to clients)."""
        text = f"{subject} matches {self.kind} entry {self.value}"
        if self.reason:
            text += f"; reason: {self.reason}"
        if self.created_by:
            text += f"; by {self.created_by}"
        return text


def check_kind(kind: Any) -> str:
    if not isinstance(kind, str) or kind not in KINDS:
        raise Invalid(f"must be one of {', '.join(KINDS)}, not {kind!r}", "kind")
    return kind


def plain_address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address an entry is matched against (IPv4-mapped IPv6 -> IPv4); raises ValueError."""
    addr = ipaddress.ip_address(ip)
    if addr.version == 6 and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def normalize_network(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):  # an address literal as written in SMTP
        text = text[1:-1]
    if text.lower().startswith("ipv6:"):
        text = text[5:]
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise Invalid(f"{value!r} is not an IP address or CIDR network", "value") from None
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96 and net.subnet_of(_V4_MAPPED):
        net = ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
    if net.prefixlen == 0:
        raise Invalid(f"{value!r} would block every IPv{net.version} address", "value")
    return net


def _domain(text: str, value: str, what: str) -> str:
    if text.endswith("."):
        text = text[:-1]  # a fully qualified name as written in a zone file
    try:
        return parse_domain(text, utf8=True)
    except AddressError as exc:
        hint = ""
        if "numeric" in exc.detail:
            hint = " (an IP address? use kind ip)"
        raise Invalid(f"{value!r} is not a valid {what}: {exc.detail}{hint}", "value") from None


def normalize(kind: str, value: Any) -> str:
    """The canonical stored form of ``value`` for ``kind``; raises :class:`Invalid`."""
    check_kind(kind)
    if not isinstance(value, str) or not value.strip():
        raise Invalid("must be a non-empty string", "value")
    text = value.strip()
    if len(text) > 255:
        raise Invalid("at most 255 characters", "value")
    if kind == "ip":
        return str(normalize_network(text))
    if kind == "domain":
        if "@" in text:
            raise Invalid(f"{value!r} is an address; block its domain", "value")
        if text.startswith(".") or text.startswith("*."):
            raise Invalid(f"{value!r}: a domain entry matches its subdomains already; "
                          f"write {text.lstrip('*.')!r}", "value")
        return _domain(text, value, "domain")
    # hostname: exact name, or a suffix written as ".bad.example" / "*.bad.example"
    suffix = False
    if text.startswith("*."):
        text, suffix = text[2:], True
    elif text.startswith("."):
        text, suffix = text[1:], True
    name = _domain(text, value, "host name")
    return "." + name if suffix else name


def clean_text(value: Any, field: str, limit: int) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise Invalid("must be a string", field)
    text = _CONTROL.sub(" ", value).strip()
    if len(text) > limit:
        raise Invalid(f"at most {limit} characters", field)
    return text
