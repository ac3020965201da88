"""P-RELAY: no open relay.

Only an authenticated account (SMTP AUTH, or a client network of the account)
may relay. An unauthenticated client may reach the gateway's own service
mailboxes and nothing else; those are matched on the exact parsed address,
so a trick aimed at them (``postmaster%evil@gw``, ``"a@evil"@gw``, a source
route via the gateway) never routes anywhere else: the parser refuses those
forms for everybody before this check runs. Address literals are refused
unless the operator allows them.
"""
from __future__ import annotations

from ..smtp import replies
from ..smtp.address import AddressError, parse_mailbox
from ..smtp.transaction import Outcome, Phase


class RcptRelay:
    name = "rcpt_relay"
    phase = Phase.RCPT

    def __init__(self, service_mailboxes: frozenset[str], allow_literals: bool):
        self.service_mailboxes = service_mailboxes
        self.allow_literals = allow_literals

    async def run(self, tx, item=None) -> Outcome:
        address = item
        if address.is_literal and not self.allow_literals:
            return Outcome.refuse(self.name, replies.RELAY_TRICK, "address literal")
        if address.normalized.lower() in self.service_mailboxes:
            tx.extra.setdefault("local_rcpts", set()).add(address.normalized.lower())
            return Outcome.ok(self.name, "gateway service mailbox")
        if tx.session.account is None:
            return Outcome.refuse(self.name, replies.RELAY_DENIED, "client not authenticated")
        return Outcome.ok(self.name, f"account {tx.session.account.name}")


def normalize_service_mailboxes(mailboxes: list[str]) -> frozenset[str]:
    out = set()
    for m in mailboxes:
        try:
            out.add(parse_mailbox(m, utf8=True).normalized.lower())
        except AddressError as exc:
            raise ValueError(f"service mailbox {m!r}: {exc.detail}") from None
    return frozenset(out)


def build(services) -> RcptRelay:
    s = services.config.smtp
    return RcptRelay(normalize_service_mailboxes(s.service_mailboxes), s.allow_address_literals)
