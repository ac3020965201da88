"""What a message-content check found, and the catalogue of finding ids.

A :class:`Finding` is plain data: the finding id (``hdr.duplicate``), the
POLICY.md rule it enforces, the catalogue reply to send when the configured
action is ``reject``, and a human detail that names the header and the
problem. Which findings refuse and which are only recorded is decided by
:class:`~gateway.message.settings.HeaderSettings.actions`, never here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..core import replies
from ..core.replies import Reply
from ..core.transaction import Outcome

REJECT = "reject"
FLAG = "flag"
OFF = "off"
ACTIONS = (REJECT, FLAG, OFF)
WARN = "warn"  # not configurable here: a reject finding of a check in warn mode ([checks.modes])


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    policy: str          # POLICY.md rule id
    reply: Reply         # what the client gets when the action is "reject"
    default: str         # default action
    summary: str         # one line for docs and `gateway` listings


def _r(id_: str, reply: Reply, default: str, summary: str) -> Rule:
    return Rule(id_, reply.rule or "", reply, default, summary)


# Every finding id the message checks can produce. Order = documentation order.
RULES: dict[str, Rule] = {r.id: r for r in (
    # wire hygiene (raw bytes, before any parsing)
    _r("wire.bare_lf", replies.WIRE_BARE_LF, REJECT, "LF not preceded by CR anywhere in DATA (SMTP smuggling)"),
    _r("wire.bare_cr", replies.WIRE_BARE_CR, REJECT, "CR not followed by LF anywhere in DATA (SMTP smuggling)"),
    _r("wire.nul", replies.WIRE_NUL, REJECT, "NUL byte in the message"),
    _r("wire.line_length", replies.WIRE_LINE_TOO_LONG, REJECT, "a line longer than 998 octets (RFC 5322 2.1.1)"),
    _r("wire.8bit", replies.WIRE_8BIT, REJECT, "8-bit bytes without BODY=8BITMIME or SMTPUTF8"),
    _r("wire.8bit_header", replies.WIRE_8BIT_HEADER, FLAG, "8-bit bytes in the header block without SMTPUTF8 (RFC 6532)"),
    # RFC 5322 structure
    _r("hdr.field_name", replies.HDR_INVALID, REJECT, "header line without colon, or a field name that is not printable ASCII without colon/space"),
    _r("hdr.folding", replies.HDR_INVALID, REJECT, "continuation line before the first field, or a folded line of white space only"),
    _r("hdr.utf8", replies.HDR_INVALID, REJECT, "header bytes that are not valid UTF-8 (RFC 6532)"),
    _r("hdr.required", replies.HDR_INVALID, REJECT, "From missing"),
    _r("hdr.duplicate", replies.HDR_INVALID, REJECT, "more than one From/Date/To/Cc/Bcc/Subject/Message-ID/Sender/Reply-To/In-Reply-To/References"),
    _r("hdr.from_sender", replies.HDR_INVALID, REJECT, "From with several mailboxes and no Sender"),
    _r("hdr.address", replies.HDR_INVALID, REJECT, "an address header that does not parse (RFC 5322 / RFC 6532)"),
    _r("hdr.date", replies.HDR_INVALID, REJECT, "Date that does not parse or is not a real calendar time"),
    _r("hdr.date_window", replies.HDR_DATE_WINDOW, REJECT, "Date outside the allowed window around the gateway clock"),
    _r("hdr.date_missing", replies.HDR_DATE_MISSING, REJECT, "no Date (with an account settings.date decides: add or refuse)"),
    _r("hdr.message_id", replies.HDR_INVALID, REJECT, "malformed Message-ID"),
    _r("hdr.message_id_missing", replies.HDR_MESSAGE_ID_MISSING, FLAG, "no Message-ID (with an account settings.message_id decides: add or refuse)"),
    _r("hdr.mime", replies.HDR_MIME, REJECT, "MIME structure broken: no boundary, boundary never found, unknown Content-Transfer-Encoding"),
    _r("hdr.mime_close", replies.HDR_MIME, FLAG, "multipart without its closing boundary"),
    _r("hdr.encoded_word", replies.HDR_INVALID, REJECT, "RFC 2047 encoded-word that does not decode"),
    # trace integrity (P-PATH)
    _r("trace.forged_received", replies.TRACE_FORGED, REJECT, "client-supplied Received naming one of the gateway's hosts"),
    _r("trace.forged_header", replies.TRACE_FORGED, REJECT, "client-supplied gateway trace header"),
    # misleading headers (P-SUBJ / P-FORGE)
    _r("subj.fake_reply", replies.SUBJ_FAKE_REPLY, FLAG, "Re:/Aw:/Antw: subject with no thread headers and no quoted earlier message (ordinary or discussion-list mail)"),
    _r("subj.fake_reply_bulk", replies.SUBJ_FAKE_REPLY, REJECT, "Re:/Aw:/Antw: subject with no thread headers and no quoted earlier message (list or bulk mail, not a discussion list)"),
    _r("subj.display_name", replies.SUBJ_DISPLAY_NAME, REJECT, "From display name carrying an e-mail address of another domain than the From domain and the account's"),
    _r("subj.display_domain", replies.SUBJ_DISPLAY_NAME, FLAG, "From display name showing a bare domain-like word (\"News.com\") of another domain than the From domain and the account's"),
    _r("subj.brand", replies.SUBJ_DISPLAY_NAME, FLAG, "From display name naming a configured brand, sent from outside the brand's domain"),
    _r("subj.reply_to_domain", replies.SUBJ_REPLY_TO, FLAG, "Reply-To in another domain than From (list or bulk mail)"),
    _r("subj.obfuscated", replies.SUBJ_OBFUSCATED, REJECT, "Subject decoding to control characters or bidi overrides"),
)}

DEFAULT_ACTIONS: dict[str, str] = {rid: r.default for rid, r in RULES.items()}


@dataclass(frozen=True, slots=True)
class Finding:
    id: str
    detail: str

    @property
    def rule(self) -> Rule:
        return RULES[self.id]

    @property
    def policy(self) -> str:
        return RULES[self.id].policy

    @property
    def reply(self) -> Reply:
        return RULES[self.id].reply

    def text(self) -> str:
        """The detail as sent to the client: what is wrong, then the finding id."""
        return f"{self.detail} [{self.id}]"

    def as_dict(self, action: str, check: str) -> dict[str, Any]:
        r = RULES[self.id]
        return {"id": self.id, "rule": r.policy, "action": action, "check": check,
                "detail": self.detail, "reply": f"{r.reply.code} {r.reply.enhanced}"}


def apply(check: str, tx: Any, findings: list[Finding], actions: dict[str, str],
          overrides: dict[str, str] | None = None) -> Outcome:
    """Record ``findings`` in ``tx.findings`` and make the check's Outcome.

    Every finding whose action is not ``off`` is recorded, flag-only ones
    included. The first ``reject`` finding becomes the refusal (its detail is
    what the client reads after the catalogue text); with only flags the
    outcome is a FLAG listing all of them. ``overrides`` maps finding ids to
    an action that wins over ``actions`` (e.g. ``"add"`` for a Message-ID the
    relay will add: recorded, neither refusing nor flagging).
    """
    if tx.findings is None:
        tx.findings = []
    ledger = tx.findings
    if not findings:
        return Outcome.ok(check, "")
    refusal: Finding | None = None
    flags: list[str] = []
    notes: list[str] = []
    for f in findings:
        action = (overrides or {}).get(f.id) or actions.get(f.id, RULES[f.id].default)
        if action == OFF:
            continue
        ledger.append(f.as_dict(action, check))
        if action == REJECT:
            if refusal is None:
                refusal = f
        elif action == FLAG:
            flags.append(f.text())
        else:
            notes.append(f"{action}: {f.text()}")
    if refusal is not None:
        return Outcome.refuse(check, refusal.reply, refusal.text())
    if flags:
        return Outcome.flag(check, "; ".join(flags))
    return Outcome.ok(check, "; ".join(notes))


def warned(tx: Any, check: str) -> None:
    """``check`` ran in warn mode and its refusal was not sent: its ``reject``
    findings in ``tx.findings`` say ``warn``, as its ledger entry does."""
    for f in getattr(tx, "findings", None) or ():
        if f["check"] == check and f["action"] == REJECT:
            f["action"] = WARN
