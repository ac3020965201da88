"""Operator block lists on the connecting client (P-BLOCK): its IP address
against the IP/CIDR entries, then its reverse-DNS names against the host-name
entries.

The PTR lookup is made only when host-name entries exist, through the shared
cached resolver; a failed or empty lookup only means the host-name entries
cannot match. The PTR is not forward-confirmed: only the owner of the address
controls it, so a name there can only get that owner blocked.
"""
from __future__ import annotations

from typing import Any

from ..blocklist.model import plain_address
from ..core import replies
from ..core.transaction import Outcome, Phase, SessionInfo
from . import contract
from .contract import CheckSpec


class ConnectBlocklist:
    name = "connect_blocklist"
    phase = Phase.CONNECT

    def __init__(self, blocklist: Any, resolver: Any):
        self.blocklist = blocklist
        self.resolver = resolver

    async def run(self, tx: SessionInfo, item: Any = None) -> Outcome:
        if self.blocklist is None:
            return Outcome.skip(self.name, "block lists not loaded")
        snap = self.blocklist.snapshot
        try:
            addr = plain_address(tx.peer_ip)
        except ValueError:
            return Outcome.skip(self.name, "peer address is not an IP address")
        hit = snap.match_address(addr)
        if hit is not None:
            return Outcome.refuse(self.name, replies.BLOCKED_CLIENT.with_detail(f"{addr} ({hit.value})"),
                                  hit.log_detail(f"client {addr}"))
        if not snap.has_hostnames:
            return Outcome.ok(self.name, "address not listed")
        if self.resolver is None:
            return Outcome.ok(self.name, "address not listed; no resolver for reverse DNS")
        answer = await self.resolver.query(addr.reverse_pointer, "PTR")
        if not answer.ok:
            return Outcome.ok(self.name, f"address not listed; reverse DNS {answer.status.value}, "
                                         "host-name entries not checked")
        for host in answer.records:
            hit = snap.match_hostname(host)
            if hit is not None:
                return Outcome.refuse(self.name,
                                      replies.BLOCKED_CLIENT_HOST.with_detail(f"{host} ({hit.value})"),
                                      hit.log_detail(f"client {addr} reverse DNS {host}"))
        return Outcome.ok(self.name, f"address and reverse DNS ({', '.join(answer.records)}) not listed")


def build(services: Any) -> ConnectBlocklist:
    return ConnectBlocklist(getattr(services, "blocklist", None), getattr(services, "resolver", None))


SPEC = CheckSpec(
    name='connect_blocklist', phase=Phase.CONNECT, build=build,
    summary='P-BLOCK: operator block lists on the client address and its reverse DNS',
    position=20,
    replies=('BLOCKED_CLIENT', 'BLOCKED_CLIENT_HOST'),
    services=('blocklist', 'resolver'),
    deadline=contract.DNS)
