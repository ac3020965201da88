"""Checks, one module per check, named by the SMTP phase they act in.

Each module defines a check class (``name``, ``phase``, ``async run(tx, item)``)
and ``build(services)``. The table below is the one list of checks a config
may name; ``[checks]`` in the config orders them per phase.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

from ..core.transaction import Phase

CHECKS: dict[str, Phase] = {
    "connect_limits": Phase.CONNECT,
    "connect_dnsbl": Phase.CONNECT,
    "connect_blocklist": Phase.CONNECT,
    "helo_blocklist": Phase.HELO,
    "mail_account_status": Phase.MAIL,
    "mail_sender_auth": Phase.MAIL,
    "mail_size": Phase.MAIL,
    "mail_dnsbl": Phase.MAIL,
    "mail_blocklist": Phase.MAIL,
    "mail_domain_exists": Phase.MAIL,
    "mail_list": Phase.MAIL,
    "rcpt_relay": Phase.RCPT,
    "rcpt_limit": Phase.RCPT,
    "rcpt_optin": Phase.RCPT,
    "data_size": Phase.DATA,
    "data_wire": Phase.DATA,
    "data_headers": Phase.DATA,
    "data_sender_auth": Phase.DATA,
    "data_from_domain": Phase.DATA,
    "data_listmail": Phase.DATA,
    "data_trace": Phase.DATA,
    "data_subject": Phase.DATA,
}


def known_checks() -> dict[str, Phase]:
    return dict(CHECKS)


def factories(services: Any) -> dict[str, Callable[[], Any]]:
    """name -> zero-argument constructor bound to the services."""
    def make(name: str) -> Callable[[], Any]:
        def build() -> Any:
            return importlib.import_module(f"{__name__}.{name}").build(services)
        return build
    return {name: make(name) for name in CHECKS}
