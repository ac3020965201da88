"""P-LOAD: recipients and messages per account and per identity inside it,
per minute, hour and day (issue 12; settings ``[limits]``,
gateway/state/limitsettings.py; docs/checks.md "rcpt_rate").

**Charged per recipient, at RCPT.** Every applicable window is charged at
once through ``services.rate_limiter`` (GCRA, memory or Redis;
``acquire_all``: one Redis round trip for all windows): the
account's, and the identity's when the transaction has one
(``Transaction.charged_to``). The message windows are charged with the
first recipient of a transaction that is charged (a message is a
transaction with at least one accepted recipient). All windows are charged
or none: if any window refuses, nothing is charged, so a refusal costs
nothing: ``451 4.7.1 P-LOAD <limit> exceeded, try again later``. The
limiter's retry_after goes to the ledger and the log only: it is the wait
for that one window on this node's view, another window or another gateway
may still refuse then, and a client told "retry in 3 s" that is refused
again is worse off than one left to its queue's back-off.

**Charge only what was relayed.** The check remembers what it charged per
transaction and listens to the event bus: a recipient refused after it
(by the upstream at RCPT or at DATA, or by delivery's own bounds) is
refunded when its :class:`Refusal` is published; a transaction that ends
without being relayed (refused, deferred, aborted) has everything left
refunded at its :class:`TransactionEnded`. Refunds run as small tasks; a
subscriber never changes a reply. Recipients the gateway handles itself
(``tx.local_rcpts``: service mail, unsubscribe) are never charged.

**Retry storms.** A sender (the identity if there is one, else the
account) refused by this check more than ``storm_refusals`` times within
``storm_window`` is tarpitted: each further 451 waits ``tarpit_min``,
growing to ``tarpit_max`` seconds (at most 10, and never more than half of
smtp.command_timeout). Past three times ``storm_refusals`` it gets
``550 5.7.1 P-LOAD`` (RATE_STORM) instead of the 451 while it stays over
the limit, and one ``Violation(kind="rate_storm")`` is published per
window. A legitimate MTA retrying its queue produces one refusal per
deferred recipient per queue run, and runs its queue every 5 to 15
minutes: with the defaults (500 refusals per 15 minutes) a queue of up to
500 deferred recipients is not even slowed, and a bounce needs 1500
refusals within one window, which only a client that ignores the 451s
(a script in a loop) reaches. In warn mode the check neither tarpits nor
publishes the violation.
"""
from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from ..core import replies
from ..core.events import EventBus, Refusal, TransactionEnded, Violation
from ..core.transaction import Outcome, Phase, Transaction
from ..state.limitsettings import WINDOWS, LimitSettings
from ..state.ratelimit import Charge, Rate, RateLimiter
from .contract import STORE, CheckSpec

log = logging.getLogger("gateway.checks.rcpt_rate")

MAX_OPEN = 100_000          # transactions remembered at once (each ends with a TransactionEnded)


@dataclass
class _Charged:
    recipients: list[tuple[str, list[Charge]]] = field(default_factory=list)   # (address, charges)
    message: list[Charge] = field(default_factory=list)


def _limited(limit: str) -> replies.Rendered:
    """RATE_LIMITED naming the limit that refused: ``451 4.7.1 P-LOAD <limit> exceeded, try again later``."""
    r = replies.RATE_LIMITED
    return replies.Rendered(r.code, r.enhanced, f"{r.rule} {limit} exceeded, try again later")


def _q(s: str) -> str:
    return quote(s, safe="@.-_+")


class RcptRate:
    name = "rcpt_rate"
    phase = Phase.RCPT

    def __init__(self, settings: LimitSettings, limiter: RateLimiter | None, counters: Any,
                 events: EventBus | None, warn: bool = False, command_timeout: float = 300.0):
        self.settings = settings
        # The tarpit never takes more than half of the client's wait for our RCPT reply (our
        # smtp.command_timeout stands for it: RFC 5321 4.5.3.2 gives clients 5 minutes).
        self.tarpit_cap = command_timeout / 2
        self.limiter = limiter
        self.counters = counters
        self.events = events
        self.warn = warn
        self._open: OrderedDict[str, _Charged] = OrderedDict()   # trace id -> what this check charged
        self._tasks: set[asyncio.Task] = set()
        self.refunded = 0           # recipients refunded (for tests and metrics)
        if events is not None:
            events.subscribe(Refusal, self._on_refusal)
            events.subscribe(TransactionEnded, self._on_ended)

    # ------------------------------------------------------------------ windows
    def _windows(self, account: str, identity: str | None, message: bool,
                 account_scope: bool = True) -> list[tuple[str, str, Rate]]:
        """(limit name, limiter key, rate) of every window that applies, 0s left out
        (``account_scope=False``: the identity's windows only)."""
        values = self.settings.for_account(account)
        scopes = [("", f"{_q(account)}")] if account_scope else []
        if identity is not None:
            scopes.append(("identity_", f"{_q(account)}/{_q(identity)}"))
        out = []
        for prefix, who in scopes:
            kinds = [("recipients", "rcpt")] + ([("messages", "msg")] if message else [])
            for kind, tag in kinds:
                for window, seconds in WINDOWS.items():
                    name = f"{prefix}{kind}_per_{window}"
                    limit = values.get(name, 0)
                    if limit > 0:
                        out.append((name, f"{tag}:{who}:{window[0]}", Rate(limit, seconds)))
        return out

    # ---------------------------------------------------------------------- run
    async def run(self, tx: Transaction, item: Any = None) -> Outcome:
        account, identity = tx.charged_to
        if account is None or self.limiter is None:
            return Outcome.skip(self.name, "no account" if account is None else "no rate limiter")
        address = getattr(item, "addr", str(item))
        if address in tx.local_rcpts:
            return Outcome.skip(self.name, "handled by the gateway itself, not charged")
        charged = self._open.get(tx.trace_id)
        first = charged is None or not charged.recipients
        windows = self._windows(account, identity, message=first)
        if not windows:
            return Outcome.ok(self.name, "no limit")
        refused, decision = await self.limiter.acquire_all([(key, rate) for _, key, rate in windows])
        if refused is not None:
            name, _, rate = windows[refused]
            return await self._over(tx, account, identity, name, rate, decision.retry_after)
        if charged is None:
            charged = self._open[tx.trace_id] = _Charged()
            while len(self._open) > MAX_OPEN:   # a transaction whose end was never published (a bug): forgotten
                self._open.popitem(last=False)
        charged.recipients.append((address, [(k, r) for n, k, r in windows if "recipients" in n]))
        if first:
            charged.message = [(k, r) for n, k, r in windows if "messages" in n]
        return Outcome.ok(self.name)

    async def _over(self, tx: Transaction, account: str, identity: str | None, name: str, rate: Rate,
                    retry_after: float) -> Outcome:
        who = account if identity is None else f"{account}/{identity}"
        detail = f"{name} {rate.limit}/{rate.period:g}s for {who}, retry after {retry_after:.0f} s"
        s = self.settings
        if s.storm_refusals <= 0 or self.counters is None:
            return Outcome.refuse(self.name, _limited(name), detail)
        key = f"rate_storm:{_q(account)}" + (f"/{_q(identity)}" if identity is not None else "")
        n = await self.counters.incr(key, s.storm_window)
        limit = s.storm_refusals
        if n > 3 * limit:
            detail = f"retry storm ({n} refusals in {s.storm_window:g} s): {detail}"
            reply = replies.RATE_STORM.with_suffix(f": {name}")
            if n == 3 * limit + 1 and not self.warn and self.events is not None:
                self.events.publish(Violation(tx.session, "P-LOAD", "rate_storm", detail, account, identity, tx,
                                              reply.render()))
            return Outcome.refuse(self.name, reply, detail)
        if n > limit and not self.warn:
            delay = s.tarpit_min + (s.tarpit_max - s.tarpit_min) * min(1.0, (n - limit) / (2 * limit))
            delay = min(delay, self.tarpit_cap)
            await asyncio.sleep(delay)
            detail = f"tarpit {delay:.2f} s ({n} refusals in {s.storm_window:g} s): {detail}"
        return Outcome.refuse(self.name, _limited(name), detail)

    # ---------------------------------------------------------------- refunds
    def _on_refusal(self, event: Refusal) -> None:
        """A recipient refused after this check charged it: not relayed, not charged."""
        tx, recipient = event.tx, event.recipient
        if tx is None or recipient is None or event.outcome.check == self.name:
            return
        charged = self._open.get(tx.trace_id)
        if charged is None:
            return
        for i, (address, charges) in enumerate(charged.recipients):
            if address == recipient:
                del charged.recipients[i]
                back = list(charges)
                if not charged.recipients:          # no recipient left: no message either
                    back += charged.message
                    charged.message = []
                self._refund(back, 1)
                return

    def _on_ended(self, event: TransactionEnded) -> None:
        """The end of a transaction: what was not relayed goes back."""
        tx = event.tx
        charged = self._open.pop(tx.trace_id, None)
        if charged is None or tx.decision == "relayed":
            return
        back = [c for _, charges in charged.recipients for c in charges] + charged.message
        self._refund(back, len(charged.recipients))

    def _refund(self, charges: list[Charge], recipients: int) -> None:
        if not charges or self.limiter is None:
            return
        self.refunded += recipients
        task = asyncio.get_running_loop().create_task(self._give_back(charges))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _give_back(self, charges: list[Charge]) -> None:
        assert self.limiter is not None
        try:
            await self.limiter.refund_all(charges)
        except Exception:   # never reaches a client; the units simply stay charged
            log.exception("rcpt_rate: refund failed")

    async def settled(self) -> None:
        """Wait for the refunds under way (tests; shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def build(services, cls: type[RcptRate] = RcptRate) -> RcptRate:
    """The check (``cls``: this one, or data_rate's on it) with its settings and services."""
    cfg = services.config
    return cls(cfg.limits, services.rate_limiter, services.counters, services.events,
               warn=cfg.checks.mode(cls.name) == "warn", command_timeout=cfg.smtp.command_timeout)


SPEC = CheckSpec(
    name='rcpt_rate', phase=Phase.RCPT, build=build,
    summary='P-LOAD: recipients and messages per account and identity, per minute, hour and day',
    position=90,
    settings=('limits',),
    services=('rate_limiter', 'counters', 'events'),
    reads=('local_rcpts',),
    deadline=STORE,
    replies=('RATE_LIMITED', 'RATE_STORM'))
