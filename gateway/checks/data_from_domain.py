"""P-DOM: the header From domain must exist in DNS (MX, or A/AAAA as implicit
MX; not a null MX), like the MAIL FROM domain at MAIL. Unparseable From
headers are the header check's business (data_headers runs first).
Forwarded mail (gateway/forwarding.py) is skipped: its From is the author's,
and the message is relayed unchanged."""
from __future__ import annotations

from typing import Any

from ..dns.domain import DomainStatus, check_domain_exists, reply_for
from ..dns.resolver import Resolver
from ..dns.settings import DomainSettings
from ..forwarding import forwarded
from ..message.parse import HeaderSyntaxError, parse_address_list, parsed_for
from ..core.transaction import Outcome, Phase
from . import contract
from .contract import CheckSpec


class DataFromDomain:
    name = "data_from_domain"
    phase = Phase.DATA

    def __init__(self, resolver: Resolver, settings: DomainSettings):
        self.resolver = resolver
        self.settings = settings

    async def run(self, tx: Any, item: Any = None) -> Outcome:
        if not (self.settings.enabled and self.settings.check_header_from):
            return Outcome.skip(self.name, "disabled")
        if tx.message is None:
            return Outcome.skip(self.name, "no message")
        if forwarded(tx) is not None:
            return Outcome.skip(self.name, "forwarded: the From is the author's")
        value = parsed_for(tx).get("from")
        if value is None:
            return Outcome.skip(self.name, "no From header")
        try:
            mailboxes = parse_address_list(value)
        except HeaderSyntaxError:
            return Outcome.skip(self.name, "From does not parse")
        seen: set[str] = set()
        for mb in mailboxes:
            domain = mb.domain_lower
            if not domain or domain in seen or domain.startswith("["):
                continue
            seen.add(domain)
            verdict = await check_domain_exists(self.resolver, domain, self.settings)
            if verdict.exists:
                continue
            reply = reply_for(verdict, header=True)
            assert reply is not None   # None only for a domain that exists
            detail = f"header From {verdict.domain}: {verdict.detail}"
            if verdict.status is DomainStatus.TEMPFAIL:
                return Outcome.error(self.name, detail, reply)
            return Outcome.refuse(self.name, reply.with_detail(verdict.domain), detail)
        return Outcome.ok(self.name, ", ".join(sorted(seen)))


def build(services: Any) -> DataFromDomain:
    return DataFromDomain(services.resolver, services.config.domains)


SPEC = CheckSpec(
    name='data_from_domain', phase=Phase.DATA, build=build,
    summary='P-DOM: the header From domain exists in DNS',
    position=50,
    replies=('HEADER_FROM_DOMAIN_NOT_FOUND', 'HEADER_FROM_DOMAIN_NO_MAIL', 'HEADER_FROM_NULL_MX', 'DNS_TEMPFAIL'),
    settings=('domains',),
    services=('resolver',),
    reads=('forwarding', 'parsed_headers'),
    requires=('data_headers',),
    deadline=contract.DNS)
