"""P-LOAD: at most N recipients per message (452 4.5.3: the client sends the
rest in another transaction, RFC 5321 4.5.3.1.10)."""
from __future__ import annotations

from ..core import replies
from ..core.transaction import Outcome, Phase
from .contract import CheckSpec


class RcptLimit:
    name = "rcpt_limit"
    phase = Phase.RCPT

    def __init__(self, limit: int):
        self.limit = limit

    async def run(self, tx, item=None) -> Outcome:
        if len(tx.recipients) >= self.limit:
            return Outcome.refuse(self.name, replies.TOO_MANY_RECIPIENTS, f"limit {self.limit}")
        return Outcome.ok(self.name)


def build(services) -> RcptLimit:
    return RcptLimit(services.config.smtp.max_recipients)


SPEC = CheckSpec(
    name='rcpt_limit', phase=Phase.RCPT, build=build,
    summary='P-LOAD: recipients per message',
    position=20,
    replies=('TOO_MANY_RECIPIENTS',),
    settings=('smtp.max_recipients',))
