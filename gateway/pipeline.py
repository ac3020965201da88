"""Runs the checks of an SMTP phase in configured order.

Each check is a small object with a ``name``, the ``phase`` it acts in and an
async ``run(tx, item)`` that returns an :class:`Outcome`. The pipeline records
every outcome in the ledger and stops at the first refusal (a FAIL, or an
ERROR that carries a reply, i.e. a deferral). A check that raises is a bug on
our side: it is recorded as an error and the client is deferred with
451 4.3.0, never bounced.

Every check that waits (DNS, registry) runs under its deadline
(``[checks.deadlines]``, default from its SPEC); one that overruns it is an
error like one that raises: 451 4.3.0, and the ledger says it overran. A check in ``warn`` mode that would refuse is
recorded as :attr:`Result.WARN` with the reply it would have sent (ledger,
log line, metrics) and the next check runs, as Postfix's ``warn_if_reject``.
"""
from __future__ import annotations

import asyncio
import logging
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Coroutine, Generator, Iterable, Mapping, Protocol, Sequence

from .checks import SPECS
from .core import replies
from .core.transaction import Outcome, Phase, Result, Verdict
from .message.findings import warned

log = logging.getLogger("gateway.pipeline")


class Check(Protocol):
    name: str
    phase: Phase

    async def run(self, tx: Any, item: Any = None) -> Outcome:  # pragma: no cover - protocol
        ...


class CheckModes(Protocol):
    """What the pipeline reads of ``[checks]`` (config.CheckSettings)."""

    def mode(self, name: str) -> str: ...  # pragma: no cover - protocol

    def deadline(self, name: str) -> float: ...  # pragma: no cover - protocol


@types.coroutine
def _resume(coro: Coroutine[Any, Any, Outcome], waiting: Any) -> Generator[Any, None, Outcome]:
    """Go on with a check coroutine that was started by hand and now waits for
    ``waiting``: the task awaits what the check awaits; a cancellation (the
    deadline) is thrown into the check, as ``await`` would do."""
    while True:
        try:
            yield waiting
        except BaseException as exc:  # CancelledError from the deadline, passed to the check
            try:
                waiting = coro.throw(exc)
            except StopIteration as done:
                return done.value
            continue
        try:
            waiting = coro.send(None)
        except StopIteration as done:
            return done.value


def _default_deadline(name: str) -> float:
    spec = SPECS.get(name)
    return spec.deadline if spec is not None else 5.0


@dataclass
class Pipeline:
    phases: dict[Phase, list[Check]] = field(default_factory=dict)
    on_outcome: Callable[[Outcome], None] | None = None  # metrics / event hook: every outcome, warn ones too
    warn: frozenset[str] = frozenset()                    # checks in warn mode
    deadlines: dict[str, float] = field(default_factory=dict)  # seconds per check; default from its SPEC

    def checks(self, phase: Phase) -> Sequence[Check]:
        return self.phases.get(phase, ())

    def names(self, phase: Phase) -> list[str]:
        return [c.name for c in self.checks(phase)]

    def deadline(self, name: str) -> float:
        seconds = self.deadlines.get(name)
        return seconds if seconds is not None else _default_deadline(name)

    async def run(self, phase: Phase, tx: Any, ledger: list[Outcome], item: Any = None,
                  item_label: str | None = None) -> Verdict:
        outcomes: list[Outcome] = []
        on_outcome = self.on_outcome
        for check in self.phases.get(phase, ()):
            seconds = 0.0
            try:
                # Most checks finish without waiting (pure rules, cache hits): a
                # timer for each would cost more than the check (~20 us under
                # uvloop). The check is started by hand; only one that waits
                # goes on under its deadline. A check that never waits cannot
                # be interrupted by a timer anyway.
                coro = check.run(tx, item)
                try:
                    waiting = coro.send(None)
                except StopIteration as done:
                    outcome = done.value
                else:
                    seconds = self.deadline(check.name)
                    async with asyncio.timeout(seconds):
                        outcome = await _resume(coro, waiting)
            except TimeoutError:
                log.warning("check %s overran its deadline of %g s", check.name, seconds)
                outcome = Outcome.error(check.name, f"overran its deadline of {seconds:g} s",
                                        replies.INTERNAL_ERROR)
            except Exception as exc:  # a bug in a check must never bounce mail
                log.exception("check %s raised", check.name)
                outcome = Outcome.error(check.name, f"internal error: {type(exc).__name__}",
                                        replies.INTERNAL_ERROR)
            outcome.phase = phase
            if item_label is not None and outcome.item is None:
                outcome.item = item_label
            refuses = outcome.result in (Result.FAIL, Result.ERROR) and outcome.refuses
            if refuses and check.name in self.warn:
                log.warning("check %s in warn mode would refuse: %s %s", check.name,
                            outcome.reply.code if outcome.reply else "", outcome.detail)
                would = "refuse" if outcome.result is Result.FAIL else "defer"
                outcome.detail = f"warn mode, would {would}" + (f": {outcome.detail}" if outcome.detail else "")
                outcome.result = Result.WARN
                warned(tx, check.name)  # its reject findings in the log line say warn too
                refuses = False
            ledger.append(outcome)
            outcomes.append(outcome)
            if on_outcome is not None:
                on_outcome(outcome)
            if refuses:
                return Verdict(outcomes, outcome)
        return Verdict(outcomes)


def build_pipeline(order: Mapping[Phase, Iterable[str]], factories: dict[str, Callable[[], Check]],
                   on_outcome: Callable[[Outcome], None] | None = None,
                   settings: CheckModes | None = None) -> Pipeline:
    """Instantiate the configured checks in order; unknown names raise KeyError.
    ``settings`` (config.CheckSettings) gives each check its mode and deadline."""
    phases: dict[Phase, list[Check]] = {}
    warn: set[str] = set()
    deadlines: dict[str, float] = {}
    for phase, names in order.items():
        built: list[Check] = []
        for name in names:
            mode = settings.mode(name) if settings is not None else "enforce"
            if mode == "off":
                continue
            check = factories[name]()
            if check.phase is not phase:
                raise ValueError(f"check {name!r} acts in phase {check.phase.value}, not {phase.value}")
            if mode == "warn":
                warn.add(name)
            if settings is not None:
                deadlines[name] = settings.deadline(name)
            built.append(check)
        phases[phase] = built
    return Pipeline(phases, on_outcome, frozenset(warn), deadlines)
