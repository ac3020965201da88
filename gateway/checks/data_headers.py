"""data.headers: RFC 5322 structure of the header block (issue 5.2, P-HDR).

Field names and folding, exactly one From and Date, at most one of the
singular fields, parseable addresses (RFC 5322 / RFC 6532), Date that parses
and lies within the window around ``services.clock()``, Message-ID, MIME
structure and encoded-words.

A missing Date or Message-ID in a session with an account (SMTP AUTH or a
client network: message submission) is added, as RFC 6409 8 allows a
submission server, or refused, as ``headers.date`` / ``headers.message_id``
say. This check only puts the header to add into ``tx.add_headers``
(the relay writes it below the gateway's trace headers) and never changes
``tx.message``. A session without an account (it can reach the gateway's
service mailboxes only) never gets a header added: the finding's action in
``headers.actions`` decides (hdr.date_missing refuses, hdr.message_id_missing
flags, by default).
"""
from __future__ import annotations

import secrets
import time
from email.utils import formatdate
from typing import Any, Callable

from ..message.findings import OFF, REJECT, apply
from ..message.parse import parsed_for
from ..message.rules import check_structure
from ..message.settings import HeaderSettings
from ..forwarding import forwarded
from ..core.transaction import Outcome, Phase
from .contract import CheckSpec

ADD = "add"  # the action recorded for a finding the gateway repairs by adding a header


class HeadersCheck:
    name = "data_headers"
    phase = Phase.DATA

    def __init__(self, settings: HeaderSettings, hostname: str, clock: Callable[[], float]):
        self.settings = settings
        self.hostname = hostname
        self.clock = clock
        # (finding id, header name, "add" | "refuse", maker) for sessions with an account
        self._repairs = [(fid, header, mode, make) for fid, header, mode, make in (
            ("hdr.date_missing", "Date", settings.date, self.new_date),
            ("hdr.message_id_missing", "Message-ID", settings.message_id, self.new_message_id),
        ) if settings.actions.get(fid) != OFF]
        self._submission_overrides = {fid: ADD if mode == "add" else REJECT for fid, _, mode, _ in self._repairs}

    async def run(self, tx: Any, item: Any = None) -> Outcome:
        data = tx.message
        if data is None:
            return Outcome.skip(self.name, "no message")
        if forwarded(tx) is not None:  # the author's header block, relayed unchanged (docs/forwarding.md)
            return Outcome.skip(self.name, "forwarded")
        parsed = parsed_for(tx)
        now = self.clock() if self.settings.actions.get("hdr.date_window") != "off" else None
        findings = check_structure(data, parsed, self.settings, now)
        if getattr(tx.session, "account", None) is None:
            return apply(self.name, tx, findings, self.settings.actions)
        if findings:
            found = {f.id for f in findings}
            for fid, header, mode, make in self._repairs:
                if mode == "add" and fid in found:
                    added = tx.add_headers
                    if not any(name == header for name, _ in added):
                        added.append((header, make(tx)))
        return apply(self.name, tx, findings, self.settings.actions, self._submission_overrides)

    def new_date(self, tx: Any) -> str:
        """The gateway clock's time in RFC 5322 form, UTC written as +0000
        (formatdate's -0000 would say the zone is unknown, RFC 5322 3.3)."""
        return formatdate(self.clock(), localtime=False)[:-5] + "+0000"

    def new_message_id(self, tx: Any) -> str:
        domain = self.settings.message_id_domain or self.hostname or "localhost"
        stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(self.clock()))
        return f"<{stamp}.{secrets.token_hex(8)}.{tx.trace_id}@{domain}>"


def build(services: Any) -> HeadersCheck:
    settings = getattr(services.config, "headers", None) or HeaderSettings()
    return HeadersCheck(settings, services.config.smtp.hostname, services.clock)


SPEC = CheckSpec(
    name='data_headers', phase=Phase.DATA, build=build,
    summary='P-HDR: RFC 5322 structure of the header block',
    position=30,
    replies=('HDR_INVALID', 'HDR_DATE_WINDOW', 'HDR_DATE_MISSING', 'HDR_MESSAGE_ID_MISSING', 'HDR_MIME'),
    settings=('headers', 'smtp.hostname'),
    services=('clock',),
    provides=('findings', 'add_headers', 'parsed_headers'))
