"""The check contract: what every check module declares about itself.

Each module in ``gateway/checks/`` ends with a ``SPEC = CheckSpec(...)``. The
table of checks (``gateway.checks.CHECKS``), the default order
(``gateway.config.DEFAULT_CHECKS``), the config check (a check named in the
wrong phase, a mandatory check left out, an order that runs a check before
one whose result it needs) and the pipeline's per-check deadlines are all
derived from these declarations; nothing else lists the checks.

A module imports neither ``gateway.config`` nor ``gateway.services``: the
config imports the check table, so the contract names settings and services
by their key instead (``"dnsbl"`` is ``[dnsbl]`` in the config and
``Services.dnsbl`` in the app).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

from ..core import replies as _replies
from ..core.transaction import Phase

Mode = Literal["enforce", "warn", "off"]
MODES: tuple[str, ...] = ("enforce", "warn", "off")

# Default deadlines, seconds. A pure check (no I/O) finishes in microseconds;
# its deadline only catches a bug. A check that asks the registry or the
# account store may wait for a database round trip. A DNS check may make
# several lookups one after the other, each bounded by [dns] timeout (2 s by
# default): its deadline leaves room for those, so the resolver's own
# verdict (a DNS tempfail with its own reply) comes first.
PURE = 5.0
STORE = 15.0
DNS = 30.0


@dataclass(frozen=True)
class CheckSpec:
    """One check, as its module declares it.

    ``position``: its place in the default order of its phase (lower first).
    ``settings``: the config sections or keys it reads. ``services``: the
    fields of :class:`gateway.services.Services` it uses. ``provides``: the
    typed fields of the transaction it sets for later checks and for
    delivery; ``reads``: the ones set by others it looks at. ``requires``:
    checks whose result it needs; each must be configured (not ``off``) and
    run before it. ``mandatory``: the config is refused without it, and it
    runs in ``enforce`` mode only. ``replies``: the names of the catalogue
    entries (``gateway/core/replies.py``) it can refuse with, directly or
    through the rules it runs (message findings, the DNS domain verdict);
    the 451 4.3.0 ``INTERNAL_ERROR`` of a check that raises or overruns is the
    pipeline's, listed by no check.
    """

    name: str
    phase: Phase
    build: Callable[[Any], Any]
    summary: str
    position: int
    settings: tuple[str, ...] = ()
    services: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    mandatory: bool = False
    deadline: float = PURE
    replies: tuple[str, ...] = ()
    # The mode when [checks.modes] does not name the check: "warn" for a rule
    # whose false refusals on real mail are not measured yet (it records what
    # it would refuse; the operator enforces it once the figures are in).
    default_mode: Mode = "enforce"
    # In its phase's default order (a config that lists no [checks] <phase>
    # runs it). False for a check an operator adds on purpose: one whose cost
    # per message is not yet within budget.
    in_default_order: bool = True

    def __post_init__(self) -> None:
        if not self.name.startswith(self.phase.value + "_"):
            raise ValueError(f"check {self.name!r}: its name must start with its phase, {self.phase.value}_")
        if self.default_mode not in MODES:
            raise ValueError(f"check {self.name!r}: default_mode must be one of {', '.join(MODES)}")
        if self.mandatory and self.default_mode != "enforce":
            raise ValueError(f"check {self.name!r}: a mandatory check runs in enforce mode only")
        if self.deadline <= 0:
            raise ValueError(f"check {self.name!r}: deadline must be greater than 0")
        unknown = [r for r in self.replies if not isinstance(getattr(_replies, r, None), _replies.Reply)]
        if unknown:
            raise ValueError(f"check {self.name!r}: replies not in the catalogue (gateway/core/replies.py): "
                             + ", ".join(unknown))
