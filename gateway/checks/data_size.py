"""P-LOAD: the message as transferred must not exceed the size limit.

The DATA reader stops keeping bytes past the limit (and keeps reading to the
end of data, RFC 5321 4.2.5) and records how many octets came in."""
from __future__ import annotations

from ..core import replies
from ..core.transaction import Outcome, Phase
from .contract import CheckSpec


class DataSize:
    name = "data_size"
    phase = Phase.DATA

    def __init__(self, limit: int):
        self.limit = limit

    async def run(self, tx, item=None) -> Outcome:
        received = tx.data_octets if tx.data_octets is not None else len(tx.message or b"")
        if received > self.limit:
            return Outcome.refuse(self.name, replies.MESSAGE_TOO_BIG, f"{received} octets > {self.limit}")
        return Outcome.ok(self.name, f"{received} octets")


def build(services) -> DataSize:
    return DataSize(services.config.smtp.max_message_size)


SPEC = CheckSpec(
    name='data_size', phase=Phase.DATA, build=build,
    summary='P-LOAD: message size',
    position=10,
    replies=('MESSAGE_TOO_BIG',),
    settings=('smtp.max_message_size',),
    reads=('data_octets',))
