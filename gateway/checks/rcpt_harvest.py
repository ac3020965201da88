"""P-HARVEST: the harvest guard. A client that collects refused recipients
(address probing) is slowed, then cut off, and recorded.

What is counted: every permanent (5xx) refusal of one recipient the client
got, ours (a check, the relay rule) or the upstream's (its RCPT answer, a list
copy it refused), i.e. each :class:`~gateway.core.events.Refusal` with a
``recipient``. Transient refusals (452 too many recipients, 451 deferrals,
our own P-HARVEST replies) are not, nor the rate limiter's 550 to a retry
storm (``rcpt_rate``'s RATE_STORM): they say nothing about whether an address
exists.

- Per session (in memory): after ``[harvest] tarpit_after`` refused
  recipients each further RCPT reply waits (the tarpit) ``tarpit_delay``
  seconds, doubling with each refusal, at most ``tarpit_max``; past
  ``max_refused_per_session`` the RCPT is answered 421 4.7.0 and the session
  is closed (smtp/server.py closes after any 421), with one
  ``Violation(kind="harvest")``.
- Across sessions (``services.counters``: memory or Redis, fixed windows of
  ``window`` seconds): per client IP, per account and per identity
  (``Transaction.charged_to``). Past a limit, new RCPTs of that IP, account
  or identity are deferred (451 4.7.1) until the window ends; the refusal
  that crosses the limit publishes one Violation for the window (Redis
  INCRBY answers each increment with the exact shared count, so one
  Violation per window across gateways too).

The tarpit waits inside this check, under its deadline: the config refuses a
``tarpit_max`` that does not leave 1 s of it (config._validate_harvest).
Refusals are counted as they are published (a plain subscriber, no I/O) and
written to the counters at the next RCPT this gateway checks, before it reads
them; so a session sees every refusal before its own next RCPT.

In ``warn`` mode nothing waits and no Violation is published; the pipeline
records what would have been refused.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from ..core import replies
from ..core.events import EventBus, Refusal, SessionEnded, Violation
from ..core.transaction import Outcome, Phase
from . import contract
from .contract import CheckSpec

log = logging.getLogger("gateway.harvest")

NAME = "rcpt_harvest"
# refusals that are about the sender, not the address: never counted
NOT_ABOUT_THE_ADDRESS = frozenset({NAME, "rcpt_rate"})
MAX_PENDING = 100_000   # distinct counter keys waiting for the next RCPT (a bound, never reached in practice)


class HarvestGuard:
    """The counts: per session in memory, per IP/account/identity on the counters."""

    def __init__(self, settings: Any, counters: Any, events: EventBus | None, enforce: bool = True):
        self.settings = settings
        self.counters = counters
        self.events = events
        self.enforce = enforce
        self.session_refused: dict[str, int] = {}
        # counter key -> [refusals not yet counted, limit, the last such refusal]
        self._pending: dict[str, list[Any]] = {}
        self._dropped = False
        if events is not None:
            events.subscribe(Refusal, self._on_refusal)
            events.subscribe(SessionEnded, self._on_session_ended)

    def keys(self, ip: str, account: str | None, identity: str | None) -> list[tuple[str, int, str]]:
        """(counter key, limit, what) of a client IP, account and identity; limits of 0 are off."""
        s = self.settings
        out = [(f"harvest:ip:{ip}", s.max_refused_per_ip, f"client IP {ip}")]
        if account is not None:
            out.append((f"harvest:acct:{account}", s.max_refused_per_account, f"account {account}"))
            if identity is not None:
                out.append((f"harvest:id:{account}/{identity}", s.max_refused_per_identity,
                            f"identity {account}/{identity}"))
        return [k for k in out if k[1] > 0]

    # -------------------------------------------------------------- events (no I/O)
    def _on_refusal(self, event: Refusal) -> None:
        reply = event.outcome.reply
        if (event.recipient is None or reply is None or reply.code < 500
                or event.outcome.check in NOT_ABOUT_THE_ADDRESS):
            return
        sid = event.session.id
        self.session_refused[sid] = self.session_refused.get(sid, 0) + 1
        if self.counters is None:
            return
        account, identity = _charged_to(event)
        for key, limit, _ in self.keys(event.session.peer_ip, account, identity):
            pending = self._pending.get(key)
            if pending is not None:
                pending[0] += 1
                pending[2] = event
            elif len(self._pending) < MAX_PENDING:
                self._pending[key] = [1, limit, event]
            elif not self._dropped:
                self._dropped = True
                log.warning("harvest guard: more than %d counter keys waiting; refusals of new keys are not "
                            "counted across sessions until the next RCPT", MAX_PENDING)

    def _on_session_ended(self, event: SessionEnded) -> None:
        self.session_refused.pop(event.session.id, None)

    # ------------------------------------------------------------ counters (I/O)
    async def flush(self) -> None:
        """Write the refusals counted since the last RCPT to the counters; a
        refusal that takes a count past its limit publishes the Violation."""
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        self._dropped = False
        window = self.settings.window
        for key, (amount, limit, event) in pending.items():
            count = await self.counters.incr(key, window, amount)
            limit = self.counters.scaled(limit)
            if count - amount <= limit < count:
                account, identity = _charged_to(event)
                self._violation(event.session, event.tx, account, identity,
                                f"{count} refused recipients in {window:g} s > {limit} ({key})",
                                replies.HARVEST_DEFERRED)

    async def over(self, ip: str, account: str | None, identity: str | None) -> tuple[str, int, int] | None:
        """The first (what, count, limit) past its limit in this window, else None."""
        if self.counters is None:
            return None
        keys = self.keys(ip, account, identity)
        counts = await self.counters.get_many([k for k, _, _ in keys], self.settings.window)
        for (_, limit, what), count in zip(keys, counts):
            limit = self.counters.scaled(limit)
            if count > limit:
                return what, count, limit
        return None

    def tarpit(self, refused: int) -> float:
        """Seconds to wait before the reply to a RCPT after ``refused`` refused recipients."""
        s = self.settings
        if s.tarpit_delay <= 0 or refused <= s.tarpit_after:
            return 0.0
        return float(min(s.tarpit_max, s.tarpit_delay * 2 ** min(refused - s.tarpit_after - 1, 30)))

    def _violation(self, session: Any, tx: Any, account: str | None, identity: str | None, detail: str,
                   reply: Any) -> None:
        if self.events is not None and self.enforce:
            self.events.publish(Violation(session, "P-HARVEST", "harvest", detail, account, identity, tx,
                                          reply.render()))


class RcptHarvest:
    name = NAME
    phase = Phase.RCPT

    def __init__(self, guard: HarvestGuard):
        self.guard = guard

    async def run(self, tx: Any, item: Any = None) -> Outcome:
        guard = self.guard
        settings = guard.settings
        await guard.flush()
        session = tx.session
        refused = guard.session_refused.get(session.id, 0)
        limit = settings.max_refused_per_session
        account, identity = tx.charged_to
        if limit and refused > limit:
            detail = f"{refused} refused recipients in this session > {limit}"
            guard._violation(session, tx, account, identity, detail, replies.HARVEST_SESSION)
            return Outcome.refuse(self.name, replies.HARVEST_SESSION, detail)
        wait = guard.tarpit(refused)
        if wait and guard.enforce:
            await asyncio.sleep(wait)
        over = await guard.over(session.peer_ip, account, identity)
        if over is not None:
            what, count, cap = over
            return Outcome.refuse(self.name, replies.HARVEST_DEFERRED,
                                  f"{what}: {count} refused recipients in {settings.window:g} s > {cap}")
        if wait:
            return Outcome.ok(self.name, f"tarpit {wait:g} s after {refused} refused recipients"
                                         + ("" if guard.enforce else " (warn mode: not waited)"))
        return Outcome.ok(self.name)


def _charged_to(event: Refusal) -> tuple[str | None, str | None]:
    if event.tx is not None:
        return event.tx.charged_to
    account = event.session.account
    return (account.name if account is not None else None), event.session.identity


def build(services: Any) -> RcptHarvest:
    cfg = services.config
    guard = HarvestGuard(cfg.harvest, services.counters, services.events,
                         enforce=cfg.checks.mode(NAME) == "enforce")
    return RcptHarvest(guard)


SPEC = CheckSpec(
    name=NAME, phase=Phase.RCPT, build=build,
    summary='P-HARVEST: refused recipients tarpitted, then cut off, per session, IP, account, identity',
    position=5,
    replies=('HARVEST_SESSION', 'HARVEST_DEFERRED'),
    settings=('harvest',),
    services=('counters', 'events'),
    # the tarpit waits here (at most [harvest] tarpit_max, 10 s by default) and
    # the counters may make a Redis round trip each
    deadline=contract.DNS,
    # Not measured on real mail yet: a newsletter through a smarthost may meet
    # many upstream 550s (stale addresses) in one session. Until the figures
    # are in, it records what it would do; [checks.modes] rcpt_harvest = "enforce".
    default_mode="warn")
