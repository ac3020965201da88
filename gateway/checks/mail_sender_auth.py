"""mail.sender_auth: the MAIL FROM domain must be the account's (P-FORGE).

An account may send as its authorized sender domains only: verified by the
DNS TXT proof (``gateway account domain verify``) or approved by an operator;
subdomains of them only when the account allows subdomains. A pending domain
(token issued, proof not seen) is refused like a foreign one, with a detail
that says what is missing.

An account that may forward (``gateway account forwarding allow``) may also
use a foreign MAIL FROM: the transaction becomes a forwarding *candidate*
(``tx.forwarding``, with the SRS address the upstream gets instead), and at
DATA the message must show that it was delivered to one of the account's
mailboxes and sent on, or it is refused like any foreign sender
(``data_sender_auth``; gateway/forwarding.py, docs/forwarding.md).

The null reverse-path passes here but marks the transaction
(``tx.null_sender``): ``data_sender_auth`` then lets the message
through only if it is a DSN or an MDN. Sessions without an account are
skipped: the relay check refuses their recipients anyway, and service
mailboxes (abuse@, postmaster@) take mail from anyone.

The pure rule is :func:`gateway.accounts.authorize.authorize`; the header
check and the forwarding rule use it too.
"""
from __future__ import annotations

from typing import Any

from ..accounts.authorize import DomainAuth, authorize
from ..accounts.model import Account
from ..forwarding import Srs, SrsError, unquote_local
from ..core import replies
from ..core.transaction import ForwardingDecision, Outcome, Phase
from .contract import CheckSpec


class MailSenderAuth:
    name = "mail_sender_auth"
    phase = Phase.MAIL

    def __init__(self, accounts: Any, srs: Srs | None = None):
        self.accounts = accounts
        self.srs = srs

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
            tx.null_sender = True
            return Outcome.ok(self.name, "null sender: the message must be a DSN or MDN")
        if addr.is_literal:
            detail = f"{addr.domain}: an address literal is not a sender domain"
            return Outcome.refuse(self.name, replies.SENDER_NOT_AUTHORIZED, detail)
        verdict = authorize(account, addr.domain_ascii)
        if verdict.allowed:
            if account.may_forward:
                # Its own envelope, but perhaps a third party's message re-sent
                # with an envelope the customer's MTA rewrote already: DATA decides.
                tx.forwarding = ForwardingDecision("forward", addr.addr, "", account=account, own_envelope=True)
            return Outcome.ok(self.name, f"{verdict.domain}: {verdict.reason}")
        if account.may_forward and verdict.via is None:
            return self._candidate(tx, account, addr, verdict)
        return Outcome.refuse(self.name, replies.SENDER_NOT_AUTHORIZED, verdict.reason)

    def _candidate(self, tx: Any, account: Account, addr: Any, verdict: DomainAuth) -> Outcome:
        """A foreign sender from an account that may forward: let through with its
        SRS rewrite; DATA confirms it (evidence) or refuses it."""
        if self.srs is None:
            return Outcome.refuse(self.name, replies.SENDER_NOT_AUTHORIZED,
                                  f"{verdict.reason}; this account may forward mail, but the gateway has no "
                                  f"SRS domain for it ([forwarding] srs_domain)")
        try:
            rewrite = self.srs.forward(unquote_local(addr.local), addr.domain_ascii)
        except SrsError as exc:
            # Relayed with its own envelope sender: SPF may fail at the destination,
            # but a refusal would lose mail the account may forward.
            tx.forwarding = ForwardingDecision("forward", addr.addr, "", account=account,
                                               note=f"not rewritten: {exc.detail}")
            return Outcome.flag(self.name, f"forwarding candidate {addr.addr}: SRS not applied ({exc.detail})")
        tx.forwarding = ForwardingDecision("forward", addr.addr, rewrite, account=account)
        return Outcome.ok(self.name, f"forwarding candidate: {verdict.domain} is not a sender domain of this "
                                     f"account, which may forward; envelope sender becomes {rewrite} "
                                     f"if the message shows forwarding evidence")


def build(services: Any) -> MailSenderAuth:
    return MailSenderAuth(services.accounts, Srs.from_settings(services.config.forwarding, services.clock))


SPEC = CheckSpec(
    name='mail_sender_auth', phase=Phase.MAIL, build=build,
    summary="P-FORGE: MAIL FROM in the account's authorized sender domains",
    position=20,
    replies=('SENDER_NOT_AUTHORIZED',),
    settings=('forwarding',),
    services=('accounts', 'clock'),
    provides=('null_sender', 'forwarding',))
