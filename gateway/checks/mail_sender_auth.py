"""mail.sender_auth: the MAIL FROM domain must be the account's (P-FORGE).

An account may send as its authorized sender domains only: verified by the
DNS TXT proof (``gateway account domain verify``) or approved by an operator;
subdomains of them only when the account allows subdomains. A pending domain
(token issued, proof not seen) is refused like a foreign one, with a detail
that says what is missing.

The null reverse-path passes here but marks the transaction
(``tx.extra["null_sender"]``): ``data_sender_auth`` then lets the message
through only if it is a DSN or an MDN. Sessions without an account are
skipped: the relay check refuses their recipients anyway, and service
mailboxes (abuse@, postmaster@) take mail from anyone.

:func:`authorize` is the pure rule; the header check uses it too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..accounts.model import Account, SenderDomain
from ..smtp import replies
from ..smtp.address import AddressError, parse_domain
from ..smtp.transaction import Outcome, Phase


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


class MailSenderAuth:
    name = "mail_sender_auth"
    phase = Phase.MAIL

    def __init__(self, accounts: Any):
        self.accounts = accounts

    async def run(self, tx: Any, item: Any = None) -> Outcome:
        addr = item if item is not None else tx.mail_from
        acc = tx.session.account
        if acc is None:
            return Outcome.skip(self.name, "not authenticated")
        if addr is None:
            return Outcome.skip(self.name, "no sender")
        # The snapshot follows the database within a second: a revoked proof
        # counts from the next MAIL on, not from the next login.
        account = self.accounts.cached(acc.name) or acc
        if addr.is_null:
            tx.extra["null_sender"] = True
            return Outcome.ok(self.name, "null sender: the message must be a DSN or MDN")
        if addr.is_literal:
            detail = f"{addr.domain}: an address literal is not a sender domain"
            return Outcome.refuse(self.name, replies.SENDER_NOT_AUTHORIZED, detail)
        verdict = authorize(account, addr.domain_ascii)
        if verdict.allowed:
            return Outcome.ok(self.name, f"{verdict.domain}: {verdict.reason}")
        return Outcome.refuse(self.name, replies.SENDER_NOT_AUTHORIZED, verdict.reason)


def build(services: Any) -> MailSenderAuth:
    return MailSenderAuth(services.accounts)
