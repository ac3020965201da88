"""data.subject: misleading headers (issue 5.5, P-SUBJ / P-FORGE).

Fake replies (Re:/Fwd:/Fw:/Aw:/Antw:/Tr: without In-Reply-To/References:
flagged for ordinary mail, refused for list or bulk mail), From display
names that show another domain or address, configured brand names in the
display name, Reply-To in another domain for list/bulk mail, and subjects
whose encoded-words decode to control characters or bidi overrides.

List mail is known from ``tx.extra["list"]`` (the registered list, set by
``mail_list``), bulk from ``tx.extra["bulk"]``, or from the message's own
List-Id / List-Unsubscribe / Precedence: bulk|list headers.
"""
from __future__ import annotations

from typing import Any

from ..message.findings import apply
from ..message.headers import check_subject, parsed_for
from ..message.settings import HeaderSettings
from ..forwarding import forwarded
from ..smtp.transaction import Outcome, Phase


class SubjectCheck:
    name = "data_subject"
    phase = Phase.DATA

    def __init__(self, settings: HeaderSettings):
        self.settings = settings

    async def run(self, tx: Any, item: Any = None) -> Outcome:
        if forwarded(tx) is not None:  # the author's headers, relayed unchanged (docs/forwarding.md)
            return Outcome.skip(self.name, "forwarded")
        if tx.message is None:
            return Outcome.skip(self.name, "no message")
        findings = check_subject(parsed_for(tx), self.settings, tx.extra)
        return apply(self.name, tx, findings, self.settings.actions)


def build(services: Any) -> SubjectCheck:
    return SubjectCheck(getattr(services.config, "headers", None) or HeaderSettings())
