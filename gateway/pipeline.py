"""Runs the checks of an SMTP phase in configured order.

Each check is a small object with a ``name``, the ``phase`` it acts in and an
async ``run(tx, item)`` that returns an :class:`Outcome`. The pipeline records
every outcome in the ledger and stops at the first refusal (a FAIL, or an
ERROR that carries a reply, i.e. a deferral). A check that raises is a bug on
our side: it is recorded as an error and the client is deferred with
451 4.3.0, never bounced.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol, Sequence

from .core import replies
from .core.transaction import Outcome, Phase, Result, Verdict

log = logging.getLogger("gateway.pipeline")


class Check(Protocol):
    name: str
    phase: Phase

    async def run(self, tx: Any, item: Any = None) -> Outcome:  # pragma: no cover - protocol
        ...


@dataclass
class Pipeline:
    phases: dict[Phase, list[Check]] = field(default_factory=dict)
    on_outcome: Callable[[Outcome], None] | None = None  # metrics hook

    def checks(self, phase: Phase) -> Sequence[Check]:
        return self.phases.get(phase, ())

    def names(self, phase: Phase) -> list[str]:
        return [c.name for c in self.checks(phase)]

    async def run(self, phase: Phase, tx: Any, ledger: list[Outcome], item: Any = None,
                  item_label: str | None = None) -> Verdict:
        outcomes: list[Outcome] = []
        for check in self.checks(phase):
            try:
                outcome = await check.run(tx, item)
            except Exception as exc:  # a bug in a check must never bounce mail
                log.exception("check %s raised", check.name)
                outcome = Outcome.error(check.name, f"internal error: {type(exc).__name__}",
                                        replies.INTERNAL_ERROR)
            outcome.phase = phase
            if item_label is not None and outcome.item is None:
                outcome.item = item_label
            ledger.append(outcome)
            outcomes.append(outcome)
            if self.on_outcome is not None:
                self.on_outcome(outcome)
            if outcome.result in (Result.FAIL, Result.ERROR) and outcome.refuses:
                return Verdict(outcomes, outcome)
        return Verdict(outcomes)


def build_pipeline(order: dict[Phase, Iterable[str]], factories: dict[str, Callable[[], Check]],
                   on_outcome: Callable[[Outcome], None] | None = None) -> Pipeline:
    """Instantiate the configured checks in order; unknown names raise KeyError."""
    phases: dict[Phase, list[Check]] = {}
    for phase, names in order.items():
        built: list[Check] = []
        for name in names:
            check = factories[name]()
            if check.phase is not phase:
                raise ValueError(f"check {name!r} acts in phase {check.phase.value}, not {phase.value}")
            built.append(check)
        phases[phase] = built
    return Pipeline(phases, on_outcome)
