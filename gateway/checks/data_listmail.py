"""P-OPTIN: mail that looks like list mail (List-Id, List-Unsubscribe,
Precedence: bulk|list) but does not come from a registered list is
refused: mailing lists need the registry's confirmed opt-in.

Forwarded mail (gateway/forwarding.py) is skipped: its list headers are the
third party's list, which the customer only receives and passes on."""
from __future__ import annotations

from typing import Any

from ..forwarding import forwarded
from ..message.parse import parsed_for
from ..core import replies
from ..core.transaction import Outcome, Phase
from .contract import CheckSpec

_LIST_FIELDS = ("list-id", "list-unsubscribe", "list-unsubscribe-post", "list-post", "list-help")


class DataListmail:
    name = "data_listmail"
    phase = Phase.DATA

    async def run(self, tx: Any, item: Any = None) -> Outcome:
        if tx.message is None:
            return Outcome.skip(self.name, "no message")
        if tx.mailing_list is not None:
            return Outcome.ok(self.name, "registered list mail")
        if forwarded(tx) is not None:
            return Outcome.skip(self.name, "forwarded: the list headers are the author's")
        parsed = parsed_for(tx)
        marks = [name for name in _LIST_FIELDS if parsed.has(name)]
        precedence = (parsed.get("precedence") or "").strip().lower()
        if precedence in ("bulk", "list"):
            marks.append(f"Precedence: {precedence}")
        if marks:
            return Outcome.refuse(self.name, replies.OPTIN_UNREGISTERED_LIST, ", ".join(marks))
        return Outcome.ok(self.name)


def build(services) -> DataListmail:
    return DataListmail()


SPEC = CheckSpec(
    name='data_listmail', phase=Phase.DATA, build=build,
    summary='P-OPTIN: list mail that is not of a registered list',
    position=70,
    replies=('OPTIN_UNREGISTERED_LIST',),
    reads=('mailing_list', 'forwarding', 'parsed_headers'),
    requires=('mail_list',))
