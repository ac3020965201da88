"""P-OPTIN: is this list mail? A MAIL FROM that matches the envelope sender
(or VERP pattern) of one of the account's registered lists makes the
transaction list mail: every recipient must then be a confirmed subscriber
(rcpt_optin), and the relayed copies carry the list's unsubscribe headers.
The registry being unreachable defers; it never lets list mail through
unchecked."""
from __future__ import annotations

from typing import Any

from ..registry.model import RegistryUnavailable
from ..core import replies
from ..core.transaction import Outcome, Phase
from . import contract
from .contract import CheckSpec


class MailList:
    name = "mail_list"
    phase = Phase.MAIL

    def __init__(self, registry):
        self.registry = registry

    async def run(self, tx: Any, item: Any = None) -> Outcome:
        account = tx.session.account
        if account is None or tx.mail_from is None or tx.mail_from.is_null:
            return Outcome.skip(self.name, "no account or null sender")
        try:
            lst = await self.registry.list_for_sender(account.name, tx.mail_from.addr)
        except RegistryUnavailable as exc:
            return Outcome.error(self.name, f"registry unavailable: {exc}", replies.REGISTRY_UNAVAILABLE)
        if lst is None:
            return Outcome.ok(self.name, "not list mail")
        tx.mailing_list = lst
        return Outcome.ok(self.name, f"list {lst.id} ({lst.list_id})")


def build(services) -> MailList:
    return MailList(services.registry)


SPEC = CheckSpec(
    name='mail_list', phase=Phase.MAIL, build=build,
    summary='P-OPTIN: is this mail of a registered mailing list',
    position=70,
    replies=('REGISTRY_UNAVAILABLE',),
    services=('registry',),
    provides=('mailing_list',),
    deadline=contract.STORE)
