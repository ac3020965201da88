"""MAIL FROM domain must exist and take mail (P-DOM).

NXDOMAIN or no usable mail host: 550 5.1.8; null MX: 550 5.7.27 (RFC 7505);
DNS failure or timeout: 451 4.4.3. The null reverse-path (bounces) and
address literals are not looked up.
"""
from __future__ import annotations

from typing import Any

from ..dns.domain import DomainStatus, check_domain_exists, reply_for
from ..dns.resolver import Resolver
from ..dns.settings import DomainSettings
from ..core.transaction import Outcome, Phase
from . import contract
from .contract import CheckSpec



class MailDomainExists:
    name = "mail_domain_exists"
    phase = Phase.MAIL

    def __init__(self, resolver: Resolver, settings: DomainSettings):
        self.resolver = resolver
        self.settings = settings

    async def run(self, tx: Any, item: Any = None) -> Outcome:
        addr = item if item is not None else tx.mail_from
        if not self.settings.enabled:
            return Outcome.skip(self.name, "disabled")
        if addr is None or addr.is_null:
            return Outcome.skip(self.name, "null sender")
        if addr.is_literal:
            return Outcome.skip(self.name, "address literal")
        verdict = await check_domain_exists(self.resolver, addr.domain_ascii or addr.domain, self.settings)
        detail = f"{verdict.domain}: {verdict.detail}"
        if verdict.exists:
            return Outcome.ok(self.name, detail)
        reply = reply_for(verdict)
        assert reply is not None
        if verdict.status is DomainStatus.TEMPFAIL:
            return Outcome.error(self.name, detail, reply)
        return Outcome.refuse(self.name, reply.with_detail(verdict.domain), detail)


def build(services: Any) -> MailDomainExists:
    return MailDomainExists(services.resolver, services.config.domains)


SPEC = CheckSpec(
    name='mail_domain_exists', phase=Phase.MAIL, build=build,
    summary='P-DOM: the MAIL FROM domain exists in DNS',
    position=60,
    replies=('DOMAIN_NOT_FOUND', 'DOMAIN_NO_MAIL', 'NULL_MX', 'DNS_TEMPFAIL'),
    settings=('domains',),
    services=('resolver',),
    deadline=contract.DNS)
