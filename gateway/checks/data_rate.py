"""P-LOAD at DATA: the per-identity limits of an identity named by a trusted
header (issue 12 point 2; docs/sender-auth.md, "What a header identity can
limit").

``rcpt_rate`` charges at RCPT, before the message is seen, so it charges a
header identity's mail to the session: the account, or its SASL sub-login.
When ``data_identity`` has then named another identity from the header
(``Transaction.identity``), this check charges that identity's windows
(``identity_recipients_per_*`` with the recipients of the message,
``identity_messages_per_*`` with one message), all at once, in one
``acquire_all`` (one cost per window): every window or none. Over a window the message
gets ``451 4.7.1 P-LOAD <limit> exceeded, try again later`` (all of it: at
DATA a message cannot be split), and refusals count toward the same retry
storm as rcpt_rate's (tarpit, then 550 and a ``rate_storm`` violation). A
message with more recipients than an identity window's burst is refused by
that window until the sender splits it.

What was charged here is refunded as rcpt_rate's is: a recipient the
upstream refuses, or a transaction that ends without being relayed. The
account's own windows were charged at RCPT and are not charged again.
"""
from __future__ import annotations

from typing import Any

from ..core.transaction import Outcome, Phase, Transaction
from .contract import STORE, CheckSpec
from .rcpt_rate import MAX_OPEN, RcptRate, _Charged
from .rcpt_rate import build as build_rate


class DataRate(RcptRate):
    name = "data_rate"
    phase = Phase.DATA

    async def run(self, tx: Transaction, item: Any = None) -> Outcome:
        account, identity = tx.charged_to
        if account is None or self.limiter is None:
            return Outcome.skip(self.name, "no account" if account is None else "no rate limiter")
        if tx.identity is None or tx.identity == tx.session.identity:
            return Outcome.skip(self.name, "no header identity: charged at RCPT")
        addresses = [r.address.addr for r in tx.recipients
                     if r.local is None and r.address.addr not in tx.local_rcpts]
        if not addresses:
            return Outcome.skip(self.name, "no recipient to charge")
        windows = self._windows(account, identity, message=True, account_scope=False)
        if not windows:
            return Outcome.ok(self.name, "no identity limit")
        # the recipient windows charged with every recipient, the message windows with one message
        costs = [len(addresses) if "recipients" in n else 1 for n, _, _ in windows]
        refused, decision = await self.limiter.acquire_all([(k, r) for _, k, r in windows], costs)
        if refused is not None:
            name, _, rate = windows[refused]
            return await self._over(tx, account, identity, name, rate, decision.retry_after)
        rcpt_charges = [(k, r) for n, k, r in windows if "recipients" in n]
        msg_charges = [(k, r) for n, k, r in windows if "messages" in n]
        self._open[tx.trace_id] = _Charged([(a, list(rcpt_charges)) for a in addresses], msg_charges)
        while len(self._open) > MAX_OPEN:   # as in rcpt_rate: an end never published is forgotten
            self._open.popitem(last=False)
        return Outcome.ok(self.name, f"identity {identity}: {len(addresses)} recipients charged")


def build(services) -> RcptRate:
    return build_rate(services, DataRate)


SPEC = CheckSpec(
    name='data_rate', phase=Phase.DATA, build=build,
    summary="P-LOAD: a header identity's recipients and messages per minute, hour and day, at DATA",
    position=85,
    settings=('limits',),
    services=('rate_limiter', 'counters', 'events'),
    reads=('identity', 'local_rcpts'),
    deadline=STORE,
    replies=('RATE_LIMITED', 'RATE_STORM'))
