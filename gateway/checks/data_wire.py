"""data.wire: raw DATA hygiene before any parsing (issue 5.1, P-HDR / P-STD).

Bare CR / bare LF (SMTP smuggling), NUL, lines over 998 octets, and 8-bit
bytes the client did not declare with BODY=8BITMIME or SMTPUTF8. Runs first
in the data phase: nothing else should parse bytes this check refuses.
"""
from __future__ import annotations

from typing import Any

from ..message.findings import apply
from ..message.settings import HeaderSettings
from ..message.wire import check_wire
from ..core.transaction import Outcome, Phase
from .contract import CheckSpec


class WireCheck:
    name = "data_wire"
    phase = Phase.DATA

    def __init__(self, settings: HeaderSettings):
        self.settings = settings

    async def run(self, tx: Any, item: Any = None) -> Outcome:
        data = tx.message
        if data is None:
            return Outcome.skip(self.name, "no message")
        findings = check_wire(data, body_8bit=tx.body_8bit, smtputf8=tx.smtputf8)
        return apply(self.name, tx, findings, self.settings.actions)


def build(services: Any) -> WireCheck:
    return WireCheck(getattr(services.config, "headers", None) or HeaderSettings())


SPEC = CheckSpec(
    name='data_wire', phase=Phase.DATA, build=build,
    summary='P-HDR/P-STD: bare CR/LF, NUL, long lines, undeclared 8-bit',
    position=20,
    replies=('WIRE_BARE_LF', 'WIRE_BARE_CR', 'WIRE_NUL', 'WIRE_LINE_TOO_LONG', 'WIRE_8BIT', 'WIRE_8BIT_HEADER'),
    settings=('headers.actions',),
    provides=('findings',))
