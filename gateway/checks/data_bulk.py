"""P-UCE: the bulk detector and the repeat detector (issue 12, points 4 and 5;
docs/bulk.md).

The message is fingerprinted (``message/fingerprint.py``, bounded, in slices
for big ones), and its recipients are added to the distinct count
(``state/distinct.py``) of each of its 21 band keys, per account and, when
the transaction has one, per (account, identity) (``Transaction.charged_to``;
a session without an account counts per client IP). The largest count
decides:

- more than ``[bulk] recipients_threshold`` in ``[bulk] window``: deferred,
  ``451 4.7.1 P-UCE``;
- more than ``refuse_factor`` times the threshold (the mail keeps coming):
  refused, ``550 5.7.1 P-UCE``, and a ``Violation(kind="bulk")`` published;
- a recipient who had a message of this fingerprint in the window already,
  under another Message-ID: refused, ``550 5.7.1 P-UCE``, ``Violation(kind=
  "repeat")``. A message without a Message-ID is known by its bytes.

Never counted: registered list mail (``tx.mailing_list``, set by
``mail_list``: its recipients are confirmed subscribers, checked by
``rcpt_optin``), the gateway's own service mailboxes and unsubscribe
addresses, messages without text (no keys).

Weak fingerprints (fewer than 8 shingles: "ok, thanks", "test") are counted
but never defer or refuse alone, and never count as a repeat: unrelated short
messages collide, and two short notes to one person in an hour are normal.
Over the threshold they are only flagged (the ledger and the log say so).

Counted at DATA, before the upstream answers: what the upstream then refuses
was still an attempt to send it, and a deferred message counts too (its
retry, same Message-ID, to the same recipients, adds nothing and is no
repeat). Counting only what was relayed would need a second write after the
delivery, for little: a message refused upstream is rare in a working
account.

Default mode ``warn`` (docs/bulk.md, "Modes, and the ham it refuses"): transactional mail
(codes, notifications) repeats to one recipient by nature.
"""
from __future__ import annotations

import hashlib
from typing import Any

from ..core import replies
from ..core.events import Violation
from ..core.transaction import Outcome, Phase
from ..message.fingerprint import fingerprint_async
from ..message.parse import parsed_for
from ..state.distinct import DistinctCounter, MemoryDistinct
from .contract import STORE, CheckSpec

CAP_MARGIN = 16      # members a key takes past the refusal point: past it the answer is "over" anyway


def _message_key(tx: Any) -> str:
    mid = parsed_for(tx).get("message-id")
    data = mid.strip().encode("utf-8", "surrogateescape") if mid and mid.strip() else (tx.message or b"")
    return hashlib.sha256(data).hexdigest()[:24]


class DataBulk:
    name = "data_bulk"
    phase = Phase.DATA

    def __init__(self, settings: Any, distinct: DistinctCounter, events: Any = None, mode: str = "enforce"):
        self.settings = settings
        self.distinct = distinct
        self.events = events
        self.enforcing = mode == "enforce"

    async def run(self, tx: Any, item: Any = None) -> Outcome:
        if tx.message is None:
            return Outcome.skip(self.name, "no message")
        if tx.mailing_list is not None:
            return Outcome.skip(self.name, "registered list mail: confirmed subscribers, not counted")
        rcpts = sorted({r.address.addr.lower() for r in tx.recipients if r.local is None})
        if not rcpts:
            return Outcome.skip(self.name, "no relayed recipients")
        fp = await fingerprint_async(tx.message, parsed=parsed_for(tx))
        if not fp.keys:
            return Outcome.skip(self.name, "no text to fingerprint")
        account, identity = tx.charged_to
        owner = f"a:{account}" if account is not None else f"ip:{tx.session.peer_ip}"
        keys = [f"b:{owner}:{k}" for k in fp.keys]
        if identity is not None:
            keys += [f"b:{owner}/{identity}:{k}" for k in fp.keys]
        s = self.settings
        refuse_at = self.distinct.scaled(s.refuse_at)
        threshold = min(self.distinct.scaled(s.recipients_threshold), refuse_at)
        seen = await self.distinct.add([*keys, f"m:{owner}:{_message_key(tx)}"], rcpts, s.window,
                                       cap=s.refuse_at + CAP_MARGIN)
        *bands, same_message = seen
        count = max(x.count for x in bands)
        where = f"{account or tx.session.peer_ip}"
        if identity is not None:   # the identity's own count: which end user sent them
            where += f" (identity {identity}: {max(x.count for x in bands[len(fp.keys):])})"
        if fp.weak:
            if count > threshold:
                return Outcome.flag(self.name, f"weak fingerprint ({fp.shingles} shingles) seen by {count} "
                                               f"recipients of {where} in {s.window:g} s: not enough alone")
            return Outcome.ok(self.name, f"weak fingerprint, {count} recipients")
        if s.repeat:
            before: set[str] = set().union(*(x.present for x in bands[:len(fp.keys)]))
            repeats = sorted(before - same_message.present)
            if repeats:
                detail = (f"the same fingerprint again to {len(repeats)} recipient(s) of {where} within "
                          f"{s.window:g} s under another Message-ID")
                self._violation(tx, "repeat", detail, account, identity, replies.REPEAT_REFUSED)
                return Outcome.refuse(self.name, replies.REPEAT_REFUSED, detail)
        detail = f"fingerprint seen by {count} distinct recipients of {where} in {s.window:g} s"
        if count > refuse_at:
            detail += f" (refused past {refuse_at})"
            self._violation(tx, "bulk", detail, account, identity, replies.BULK_REFUSED)
            return Outcome.refuse(self.name, replies.BULK_REFUSED, detail)
        if count > threshold:
            return Outcome.refuse(self.name, replies.BULK_DEFERRED, detail + f" (deferred past {threshold})")
        return Outcome.ok(self.name, f"{count} recipients")

    def _violation(self, tx: Any, kind: str, detail: str, account: str | None, identity: str | None,
                   reply: Any) -> None:
        # only when the refusal is real: in warn mode the client is not refused, so there is no violation
        if self.enforcing and self.events is not None:
            self.events.publish(Violation(tx.session, "P-UCE", kind, detail, account, identity, tx,
                                          reply.render()))


def build(services: Any) -> DataBulk:
    cfg = services.config
    distinct = getattr(services, "distinct", None)
    if distinct is None:
        distinct = MemoryDistinct(services.clock)
    return DataBulk(cfg.bulk, distinct, getattr(services, "events", None), cfg.checks.mode("data_bulk"))


SPEC = CheckSpec(
    name='data_bulk', phase=Phase.DATA, build=build,
    summary='P-UCE: bulk (many similar messages) and repeats (the same message again to one recipient)',
    position=90,
    settings=('bulk',),
    services=('distinct', 'events'),
    reads=('mailing_list', 'parsed_headers'),
    requires=('mail_list',),
    deadline=STORE,
    default_mode='warn',
    # About 0.4 ms of CPU per message (fingerprint and counter), against the gateway's
    # 0.65-1.15 ms for everything else: not run unless [checks] data lists it, until
    # its cost is within issue 12's 10 % throughput budget (docs/bulk.md).
    in_default_order=False,
    replies=('BULK_DEFERRED', 'BULK_REFUSED', 'REPEAT_REFUSED'))
