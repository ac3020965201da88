"""P-STRIKE: a suspended account sends nothing (its status is re-read from
the account snapshot, which follows the database within a second)."""
from __future__ import annotations

from ..core import replies
from ..core.transaction import Outcome, Phase
from .contract import CheckSpec


class MailAccountStatus:
    name = "mail_account_status"
    phase = Phase.MAIL

    def __init__(self, accounts):
        self.accounts = accounts

    async def run(self, tx, item=None) -> Outcome:
        acc = tx.session.account
        if acc is None:
            return Outcome.skip(self.name, "not authenticated")
        current = self.accounts.cached(acc.name) or acc
        tx.session.account = current
        if current.suspended:
            return Outcome.refuse(self.name, replies.ACCOUNT_SUSPENDED, f"account {current.name} is suspended")
        return Outcome.ok(self.name, current.status.value)


def build(services) -> MailAccountStatus:
    return MailAccountStatus(services.accounts)


SPEC = CheckSpec(
    name='mail_account_status', phase=Phase.MAIL, build=build,
    summary='P-ACCOUNT: a suspended account sends nothing',
    position=10,
    replies=('ACCOUNT_SUSPENDED',),
    services=('accounts',),
    provides=('session.account',))
