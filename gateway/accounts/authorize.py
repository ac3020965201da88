"""May an account send as a domain? The pure rule of P-FORGE.

An account may send as its authorized sender domains only: verified by the
DNS TXT proof or approved by an operator; subdomains of them only when the
account allows subdomains. Used by the MAIL and DATA sender checks, the
forwarding rule and the account store; it knows nothing of SMTP.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..core.address import AddressError, parse_domain
from .model import Account, SenderDomain


@dataclass(frozen=True, slots=True)
class DomainAuth:
    allowed: bool
    domain: str                       # the domain asked about (lower-case A-label)
    via: SenderDomain | None = None   # the sender domain that allows it, or the pending one
    reason: str = ""


def ascii_domain(domain: str) -> str | None:
    """Lower-case A-label of a header or envelope domain; None if it is not a domain name."""
    if not domain or domain.startswith("["):
        return None
    try:
        return parse_domain(domain, utf8=True)
    except AddressError:
        return None


def authorize(account: Account, domain: str) -> DomainAuth:
    """May ``account`` send as ``domain`` (a lower-case A-label)?"""
    domain = domain.lower().rstrip(".")
    pending: SenderDomain | None = None
    parent: SenderDomain | None = None
    for d in account.domains:
        if d.domain == domain:
            if d.authorized:
                return DomainAuth(True, domain, d, f"{d.status} sender domain")
            pending = pending or d
        elif domain.endswith("." + d.domain):
            if not account.allow_subdomains:
                parent = parent or d
            elif d.authorized:
                return DomainAuth(True, domain, d, f"subdomain of {d.status} sender domain {d.domain}")
            else:
                pending = pending or d
    if pending is not None:
        return DomainAuth(False, domain, pending,
                          f"{domain} awaits its DNS proof (TXT record at _gateway-proof.{pending.domain}, "
                          f"then 'gateway account domain verify')")
    if parent is not None:
        return DomainAuth(False, domain, parent,
                          f"{domain}: this account may not send from subdomains of {parent.domain}")
    return DomainAuth(False, domain, None, f"{domain} is not a sender domain of this account")
