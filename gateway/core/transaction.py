"""Session and transaction model, and the ledger of check outcomes.

A session is one client connection; a transaction is one MAIL..DATA exchange
inside it. Every check writes an :class:`Outcome` into the transaction's
ledger; the JSON log line, the metrics and the message log are written from
that ledger alone.
"""
from __future__ import annotations

import enum
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .replies import Rendered, Reply

if TYPE_CHECKING:  # pragma: no cover
    from ..accounts.model import Account
    from ..registry.model import MailingList
    from .address import EnvelopeAddress


class Phase(str, enum.Enum):
    CONNECT = "connect"
    HELO = "helo"
    AUTH = "auth"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"


class Result(str, enum.Enum):
    PASS = "pass"      # the check ran and found nothing wrong
    FAIL = "fail"      # the check refuses (reject or defer, see reply)
    WARN = "warn"      # a check in warn mode would have refused (reply): recorded, mail goes on
    FLAG = "flag"      # a finding recorded for review, mail goes on
    SKIP = "skip"      # the check does not apply here
    ERROR = "error"    # the check could not decide (its reply says what follows)


@dataclass(slots=True)
class Outcome:
    check: str
    result: Result
    detail: str = ""
    reply: Reply | Rendered | None = None
    phase: Phase | None = None
    item: str | None = None  # e.g. the recipient an RCPT check was about

    @property
    def refuses(self) -> bool:
        return self.reply is not None and not self.reply.is_positive

    def as_log(self) -> dict[str, Any]:
        d: dict[str, Any] = {"check": self.check, "result": self.result.value}
        if self.phase is not None:
            d["phase"] = self.phase.value
        if self.item is not None:
            d["item"] = self.item
        if self.detail:
            d["detail"] = self.detail
        if self.reply is not None:
            d["would_reply" if self.result is Result.WARN else "reply"] = f"{self.reply.code} {self.reply.enhanced}"
        return d

    # Constructors used by checks ------------------------------------------------
    @classmethod
    def ok(cls, check: str, detail: str = "") -> "Outcome":
        return cls(check, Result.PASS, detail)

    @classmethod
    def skip(cls, check: str, detail: str = "") -> "Outcome":
        return cls(check, Result.SKIP, detail)

    @classmethod
    def flag(cls, check: str, detail: str) -> "Outcome":
        return cls(check, Result.FLAG, detail)

    @classmethod
    def refuse(cls, check: str, reply: Reply | Rendered, detail: str = "") -> "Outcome":
        return cls(check, Result.FAIL, detail, reply)

    @classmethod
    def error(cls, check: str, detail: str, reply: Reply | None = None) -> "Outcome":
        """The check could not decide; with a reply it defers, without it fails open."""
        return cls(check, Result.ERROR, detail, reply)


@dataclass(slots=True)
class Verdict:
    """What the pipeline decided for one phase (and one item)."""

    outcomes: list[Outcome]
    refusal: Outcome | None = None

    @property
    def accepted(self) -> bool:
        return self.refusal is None


def new_trace_id() -> str:
    """An opaque, unguessable id: 16 random bytes, URL-safe."""
    return secrets.token_urlsafe(12)


@dataclass(slots=True)
class TlsInfo:
    version: str
    cipher: str


@dataclass(slots=True)
class SessionInfo:
    id: str
    listener: str
    peer_ip: str
    peer_port: int
    local_ip: str = ""
    local_port: int = 0
    proxied: bool = False           # peer address came from a PROXY header
    tls: TlsInfo | None = None
    helo: str | None = None
    esmtp: bool = False
    account: "Account | None" = None
    auth_method: str | None = None  # "smtp-auth" | "client-network"
    auth_login: str | None = None
    # The end user inside the account (issue 12): a SASL sub-login's part after
    # the account name ("shop/site7" -> "site7"); None: the account as a whole.
    identity: str | None = None
    started: float = field(default_factory=time.time)
    transactions: int = 0
    ledger: list[Outcome] = field(default_factory=list)  # connect/helo/auth outcomes
    # Log bookkeeping: lines written for this session, and how much of its
    # ledger they carried (the session's end line carries the rest).
    lines_logged: int = 0
    ledger_logged: int = 0
    ended: str = "disconnect"       # how the session ended, for its log line

    @property
    def authenticated(self) -> bool:
        return self.account is not None


@dataclass(slots=True)
class Recipient:
    address: "EnvelopeAddress"
    params: dict[str, str | bool]
    reply: Reply | Rendered | None = None  # the answer the client got (upstream's when relayed)
    local: str | None = None  # "service" | "unsubscribe": handled by the gateway itself, not relayed
    upstream: Any = None      # list mail: this recipient's own upstream transaction (one copy each)
    relay_to: str | None = None  # SRS bounce: the decoded address the message is relayed to


@dataclass(slots=True)
class ForwardingDecision:
    """Forwarded mail (docs/forwarding.md), decided at MAIL and settled at DATA.

    ``kind`` "forward": the client (an account that may forward) sent a message
    it forwards; ``original`` is its MAIL FROM and ``rewrite`` the SRS address
    the upstream gets instead ("" when it stays: the envelope is the account's
    own, ``own_envelope``, or SRS could not apply, ``note``). ``state``: "candidate" (MAIL: nothing seen yet), then at DATA
    "confirmed" (``evidence`` names the header that shows it), "no-evidence"
    (refused like any foreign sender) or "own-mail" (own envelope and From:
    ordinary mail). ``kind`` "bounce": a message to an SRS address of the
    gateway, relayed to the decoded original sender (``Recipient.relay_to``).
    """

    kind: str                           # "forward" | "bounce"
    original: str = ""
    rewrite: str = ""
    state: str = "candidate"
    evidence: str = ""
    account: Any = None                 # the account snapshot the evidence is judged against
    own_envelope: bool = False          # MAIL FROM is in the account's own domains
    note: str = ""

    def as_log(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "state": self.state}
        if self.kind == "forward":
            d["original_sender"] = self.original
            d["rewritten_sender"] = self.rewrite or self.original
        if self.evidence:
            d["evidence"] = self.evidence
        if self.note:
            d["note"] = self.note
        return d


@dataclass(slots=True)
class Transaction:
    session: SessionInfo
    trace_id: str = field(default_factory=new_trace_id)
    mail_from: "EnvelopeAddress | None" = None
    mail_params: dict[str, str | bool] = field(default_factory=dict)
    recipients: list[Recipient] = field(default_factory=list)
    refused_recipients: int = 0
    message: bytes | None = None
    ledger: list[Outcome] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    wall_started: float = field(default_factory=time.time)
    timings: dict[str, float] = field(default_factory=dict)
    decision: str = "open"          # relayed | refused | deferred | aborted | local (delivering: during DATA's handover)
    final_reply: Reply | Rendered | None = None
    upstream: str | None = None
    # A window where a copy may be out and the client sends the message again
    # (delivery/handover.py settle(); docs/architecture.md "Duplicates by design").
    duplicate_risk: str | None = None
    upstreams_skipped: tuple[str, ...] = ()       # before ``upstream``: skipped, their circuit open
    forwarding: ForwardingDecision | None = None   # forwarded mail / SRS bounce (gateway/forwarding.py)
    # What checks provide to later checks and to delivery (each check's SPEC
    # names the fields it provides and reads; docs/checks.md).
    null_sender: bool = False                       # mail_sender_auth: MAIL FROM:<>, must be a DSN/MDN
    mailing_list: "MailingList | None" = None       # mail_list: the registered list this mail is of
    local_rcpts: dict[str, str] = field(default_factory=dict)  # rcpt_relay: address -> "service" | "unsubscribe"
    srs_rcpts: dict[str, str] = field(default_factory=dict)    # rcpt_relay: SRS address -> decoded original sender
    add_headers: list[tuple[str, str]] = field(default_factory=list)  # data_headers: (name, value) the relay adds
    findings: list[dict[str, Any]] | None = None    # data_* checks (message/findings.py); None: none ran
    parsed_headers: Any = None      # (message bytes, ParsedHeaders): message.parse.parsed_for's cache
    # What the SMTP server records for the checks and itself.
    data_octets: int | None = None                  # octets received in DATA (data_size)
    # The end user this transaction is charged to inside its account (limits,
    # fingerprints, the harvest guard, strikes): a trusted identity header read
    # at DATA, else the session's (SASL sub-login), else None (the account).
    identity: str | None = None

    @property
    def charged_to(self) -> tuple[str | None, str | None]:
        """(account name, identity) that limits and counters key on; the account is None without one."""
        acc = self.session.account
        return (acc.name if acc is not None else None), (self.identity or self.session.identity)

    @property
    def smtputf8(self) -> bool:
        return bool(self.mail_params.get("SMTPUTF8"))

    @property
    def body_8bit(self) -> bool:
        return str(self.mail_params.get("BODY", "7BIT")).upper() == "8BITMIME"

    def record(self, outcome: Outcome) -> None:
        self.ledger.append(outcome)

    def mark(self, name: str) -> None:
        self.timings[name] = round((time.monotonic() - self.started) * 1000.0, 3)


def session_id() -> str:
    return os.urandom(6).hex()
