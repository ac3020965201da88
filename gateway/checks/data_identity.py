"""data_identity: the end user inside the account from a header the
customer's own server sets (issue 12 point 2; accounts/identity.py).

From an account listed in ``[identity] trusted_accounts``, the first of the
``[identity] headers`` fields present (``X-AuthUser``, ``X-PHP-Script``, in
that order by default) names the transaction's identity
(``Transaction.identity``, which ``Transaction.charged_to`` prefers to the
session's SASL sub-login). From any other account the fields are ignored:
they are removed from every relayed copy all the same (delivery/finalize.py),
so no one can forge one to frame another site.

The field is the customer server's word, so ambiguous evidence is not
believed: a field present twice (a script may have added its own copy to the
one its server sets) or a value with nothing usable left is recorded as a
flag and the message stays charged to the session (the account as a whole,
or its sub-login), the stricter choice. Mail that may be forwarded (a
foreign MAIL FROM of an account allowed to forward) is not read: its header
block is the original author's.

The check never refuses. It runs early in the data phase, before the checks
that charge per identity at DATA (data_rate, data_bulk). The RCPT-phase limits
(rcpt_rate, rcpt_harvest) ran before the message was seen: they charge a
header identity's mail to the session (docs/sender-auth.md).
"""
from __future__ import annotations

from typing import Any

from ..accounts.identity import IdentitySettings, from_header
from ..core.transaction import Outcome, Phase
from ..message.parse import parsed_for
from .contract import CheckSpec


class IdentityHeader:
    name = "data_identity"
    phase = Phase.DATA

    def __init__(self, settings: IdentitySettings):
        self.settings = settings
        self.trusted = frozenset(settings.trusted_accounts)

    async def run(self, tx: Any, item: Any = None) -> Outcome:
        account = tx.session.account
        if account is None or account.name not in self.trusted:
            return Outcome.skip(self.name, "identity headers not trusted from this account")
        fwd = tx.forwarding
        if fwd is not None and fwd.kind == "forward" and not fwd.own_envelope:
            return Outcome.skip(self.name, "forwarded mail: the header block is the original author's")
        if tx.message is None:
            return Outcome.skip(self.name, "no message")
        headers = parsed_for(tx)
        for field_name in self.settings.headers:
            values = headers.get_all(field_name)
            if not values:
                continue
            if len(values) > 1:
                return Outcome.flag(self.name, f"{field_name} appears {len(values)} times: not believed")
            identity = from_header(values[0], self.settings.max_length)
            if identity is None:
                return Outcome.flag(self.name, f"{field_name} holds no usable identity")
            tx.identity = identity
            return Outcome.ok(self.name, f"identity {identity} from {field_name}")
        return Outcome.skip(self.name, "no identity header")


def build(services: Any) -> IdentityHeader:
    settings = getattr(services.config, "identity", None) or IdentitySettings()
    return IdentityHeader(settings)


SPEC = CheckSpec(
    name='data_identity', phase=Phase.DATA, build=build,
    summary='P-LOAD: the end user inside the account, from a trusted identity header',
    position=25,
    settings=('identity',),
    provides=('identity',),
    reads=('parsed_headers', 'forwarding'))
