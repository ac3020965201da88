"""P-RELAY: no open relay.

Only an authenticated account (SMTP AUTH, or a client network of the account)
may relay. An unauthenticated client may reach the gateway's own service
mailboxes and nothing else; those are matched on the exact parsed address,
so a trick aimed at them (``postmaster%evil@gw``, ``"a@evil"@gw``, a source
route via the gateway) never routes anywhere else: the parser refuses those
forms for everybody before this check runs. Address literals are refused
unless the operator allows them.

SRS bounces (docs/forwarding.md): at the gateway's SRS domain
(``[forwarding] srs_domain``) anyone may reach a valid, unexpired SRS
address, which is relayed to the original sender it decodes to; the null
reverse-path only (unless ``accept_non_null_bounces``), and in a transaction
of SRS recipients only. Every other address of that domain is refused: it is
no open relay.
"""
from __future__ import annotations

from ..forwarding import Srs, SrsError, quote_local, unquote_local
from ..core import replies
from ..core.address import AddressError, parse_mailbox
from ..core.transaction import ForwardingDecision, Outcome, Phase
from .contract import CheckSpec

_SRS_REPLIES = {"hash": replies.SRS_BAD_HASH, "expired": replies.SRS_EXPIRED}


class RcptRelay:
    name = "rcpt_relay"
    phase = Phase.RCPT

    def __init__(self, service_mailboxes: frozenset[str], allow_literals: bool, unsubscribe_address: str = "",
                 srs: Srs | None = None, accept_non_null_bounces: bool = False):
        self.service_mailboxes = service_mailboxes
        self.allow_literals = allow_literals
        self.srs = srs
        self.accept_non_null_bounces = accept_non_null_bounces
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
            tx.local_rcpts[key] = "service"
            return Outcome.ok(self.name, "gateway service mailbox")
        if self.unsubscribe is not None and not address.is_literal:
            base, plus, _token = address.local.lower().partition("+")
            if (base, address.domain_ascii) == self.unsubscribe:
                tx.local_rcpts[key] = "unsubscribe"
                return Outcome.ok(self.name, "list unsubscribe address")
        if self.srs is not None and not address.is_literal and self.srs.owns(address.domain_ascii):
            return self._srs_bounce(self.srs, tx, address, key)
        if tx.forwarding is not None and tx.forwarding.kind == "bounce":
            return Outcome.refuse(self.name, replies.SRS_SEPARATE, "this transaction carries an SRS bounce")
        if tx.session.account is None:
            return Outcome.refuse(self.name, replies.RELAY_DENIED, "client not authenticated")
        return Outcome.ok(self.name, f"account {tx.session.account.name}")

    def _srs_bounce(self, srs: Srs, tx, address, key: str) -> Outcome:
        try:
            local, domain = srs.reverse(unquote_local(address.local))
        except SrsError as exc:
            return Outcome.refuse(self.name, _SRS_REPLIES.get(exc.kind, replies.SRS_NOT_SRS), exc.detail)
        try:
            target = parse_mailbox(f"{quote_local(local)}@{domain}", utf8=True)
        except AddressError as exc:
            return Outcome.refuse(self.name, replies.SRS_NOT_SRS, f"decodes to an invalid address ({exc.detail})")
        if target.is_literal or srs.owns(target.domain_ascii):
            return Outcome.refuse(self.name, replies.SRS_NOT_SRS, "decodes to an address of the SRS domain itself")
        if not tx.mail_from.is_null and not self.accept_non_null_bounces:
            return Outcome.refuse(self.name, replies.SRS_BOUNCES_ONLY, f"MAIL FROM <{tx.mail_from.addr}>")
        if any(not r.local and r.relay_to is None for r in tx.recipients):
            return Outcome.refuse(self.name, replies.SRS_SEPARATE, "this transaction has other recipients")
        tx.srs_rcpts[key] = target.addr
        if tx.forwarding is None or tx.forwarding.kind != "bounce":
            # Also replaces an account's own-envelope forwarding decision: the
            # message is a bounce to the original sender, nothing else.
            tx.forwarding = ForwardingDecision("bounce", original=address.addr, rewrite=target.addr, state="bounce")
        return Outcome.ok(self.name, f"SRS bounce to {target.addr}")


def normalize_service_mailboxes(mailboxes: list[str]) -> frozenset[str]:
    """The comparison forms of ``smtp.service_mailboxes``. The config validates them
    (``SmtpSettings``: an error names the file, the key and the address), so each parses."""
    return frozenset(parse_mailbox(m, utf8=True).normalized.lower() for m in mailboxes)


def build(services) -> RcptRelay:
    s = services.config.smtp
    fwd = services.config.forwarding
    return RcptRelay(normalize_service_mailboxes(s.service_mailboxes), s.allow_address_literals,
                     services.config.registry.mailto_address, Srs.from_settings(fwd, services.clock),
                     fwd.accept_non_null_bounces)


SPEC = CheckSpec(
    name='rcpt_relay', phase=Phase.RCPT, build=build,
    summary='P-RELAY: no open relay',
    position=10,
    replies=('RELAY_DENIED', 'RELAY_TRICK', 'SRS_NOT_SRS', 'SRS_BAD_HASH', 'SRS_EXPIRED', 'SRS_BOUNCES_ONLY',
             'SRS_SEPARATE'),
    settings=('smtp.service_mailboxes', 'smtp.allow_address_literals', 'registry.mailto_address', 'forwarding'),
    services=('clock',),
    provides=('local_rcpts', 'srs_rcpts', 'forwarding'),
    reads=('forwarding',),
    mandatory=True)
