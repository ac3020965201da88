"""data.trace: trace integrity (issue 5.3, P-PATH).

Only the gateway writes trace that names the gateway. A client-supplied
Received header whose ``by``/``from``/``helo`` names one of the gateway's host
names, or a client-supplied copy of the gateway's own trace header
(``X-Gateway-Trace`` by default), is forged and refused.
"""
from __future__ import annotations

from typing import Any

from ..message.findings import apply
from ..message.parse import parsed_for
from ..message.rules import check_trace
from ..message.settings import HeaderSettings
from ..core.transaction import Outcome, Phase
from .contract import CheckSpec


class TraceCheck:
    name = "data_trace"
    phase = Phase.DATA

    def __init__(self, settings: HeaderSettings, hostname: str, trace_header: str = "X-Gateway-Trace"):
        self.settings = settings
        self.trace_header = trace_header
        self.hostnames = tuple(dict.fromkeys([h for h in (hostname, *settings.own_hostnames) if h]))

    async def run(self, tx: Any, item: Any = None) -> Outcome:
        if tx.message is None:
            return Outcome.skip(self.name, "no message")
        findings = check_trace(parsed_for(tx), self.settings, self.hostnames, self.trace_header)
        return apply(self.name, tx, findings, self.settings.actions)


def build(services: Any) -> TraceCheck:
    settings = getattr(services.config, "headers", None) or HeaderSettings()
    return TraceCheck(settings, services.config.smtp.hostname, services.config.smtp.trace_header)


SPEC = CheckSpec(
    name='data_trace', phase=Phase.DATA, build=build,
    summary='P-PATH: forged trace headers',
    position=60,
    replies=('TRACE_FORGED',),
    settings=('headers', 'smtp.hostname', 'smtp.trace_header'),
    provides=('findings',),
    reads=('parsed_headers',))
