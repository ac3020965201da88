"""Operator block lists on the MAIL FROM domain (P-BLOCK): an entry blocks
the domain and all its subdomains. The null sender (bounces) and address
literals are not checked here (the client address is, at connect)."""
from __future__ import annotations

from typing import Any

from ..core import replies
from ..core.transaction import Outcome, Phase
from .contract import CheckSpec


class MailBlocklist:
    name = "mail_blocklist"
    phase = Phase.MAIL

    def __init__(self, blocklist: Any):
        self.blocklist = blocklist

    async def run(self, tx: Any, item: Any = None) -> Outcome:
        addr = item if item is not None else tx.mail_from
        if self.blocklist is None:
            return Outcome.skip(self.name, "block lists not loaded")
        if addr is None or addr.is_null:
            return Outcome.skip(self.name, "null sender")
        if addr.is_literal:
            return Outcome.skip(self.name, "address literal")
        domain = addr.domain_ascii or addr.domain
        hit = self.blocklist.snapshot.match_domain(domain)
        if hit is None:
            return Outcome.ok(self.name)
        return Outcome.refuse(self.name, replies.BLOCKED_SENDER.with_detail(f"{domain} ({hit.value})"),
                              hit.log_detail(f"sender domain {domain}"))


def build(services: Any) -> MailBlocklist:
    return MailBlocklist(getattr(services, "blocklist", None))


SPEC = CheckSpec(
    name='mail_blocklist', phase=Phase.MAIL, build=build,
    summary='P-BLOCK: operator block lists on the MAIL FROM domain',
    position=40,
    replies=('BLOCKED_SENDER',),
    services=('blocklist',))
