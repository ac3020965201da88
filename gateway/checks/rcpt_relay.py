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
from ..smtp.address import parse_mailbox
from ..smtp.transaction import Outcome, Phase


class RcptRelay:
    name = "rcpt_relay"
    phase = Phase.RCPT

    def __init__(self, service_mailboxes: frozenset[str], allow_literals: bool, unsubscribe_address: str = ""):
        self.service_mailboxes = service_mailboxes
        self.allow_literals = allow_literals
        # local@domain of the list unsubscribe mailto: address; mail to
        # local+TOKEN@domain opts out (RFC 2369 mailto: List-Unsubscribe).
        local, _, domain = unsubscribe_address.lower().rpartition("@")
        self.unsubscribe = (local, domain) if unsubscribe_address else None

    async def run(self, tx, item=None) -> Outcome:
        address = item
        if address.is_literal and not self.allow_literals:
            return Outcome.refuse(self.name, replies.RELAY_TRICK, "address literal")
        key = address.normalized.lower()
        if key in self.service_mailboxes:
            tx.extra.setdefault("local_rcpts", {})[key] = "service"
            return Outcome.ok(self.name, "gateway service mailbox")
        if self.unsubscribe is not None and not address.is_literal:
            base, plus, _token = address.local.lower().partition("+")
            if (base, address.domain_ascii) == self.unsubscribe:
                tx.extra.setdefault("local_rcpts", {})[key] = "unsubscribe"
                return Outcome.ok(self.name, "list unsubscribe address")
        if tx.session.account is None:
            return Outcome.refuse(self.name, replies.RELAY_DENIED, "client not authenticated")
        return Outcome.ok(self.name, f"account {tx.session.account.name}")


def normalize_service_mailboxes(mailboxes: list[str]) -> frozenset[str]:
    """The comparison forms of ``smtp.service_mailboxes``. The config validates them
    (``SmtpSettings``: an error names the file, the key and the address), so each parses."""
    return frozenset(parse_mailbox(m, utf8=True).normalized.lower() for m in mailboxes)


def build(services) -> RcptRelay:
    s = services.config.smtp
    return RcptRelay(normalize_service_mailboxes(s.service_mailboxes), s.allow_address_literals,
                     services.config.registry.mailto_address)
