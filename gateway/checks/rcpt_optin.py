"""P-OPTIN / P-OPTOUT: every recipient of list mail must be a confirmed
subscriber of that list. Answered from the registry's cache (no database
round trip on a hit); a miss asks the database once; an unreachable
registry defers (451 4.3.0), never accepts."""
from __future__ import annotations

from typing import Any

from ..registry.model import RegistryUnavailable
from ..core import replies
from ..core.transaction import Outcome, Phase
from . import contract
from .contract import CheckSpec

_REFUSAL = {
    "pending": (replies.OPTIN_NOT_SUBSCRIBED, "subscription not confirmed yet"),
    "unknown": (replies.OPTIN_NOT_SUBSCRIBED, "not subscribed"),
    "unsubscribed": (replies.OPTIN_UNSUBSCRIBED, "unsubscribed"),
}


class RcptOptin:
    name = "rcpt_optin"
    phase = Phase.RCPT

    def __init__(self, registry):
        self.registry = registry

    async def run(self, tx: Any, item: Any = None) -> Outcome:
        lst = tx.mailing_list
        if lst is None:
            return Outcome.skip(self.name, "not list mail")
        try:
            status = await self.registry.recipient_status(lst.id, item.addr)
        except RegistryUnavailable as exc:
            return Outcome.error(self.name, f"registry unavailable: {exc}", replies.REGISTRY_UNAVAILABLE)
        if status == "confirmed":
            return Outcome.ok(self.name, f"confirmed subscriber of {lst.id}")
        reply, why = _REFUSAL[status]
        return Outcome.refuse(self.name, reply, why)


def build(services) -> RcptOptin:
    return RcptOptin(services.registry)


SPEC = CheckSpec(
    name='rcpt_optin', phase=Phase.RCPT, build=build,
    summary='P-OPTIN/P-OPTOUT: list mail only to confirmed subscribers',
    position=30,
    replies=('OPTIN_NOT_SUBSCRIBED', 'OPTIN_UNSUBSCRIBED', 'REGISTRY_UNAVAILABLE'),
    services=('registry',),
    reads=('mailing_list',),
    requires=('mail_list',),
    deadline=contract.STORE)
