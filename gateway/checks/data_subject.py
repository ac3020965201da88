"""data.subject: misleading headers (issue 5.5, P-SUBJ / P-FORGE).

Fake replies (a Re:/Aw:/Antw: subject with no In-Reply-To, References or
Thread-Index and no quoted earlier message in the body: refused for list or
bulk mail that is not a discussion list, flagged otherwise; forwards never
count), From display names that show an address of another domain (refused)
or a bare domain-like word (flagged), configured brand names in the display
name, Reply-To in another domain for list/bulk mail, and subjects whose
encoded-words decode to control characters or bidi overrides. The rules are
:func:`gateway.message.rules.check_subject`; see docs/headers.md.

List mail is known from ``tx.mailing_list`` (the registered list, set by
``mail_list``), or from the message's own List-Id / List-Unsubscribe /
Precedence: bulk|list headers.

The session's account (``tx.session.account``, refreshed from the account
cache as ``data_sender_auth`` does) gives the sender domains that never count
as "another domain" in a display name: its verified and approved domains.
"""
from __future__ import annotations

from typing import Any

from ..message.findings import apply
from ..message.parse import parsed_for
from ..message.rules import check_subject
from ..message.settings import HeaderSettings
from ..forwarding import forwarded
from ..core.transaction import Outcome, Phase
from .contract import CheckSpec


def own_domains(account: Any) -> tuple[str, ...]:
    """The account's verified/approved sender domains (lower-case A-labels)."""
    if account is None:
        return ()
    return tuple(d.domain for d in account.domains if d.authorized)


class SubjectCheck:
    name = "data_subject"
    phase = Phase.DATA

    def __init__(self, settings: HeaderSettings, accounts: Any = None):
        self.settings = settings
        self.accounts = accounts

    async def run(self, tx: Any, item: Any = None) -> Outcome:
        if forwarded(tx) is not None:  # the author's headers, relayed unchanged (docs/forwarding.md)
            return Outcome.skip(self.name, "forwarded")
        if tx.message is None:
            return Outcome.skip(self.name, "no message")
        account = tx.session.account
        if account is not None and self.accounts is not None:
            account = self.accounts.cached(account.name) or account
        findings = check_subject(tx.message, parsed_for(tx), self.settings, {"list": tx.mailing_list},
                                 own_domains(account))
        return apply(self.name, tx, findings, self.settings.actions)


def build(services: Any) -> SubjectCheck:
    return SubjectCheck(getattr(services.config, "headers", None) or HeaderSettings(),
                        getattr(services, "accounts", None))


SPEC = CheckSpec(
    name='data_subject', phase=Phase.DATA, build=build,
    summary='P-SUBJ: fake replies, spoofed display names, obfuscation',
    position=80,
    replies=('SUBJ_FAKE_REPLY', 'SUBJ_DISPLAY_NAME', 'SUBJ_REPLY_TO', 'SUBJ_OBFUSCATED'),
    settings=('headers',),
    services=('accounts',),
    provides=('findings',),
    reads=('mailing_list', 'forwarding', 'parsed_headers'))
