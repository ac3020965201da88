"""The gateway's events: what happened to a session or a transaction, told to
whoever listens (the transaction log, the metrics; later the strike ladder,
the harvest guard, the message log).

Seven kinds, one frozen dataclass each:

- :class:`OutcomeRecorded`: a check's outcome, as the pipeline records it;
- :class:`Refusal`: a refusal the client gets, ours or the upstream's, for a
  session (connect, HELO, AUTH), a transaction (MAIL, DATA) or one recipient;
- :class:`TransactionEnded`: a transaction is over, whatever ended it
  (relayed, refused, deferred, aborted by RSET/QUIT/disconnect/timeout);
- :class:`DuplicateRisk`: after the client's reply to DATA (or its failed
  attempt), a window opened where a copy may be out while the client will
  send the message again (docs/architecture.md, "Duplicates by design");
  published before the transaction's :class:`TransactionEnded`;
- :class:`Authenticated`: a session authenticated with SMTP AUTH (a failed
  or refused AUTH is a :class:`Refusal` in phase AUTH);
- :class:`SessionEnded`: a connection is gone, also one that never reached
  MAIL (failed AUTH, refused HELO, a connect cap);
- :class:`Violation`: the evidence that an account (or an identity inside
  it) broke a policy rule is clear (a retry storm against a limit, bulk mail
  to people who did not ask, recipient harvesting): what the strike ladder
  of issue 13 counts. Published beside the :class:`Refusal` the client got.

Subscribers are plain functions called in the order they subscribed, in the
same event-loop turn, before the client gets the reply the event is about.
They must be quick; one that needs I/O starts its own task. A subscriber that
raises is logged and skipped: it never changes a reply, never stops the other
subscribers and never makes the gateway relay a message twice.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, TypeVar, Union

from .transaction import Outcome, SessionInfo, Transaction

log = logging.getLogger("gateway.events")


@dataclass(frozen=True, slots=True)
class OutcomeRecorded:
    outcome: Outcome


@dataclass(frozen=True, slots=True)
class Refusal:
    session: SessionInfo
    outcome: Outcome                 # its reply is what the client got
    tx: Transaction | None = None    # None: a session refusal (connect, HELO, AUTH)
    recipient: str | None = None     # the RCPT (or list copy) refused, else None
    by: str = "gateway"              # "gateway": our check; "upstream": the upstream MTA's answer


@dataclass(frozen=True, slots=True)
class TransactionEnded:
    tx: Transaction                  # tx.decision and tx.final_reply say how


@dataclass(frozen=True, slots=True)
class DuplicateRisk:
    tx: Transaction                  # tx.duplicate_risk lists every cause of the transaction
    cause: str                       # client_gone | upstream_timeout_after_data | upstream_lost_after_data
    #                                  | local_kept_relay_deferred


@dataclass(frozen=True, slots=True)
class Authenticated:
    session: SessionInfo             # session.account, auth_login and auth_method are set


@dataclass(frozen=True, slots=True)
class SessionEnded:
    session: SessionInfo             # session.ended says how


@dataclass(frozen=True, slots=True)
class Violation:
    session: SessionInfo
    rule: str                        # the POLICY rule id: P-LOAD, P-UCE, P-HARVEST, ...
    kind: str                        # what was seen, a short stable name: "rate_storm", "bulk", "repeat", "harvest"
    detail: str                      # for the operator (never shown to the client)
    account: str | None = None       # who it is charged to (Transaction.charged_to); None: no account
    identity: str | None = None
    tx: Transaction | None = None    # the transaction it was seen in, if any
    reply: str = ""                  # the reply the client got for it (from now on, for a cross-session limit)


Event = Union[OutcomeRecorded, Refusal, TransactionEnded, DuplicateRisk, Authenticated, SessionEnded, Violation]
E = TypeVar("E", OutcomeRecorded, Refusal, TransactionEnded, DuplicateRisk, Authenticated, SessionEnded, Violation)


class EventBus:
    def __init__(self) -> None:
        self._subscribers: dict[type, list[Callable]] = {}

    def subscribe(self, kind: type[E], subscriber: Callable[[E], None]) -> None:
        self._subscribers.setdefault(kind, []).append(subscriber)

    def wants(self, kind: type) -> bool:
        return kind in self._subscribers

    def publish(self, event: Event) -> None:
        subscribers = self._subscribers.get(type(event))
        if not subscribers:
            return
        for subscriber in subscribers:
            try:
                subscriber(event)
            except Exception:  # an observer's bug never reaches the protocol
                log.exception("event subscriber %s failed on %s",
                              getattr(subscriber, "__qualname__", subscriber), type(event).__name__)

    def outcome(self, outcome: Outcome) -> None:
        """The pipeline's ``on_outcome`` hook: cheap while nobody listens."""
        if OutcomeRecorded in self._subscribers:
            self.publish(OutcomeRecorded(outcome))


__all__ = ["Authenticated", "DuplicateRisk", "Event", "EventBus", "OutcomeRecorded", "Refusal", "SessionEnded",
           "TransactionEnded", "Violation"]
