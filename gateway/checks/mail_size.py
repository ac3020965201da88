"""P-LOAD: a declared SIZE over the limit is refused at MAIL already."""
from __future__ import annotations

from ..core import replies
from ..core.transaction import Outcome, Phase
from .contract import CheckSpec


class MailSize:
    name = "mail_size"
    phase = Phase.MAIL

    def __init__(self, limit: int):
        self.limit = limit

    async def run(self, tx, item=None) -> Outcome:
        size = tx.mail_params.get("SIZE")
        if size is None:
            return Outcome.skip(self.name, "no SIZE declared")
        if int(size) > self.limit:
            return Outcome.refuse(self.name, replies.MESSAGE_TOO_BIG, f"SIZE={size} > {self.limit}")
        return Outcome.ok(self.name)


def build(services) -> MailSize:
    return MailSize(services.config.smtp.max_message_size)


SPEC = CheckSpec(
    name='mail_size', phase=Phase.MAIL, build=build,
    summary='P-LOAD: a declared SIZE over the limit',
    position=30,
    replies=('MESSAGE_TOO_BIG',),
    settings=('smtp.max_message_size',))
