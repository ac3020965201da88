"""data.sender_auth: From and Sender must be the account's (P-FORGE).

Every mailbox of every From header, and the Sender, must be in the account's
authorized domains (the rule of ``mail_sender_auth.authorize``). Mail with
the null reverse-path must be a delivery status notification (RFC 3464,
``multipart/report; report-type=delivery-status`` with a
``message/delivery-status`` part; RFC 6533 global forms too) or a
disposition notification (RFC 8098 MDN).

Display names: ``data_subject`` already refuses a From display name that
shows an address of a domain unrelated to the From domain and not one of the
account's (``subj.display_name``, 550 5.7.1 P-FORGE; bare domain-like words
are only flagged there, ``subj.display_domain``); that is not repeated here.
What is left is an address shown in the display name whose domain *is*
related to the From domain (parent or sibling, same organizational domain)
but is not one of the account's sender domains: refused here, e.g.
``"ceo@example.com" <news@shop.example.com>`` from an account that owns
shop.example.com only.

Forwarded mail (gateway/forwarding.py, docs/forwarding.md): From and Sender
are the author's, not the account's, and are not judged here when the
message shows forwarding evidence; a forwarding candidate (a foreign MAIL
FROM let through at MAIL) without evidence is refused like a foreign sender,
with a detail naming the evidence it lacks. SRS bounces are skipped.

Runs after ``data_headers`` (which refuses headers that do not parse: they
are skipped here) and before ``data_subject``. Sessions without an account
are skipped, as at MAIL.
"""
from __future__ import annotations

import re
from typing import Any

from ..message.parse import ParsedHeaders, parse_content_type, parsed_address_list, parsed_for
from ..message.rules import display_domains, display_text, related_domains
from ..forwarding import forwarded, missing_evidence
from ..core import replies
from ..core.transaction import Outcome, Phase
from .contract import CheckSpec
from ..accounts.authorize import ascii_domain, authorize

REPORT_TYPES = frozenset(("delivery-status", "global-delivery-status",
                          "disposition-notification", "global-disposition-notification"))
# The machine-readable part a DSN/MDN carries (RFC 3464 s.2, RFC 8098 s.3, RFC 6533 s.3).
_REPORT_PART = re.compile(
    rb"^content-type[ \t]*:[ \t]*(?:\r?\n[ \t]+)?message/(?:global-)?(?:delivery-status|disposition-notification)\b",
    re.I | re.M)


def report_type(data: bytes, parsed: ParsedHeaders) -> str | None:
    """The report-type of a DSN/MDN, or None when the message is not one (pure)."""
    value = parsed.get("content-type")
    ct = parse_content_type(value) if value is not None else None
    if ct is None or ct[0] != "multipart/report":
        return None
    kind = ct[1].get("report-type", "").lower()
    if kind not in REPORT_TYPES:
        return None
    if _REPORT_PART.search(data, parsed.body_start) is None:
        return None
    return kind


class DataSenderAuth:
    name = "data_sender_auth"
    phase = Phase.DATA

    def __init__(self, accounts: Any):
        self.accounts = accounts

    async def run(self, tx: Any, item: Any = None) -> Outcome:
        acc = tx.session.account
        if acc is None:
            return Outcome.skip(self.name, "not authenticated")
        if tx.message is None:
            return Outcome.skip(self.name, "no message")
        fwd = forwarded(tx)
        if fwd is not None:
            if fwd.kind == "bounce":
                return Outcome.skip(self.name, "SRS bounce: the author is the remote MTA")
            return Outcome.skip(self.name, f"forwarded ({fwd.evidence}): From and Sender are the author's")
        account = self.accounts.cached(acc.name) or acc
        if tx.forwarding is not None and not tx.forwarding.own_envelope:   # a candidate without evidence
            return Outcome.refuse(self.name, replies.SENDER_NOT_AUTHORIZED,
                                  f"{tx.mail_from.domain_ascii} is not a sender domain of this account, and "
                                  + missing_evidence(tx.forwarding.account or account))
        parsed = parsed_for(tx)
        notes: list[str] = []
        if tx.null_sender:
            kind = report_type(tx.message, parsed)
            if kind is None:
                ct = (parsed.get("content-type") or "text/plain (none given)").split(";")[0].strip()
                return Outcome.refuse(self.name, replies.NULL_SENDER_NOT_REPORT,
                                      f"message is {ct[:60]}, not multipart/report with a delivery-status "
                                      f"or disposition-notification part")
            notes.append(f"null sender, report-type={kind}")
        from_boxes = []
        for header, reply in (("from", replies.HEADER_FROM_NOT_AUTHORIZED),
                              ("sender", replies.HEADER_SENDER_NOT_AUTHORIZED)):
            for value in parsed.get_all(header):
                # From: the mailboxes data_headers (check_structure) parsed already
                boxes, err = parsed_address_list(parsed, value, allow_group=False)
                if err is not None:
                    continue  # data_headers refuses it (hdr.address)
                for box in boxes:
                    domain = ascii_domain(box.domain)
                    if domain is None:
                        return Outcome.refuse(self.name, reply, f"{box.domain[:80]} is not a domain name")
                    verdict = authorize(account, domain)
                    if not verdict.allowed:
                        return Outcome.refuse(self.name, reply, verdict.reason)
                    if header == "from":
                        from_boxes.append((box, domain))
        for box, domain in from_boxes:
            display = display_text(box)
            if "@" not in display:
                continue
            for shown in display_domains(display)[0]:  # the addresses; bare domain names are data_subject's
                if not related_domains(shown, domain):
                    continue  # unrelated domains are data_subject's (subj.display_name)
                shown_ascii = ascii_domain(shown)
                if shown_ascii is not None and authorize(account, shown_ascii).allowed:
                    continue
                return Outcome.refuse(self.name, replies.DISPLAY_NAME_NOT_AUTHORIZED,
                                      f"From display name shows an address in {shown}, "
                                      f"which is not a sender domain of this account")
        notes.append("From: " + (", ".join(sorted({d for _, d in from_boxes})) or "-"))
        return Outcome.ok(self.name, "; ".join(notes))


def build(services: Any) -> DataSenderAuth:
    return DataSenderAuth(services.accounts)


SPEC = CheckSpec(
    name='data_sender_auth', phase=Phase.DATA, build=build,
    summary="P-FORGE: From/Sender in the account's domains; null sender only for DSN/MDN",
    position=40,
    replies=('SENDER_NOT_AUTHORIZED', 'HEADER_FROM_NOT_AUTHORIZED', 'HEADER_SENDER_NOT_AUTHORIZED',
             'DISPLAY_NAME_NOT_AUTHORIZED', 'NULL_SENDER_NOT_REPORT'),
    services=('accounts',),
    reads=('null_sender', 'forwarding', 'parsed_headers'),
    requires=('mail_sender_auth', 'data_headers'))
