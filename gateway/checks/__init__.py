"""Checks, one module per check, named by the SMTP phase they act in.

Each module defines a check class (``name``, ``phase``, ``async run(tx,
item)``), ``build(services)`` and its contract, ``SPEC`` (see
:mod:`gateway.checks.contract`). The table below is read from those
declarations: adding a check is adding one module (and its tests); the
config's ``[checks]`` orders the checks per phase, ``DEFAULT_CHECKS`` (the
default order) comes from the modules' ``position``.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable

from ..core.transaction import Phase
from .contract import CheckSpec

# The phases the server runs checks in. AUTH has none: failed logins are
# limited by [auth] (smtp/server.py), a suspended account by mail_account_status.
PHASES: tuple[Phase, ...] = (Phase.CONNECT, Phase.HELO, Phase.MAIL, Phase.RCPT, Phase.DATA)
_PREFIXES = tuple(f"{phase.value}_" for phase in PHASES)


def _discover() -> dict[str, CheckSpec]:
    specs: list[CheckSpec] = []
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith(_PREFIXES):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        spec = getattr(module, "SPEC", None)
        if not isinstance(spec, CheckSpec) or spec.name != info.name:
            raise ImportError(f"{module.__name__} declares no SPEC named {info.name!r} (gateway/checks/contract.py)")
        specs.append(spec)
    order = {phase: i for i, phase in enumerate(Phase)}
    specs.sort(key=lambda s: (order[s.phase], s.position, s.name))
    table = {s.name: s for s in specs}
    for s in specs:
        for dep in s.requires:
            if dep not in table:
                raise ImportError(f"check {s.name!r} requires {dep!r}, which is no check")
    return table


SPECS: dict[str, CheckSpec] = _discover()

# name -> phase: the one list of checks a config may name
CHECKS: dict[str, Phase] = {name: spec.phase for name, spec in SPECS.items()}


def default_order() -> dict[str, list[str]]:
    """phase name -> the checks it runs by default, in order."""
    return {phase.value: [s.name for s in SPECS.values() if s.phase is phase and s.in_default_order]
            for phase in PHASES}


def known_checks() -> dict[str, Phase]:
    return dict(CHECKS)


def factories(services: Any) -> dict[str, Callable[[], Any]]:
    """name -> zero-argument constructor bound to the services."""
    def make(spec: CheckSpec) -> Callable[[], Any]:
        return lambda: spec.build(services)
    return {name: make(spec) for name, spec in SPECS.items()}
