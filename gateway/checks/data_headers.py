"""data.headers: RFC 5322 structure of the header block (issue 5.2, P-HDR).

Field names and folding, exactly one From and Date, at most one of the
singular fields, parseable addresses (RFC 5322 / RFC 6532), Date that parses
and lies within the window around ``services.clock()``, Message-ID, MIME
structure and encoded-words. A missing Message-ID is either refused or, with
``message_id = "add"``, left to the relay: this check puts the header to add
into ``tx.extra["add_headers"]`` and never changes ``tx.message``.
"""
from __future__ import annotations

import secrets
import time
from typing import Any, Callable

from ..message.findings import apply
from ..message.headers import check_structure, parsed_for
from ..message.settings import HeaderSettings
from ..forwarding import forwarded
from ..smtp.transaction import Outcome, Phase


class HeadersCheck:
    name = "data_headers"
    phase = Phase.DATA

    def __init__(self, settings: HeaderSettings, hostname: str, clock: Callable[[], float]):
        self.settings = settings
        self.hostname = hostname
        self.clock = clock
        self._overrides = {"hdr.message_id_missing": "reject" if settings.message_id == "refuse" else "add"}
        if settings.actions.get("hdr.message_id_missing") == "off":
            self._overrides = {}

    async def run(self, tx: Any, item: Any = None) -> Outcome:
        data = tx.message
        if data is None:
            return Outcome.skip(self.name, "no message")
        if forwarded(tx) is not None:  # the author's header block, relayed unchanged (docs/forwarding.md)
            return Outcome.skip(self.name, "forwarded")
        parsed = parsed_for(tx)
        now = self.clock() if self.settings.actions.get("hdr.date_window") != "off" else None
        findings = check_structure(data, parsed, self.settings, now)
        if findings and self.settings.message_id == "add" and any(f.id == "hdr.message_id_missing" for f in findings):
            tx.extra.setdefault("add_headers", []).append(("Message-ID", self.new_message_id(tx)))
        return apply(self.name, tx, findings, self.settings.actions, self._overrides)

    def new_message_id(self, tx: Any) -> str:
        domain = self.settings.message_id_domain or self.hostname or "localhost"
        stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(self.clock()))
        return f"<{stamp}.{secrets.token_hex(8)}.{tx.trace_id}@{domain}>"


def build(services: Any) -> HeadersCheck:
    settings = getattr(services.config, "headers", None) or HeaderSettings()
    return HeadersCheck(settings, services.config.smtp.hostname, services.clock)
