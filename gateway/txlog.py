"""One JSON line per transaction (orjson), written from the ledger.

A subscriber of the event bus (core/events.py): a line per ended
transaction, per session refused at connect, and per ended session whose
outcomes no line carried yet."""
from __future__ import annotations

import asyncio
import sys
import time
from typing import IO

import orjson

from .core.logsafe import json_safe
from .core.events import EventBus, Refusal, SessionEnded, TransactionEnded
from .core.transaction import Outcome, Phase, SessionInfo, Transaction


def session_fields(sess: SessionInfo) -> dict:
    d = {
        "session": sess.id,
        "listener": sess.listener,
        "client_ip": sess.peer_ip,
        "client_port": sess.peer_port,
    }
    if sess.proxied:
        d["proxied"] = True
    if sess.helo is not None:
        d["helo"] = sess.helo
    if sess.tls is not None:
        d["tls"] = {"version": sess.tls.version, "cipher": sess.tls.cipher}
    if sess.account is not None:
        d["account"] = sess.account.name
        d["auth"] = sess.auth_method
        if sess.identity is not None:
            d["identity"] = sess.identity      # a SASL sub-login's (accounts/identity.py)
    return d


def transaction_record(tx: Transaction) -> dict:
    d = {"ts": round(tx.wall_started, 3), "event": "transaction", "trace_id": tx.trace_id}
    d.update(session_fields(tx.session))
    identity = tx.charged_to[1]
    if identity is not None:
        # in clear here; the relayed copy has only its keyed hash (accounts/identity.py)
        d["identity"] = identity
    d["mail_from"] = tx.mail_from.addr if tx.mail_from is not None else None
    if tx.mail_params:
        d["mail_params"] = {k: v for k, v in tx.mail_params.items()}
    d["rcpts"] = [{"to": r.address.addr, "reply": r.reply.render() if r.reply else None,
                   **({"local": True} if r.local else {}),
                   **({"srs_to": r.relay_to} if r.relay_to else {})} for r in tx.recipients]
    d["rcpts_refused"] = tx.refused_recipients
    if tx.data_octets is not None:
        d["size"] = tx.data_octets
    d["decision"] = tx.decision
    if tx.final_reply is not None:
        d["reply"] = tx.final_reply.render()
    if tx.duplicate_risk:
        # the message may reach its recipients twice (docs/architecture.md, "Duplicates by design")
        d["duplicate_risk"] = tx.duplicate_risk
    if tx.upstream:
        d["upstream"] = tx.upstream
    if tx.upstreams_skipped:
        d["upstreams_skipped"] = list(tx.upstreams_skipped)
    fwd = tx.forwarding
    # Forwarded mail (with its evidence and both envelope senders) and SRS
    # bounces; a candidate or an own-envelope decision that came to nothing is
    # in the ledger only.
    if fwd is not None and (fwd.kind == "bounce" or fwd.state == "confirmed"):
        d["forwarded"] = fwd.as_log()
    d["ledger"] = [o.as_log() for o in tx.session.ledger] + [o.as_log() for o in tx.ledger]
    if tx.findings is not None:
        d["findings"] = tx.findings
    if tx.add_headers and tx.decision in ("relayed", "local"):
        # what the gateway wrote below its trace headers (a missing Date / Message-ID)
        d["headers_added"] = [{"name": name, "value": value} for name, value in tx.add_headers]
    d["timings_ms"] = tx.timings
    return d


def _encode(record: dict) -> bytes:
    """The record as one JSON line. A client string holding a non-UTF-8 byte
    (kept as a lone surrogate, core/logsafe.py) makes orjson refuse the
    record; then it is cleaned and encoded again, so the line is never lost."""
    try:
        return orjson.dumps(record) + b"\n"
    except TypeError:
        return orjson.dumps(json_safe(record), default=repr) + b"\n"


def _carried(sess: SessionInfo) -> None:
    sess.lines_logged += 1
    sess.ledger_logged = len(sess.ledger)


class TransactionLog:
    """Lines written in the same event-loop turn go out in one write() at the
    end of that turn (one syscall for many transactions under load, and no
    line waits longer than the turn)."""

    def __init__(self, target: str = "-"):
        self._own = target != "-"
        self._fh: IO[bytes] = open(target, "ab", buffering=0) if self._own else sys.stdout.buffer
        self._pending: list[bytes] = []
        self.last: dict | None = None  # the latest record (tests and the admin view read it)

    def write(self, record: dict) -> None:
        self.last = record
        line = _encode(record)
        if not self._pending:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop (command-line use): write at once
                self._pending.append(line)
                self.flush()
                return
        self._pending.append(line)

    def flush(self) -> None:
        if not self._pending:
            return
        data, self._pending = b"".join(self._pending), []
        self._fh.write(data)
        if not self._own:
            self._fh.flush()

    def subscribe(self, events: EventBus) -> None:
        events.subscribe(TransactionEnded, self._on_transaction_ended)
        events.subscribe(Refusal, self._on_refusal)
        events.subscribe(SessionEnded, self._on_session_ended)

    def _on_transaction_ended(self, event: TransactionEnded) -> None:
        self.transaction(event.tx)

    def _on_refusal(self, event: Refusal) -> None:
        if event.tx is None and event.outcome.phase is Phase.CONNECT:
            self.session_refused(event.session, event.outcome)

    def _on_session_ended(self, event: SessionEnded) -> None:
        self.session_end(event.session)

    def transaction(self, tx: Transaction) -> None:
        self.write(transaction_record(tx))
        _carried(tx.session)

    def session_refused(self, sess: SessionInfo, outcome: Outcome) -> None:
        d = {"ts": round(time.time(), 3), "event": "session_refused"}
        d.update(session_fields(sess))
        d["ledger"] = [o.as_log() for o in sess.ledger]
        d["reply"] = outcome.reply.render() if outcome.reply else None
        self.write(d)
        _carried(sess)

    def session_end(self, sess: SessionInfo) -> bool:
        """The session's closing line, written when no other line of this
        session was (a failed or suspended AUTH, a refused HELO, a client that
        only connected) or when its ledger holds outcomes no line carried yet
        (e.g. a failed AUTH after the last transaction). True if written."""
        if sess.lines_logged and sess.ledger_logged >= len(sess.ledger):
            return False
        d = {"ts": round(time.time(), 3), "event": "session"}
        d.update(session_fields(sess))
        d["ended"] = sess.ended
        d["transactions"] = sess.transactions
        d["duration_ms"] = round((time.time() - sess.started) * 1000.0, 1)
        d["ledger"] = [o.as_log() for o in sess.ledger[sess.ledger_logged:]]
        self.write(d)
        _carried(sess)
        return True

    def close(self) -> None:
        self.flush()
        if self._own:
            self._fh.close()
