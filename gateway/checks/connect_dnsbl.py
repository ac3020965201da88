"""DNSBL / DNSWL verdict on the connecting address (P-BLOCK).

``decide_at = "connect"``: :class:`ConnectDnsbl` decides when the client
connects (postscreen style). ``decide_at = "mail"``: the connect check only
starts the lookups (warming the cache) and :class:`MailDnsbl` decides at MAIL
FROM, when an SMTP-AUTH account is known and can be exempted or told the
reason in a session it can read.
"""
from __future__ import annotations

import ipaddress
from typing import Any

from ..dns.dnsbl import Dnsbl, DnsblVerdict, IPAddress, peer_address
from ..dns.settings import DnsblSettings
from ..core import replies
from ..core.transaction import Outcome, Phase, SessionInfo
from . import contract
from .contract import CheckSpec


def _peer(session: SessionInfo) -> IPAddress | None:
    """The session's peer as the DNSBL sees it (parsed once per check run), or None."""
    try:
        return peer_address(session.peer_ip)
    except ValueError:
        return None


def outcome_for(check: str, verdict: DnsblVerdict) -> Outcome:
    if verdict.listed:
        return Outcome.refuse(check, replies.DNSBL_LISTED.with_detail(verdict.reply_detail()),
                              verdict.log_detail())
    if verdict.tempfail:
        return Outcome.error(check, verdict.log_detail(), replies.DNSBL_TEMPFAIL)
    if verdict.errors:  # on_error = open: could not fully decide, mail goes on
        return Outcome.error(check, "fail open: " + verdict.log_detail())
    return Outcome.ok(check, verdict.log_detail())


class _DnsblCheck:
    name = "dnsbl"
    phase = Phase.CONNECT

    def __init__(self, dnsbl: Dnsbl, settings: DnsblSettings):
        self.dnsbl = dnsbl
        self.settings = settings
        # parsed once (DnsblSettings has validated them), not on every connection
        self.exempt_networks = tuple(ipaddress.ip_network(n, strict=False) for n in settings.exempt_networks)

    def exemption(self, session: SessionInfo, ip: IPAddress | None) -> str | None:
        """Why this session is not checked, or None. ``ip``: the parsed peer (None: not an IP)."""
        if self.settings.exempt_authenticated and session.account is not None:
            return f"exempt: {session.auth_method or 'authenticated'}"
        if ip is not None:
            for net in self.exempt_networks:
                if net.version == ip.version and ip in net:
                    return "exempt: client network"
        return None

    async def _decide(self, session: SessionInfo) -> Outcome:
        ip = _peer(session)
        why = self.exemption(session, ip)
        if why is not None:
            return Outcome.skip(self.name, why)
        if ip is None:
            return Outcome.skip(self.name, "peer address is not an IP address")
        verdict = await self.dnsbl.check(ip)
        return outcome_for(self.name, verdict)


class ConnectDnsbl(_DnsblCheck):
    name = "connect_dnsbl"
    phase = Phase.CONNECT

    async def run(self, tx: SessionInfo, item: Any = None) -> Outcome:
        if not self.settings.zones:
            return Outcome.skip(self.name, "no zones configured")
        if self.settings.decide_at == "mail":
            ip = _peer(tx)
            if ip is not None and self.exemption(tx, ip) is None:
                self.dnsbl.prefetch(ip)
            return Outcome.skip(self.name, "decided at MAIL")
        return await self._decide(tx)


class MailDnsbl(_DnsblCheck):
    name = "mail_dnsbl"
    phase = Phase.MAIL

    async def run(self, tx: Any, item: Any = None) -> Outcome:
        if not self.settings.zones:
            return Outcome.skip(self.name, "no zones configured")
        if self.settings.decide_at != "mail":
            return Outcome.skip(self.name, "decided at connect")
        return await self._decide(tx.session)


def _dnsbl(services: Any) -> Dnsbl:
    dnsbl = getattr(services, "dnsbl", None)
    return dnsbl if dnsbl is not None else Dnsbl(services.config.dnsbl, services.resolver)


def build(services: Any) -> ConnectDnsbl:
    return ConnectDnsbl(_dnsbl(services), services.config.dnsbl)


def build_mail(services: Any) -> MailDnsbl:
    """The MAIL-phase half (register it as "mail_dnsbl" in the MAIL phase)."""
    return MailDnsbl(_dnsbl(services), services.config.dnsbl)


SPEC = CheckSpec(
    name='connect_dnsbl', phase=Phase.CONNECT, build=build,
    summary='P-BLOCK: DNSBL/DNSWL verdict on the client address ([dnsbl] decide_at = "connect")',
    position=30,
    replies=('DNSBL_LISTED', 'DNSBL_TEMPFAIL'),
    settings=('dnsbl',),
    services=('dnsbl', 'resolver'),
    deadline=contract.DNS)
