"""Handing a transaction over: its upstream transactions from the first RCPT
on, and everything from "the data checks passed" to the client's reply.

The SMTP server calls :meth:`Delivery.open` once a MAIL is accepted and then
drives the returned :class:`Handover` with the client's commands: ``rcpt``
for each recipient that passed the rcpt checks, ``deliver`` once the data
checks passed, ``release`` (or ``release_soon``) whenever the transaction
ends otherwise. Where each recipient goes:

- a recipient the gateway handles itself (local.py): nothing upstream;
- list mail (``tx.mailing_list``, set by ``mail_list``): each recipient
  gets its own upstream transaction and, at DATA, its own copy with its own
  List-Unsubscribe (RFC 8058); one list recipient per client transaction
  (the next gets 452 4.5.3 and comes again in a new one), so the client's
  one reply to DATA is true for the one copy;
- any other: one upstream transaction shared by the recipients, opened at
  the first of them (MAIL FROM at the first upstream that takes it), the
  RCPT sent to the decoded original sender for an SRS bounce. The MAIL FROM
  of forwarded mail goes upstream SRS-rewritten (decided at MAIL, before
  the message is seen; a candidate without evidence is refused at DATA and
  never relayed).

The client gets the upstream's own answer to each RCPT, and after DATA the
reply :func:`reply.combine` derives from the answers to every copy.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from ..core import replies
from ..core.address import AddressError, EnvelopeAddress, parse_path
from ..core.events import DuplicateRisk, EventBus, OutcomeRecorded, Refusal, TransactionEnded
from ..core.replies import Rendered, Reply
from ..core.transaction import Outcome, Phase, Recipient, Result, Transaction
from ..forwarding import forwarded
from .finalize import Finalizer, list_body
from .local import LocalHandler, local_kind, relay_target
from .reply import combine

if TYPE_CHECKING:  # pragma: no cover
    from ..registry.service import RegistryService
    from ..relay.pool import RelayPool, UpstreamTransaction

log = logging.getLogger("gateway.delivery")


class Delivery:
    def __init__(self, relay: "RelayPool", finalizer: Finalizer, local: dict[str, LocalHandler],
                 events: EventBus, registry: "RegistryService | None" = None):
        self.relay = relay
        self.finalizer = finalizer
        self.local = local
        self.events = events
        self.registry = registry
        # Handovers whose client went away meanwhile, running to their end (deliver()).
        self.orphans: set[asyncio.Task] = set()

    async def settled(self) -> None:
        """Wait for the handovers whose client went away (at shutdown; the
        relay's timeouts bound each)."""
        while self.orphans:
            await asyncio.wait(list(self.orphans))

    def open(self, tx: Transaction) -> "Handover":
        return Handover(self, tx)


class Handover:
    __slots__ = ("_d", "tx", "_shared", "_pending", "_prefetched", "_settled", "_recorded", "_local_kept")

    def __init__(self, delivery: Delivery, tx: Transaction):
        self._d = delivery
        self.tx = tx
        self._shared: UpstreamTransaction | None = None
        # A list recipient's upstream transaction while its RCPT is upstream:
        # released with the others if the client leaves meanwhile.
        self._pending: UpstreamTransaction | None = None
        self._prefetched: set[bytes] = set()
        # What the handover's answer was, recorded by settle() after the client's reply:
        # (answer, check, by); for list mail ((copies, answers), "relay_list", "upstream").
        self._settled: tuple | None = None
        self._recorded = 0     # the ledger's length when DATA's handover began
        self._local_kept = False   # every local handler took its recipients

    # ------------------------------------------------------------------ RCPT
    @property
    def wants_prefetch(self) -> bool:
        return self.tx.mailing_list is not None

    def prefetch(self, buffered: bytes) -> None:
        """A PIPELINING client sends all RCPTs of a list message at once: start
        the registry lookups of the ones still waiting in the input buffer now,
        so they are answered together (one batched query on PostgreSQL) instead
        of one database round trip per command. The real check of each RCPT
        joins its lookup (the registry coalesces identical lookups); an error
        here is seen again there.

        Runs on every RCPT while more input waits: the RCPT lines already
        prefetched by an earlier run (still waiting in the buffer) are
        remembered and skipped, so each pipelined RCPT is parsed and looked up
        here at most once. Only the lines now in the buffer are remembered
        (bounded memory)."""
        registry = self._d.registry
        lst = self.tx.mailing_list
        if registry is None or lst is None:
            return
        loop = asyncio.get_running_loop()
        done = self._prefetched
        waiting: set[bytes] = set()
        for line in buffered.split(b"\r\n"):
            if line[:8].upper() != b"RCPT TO:":
                continue
            waiting.add(line)
            if line in done:
                continue
            try:
                address, _ = parse_path(line[8:].decode("utf-8", "surrogateescape"), utf8=True, allow_null=False)
            except AddressError:
                continue
            task = loop.create_task(registry.recipient_status(lst.id, address.addr))
            task.add_done_callback(_ignore_result)
        self._prefetched = waiting

    async def rcpt(self, address: EnvelopeAddress, params: dict[str, str | bool]) -> Reply | Rendered:
        """Hand over one recipient that passed the rcpt checks; the reply for the client.
        (One coroutine on purpose: it runs for every recipient.)"""
        tx = self.tx
        recorded = len(tx.ledger)
        local = local_kind(tx, address)
        target = relay_target(tx, address)
        upstream = None
        try:
            if local:
                reply: Reply | Rendered = replies.RECIPIENT_OK
            elif tx.mailing_list is not None:
                # List mail: one copy per recipient (its own unsubscribe link), in
                # an upstream transaction of its own. One client transaction takes
                # one list recipient: with two, the upstream could take one copy
                # and refuse the other, and no single reply to the client's DATA
                # would be true for both (a 250 loses the refused copy, a 4xx makes
                # the client send the taken one again, a 5xx bounces it).
                if any(not r.local for r in tx.recipients):
                    tx.mark("rcpt")
                    tx.refused_recipients += 1
                    reply = replies.LIST_ONE_RECIPIENT
                    outcome = Outcome("list_one_recipient", Result.FAIL, "this list transaction has its recipient",
                                      reply, Phase.RCPT, address.addr)
                    tx.ledger.append(outcome)
                    self._d.events.publish(Refusal(tx.session, outcome, tx, address.addr, "gateway"))
                    return reply
                upstream, reply = await self._begin()
                if upstream is not None:
                    self._pending = upstream
                    try:
                        reply = await upstream.rcpt(address.addr, [])
                    except BaseException:
                        # Cancelled: the client is gone (aiosmtpd cancels at EOF,
                        # before connection_lost releases the handover).
                        self._pending = None
                        upstream.abandon()
                        raise
                    self._pending = None
                    if not reply.is_positive:
                        await upstream.close()
                        upstream = None
            else:
                shared = self._shared
                if shared is None:
                    shared, reply = await self._begin()
                    self._shared = shared
                if shared is not None:
                    # An SRS bounce goes to the original sender its address decodes to.
                    reply = await shared.rcpt(target or address.addr, [])
            tx.mark("rcpt")
            if reply.is_positive:
                tx.recipients.append(Recipient(address, params, reply, local, upstream, target))
            elif reply is replies.UPSTREAM_BUSY:
                # Our own bound ([relay] max_connections), not the upstream's
                # judgement of the recipient.
                tx.refused_recipients += 1
                outcome = Outcome("upstream_busy", Result.ERROR, reply.render(), reply, Phase.RCPT, address.addr)
                tx.ledger.append(outcome)
                self._d.events.publish(Refusal(tx.session, outcome, tx, address.addr, "gateway"))
            else:
                tx.refused_recipients += 1
                outcome = Outcome("relay_rcpt", Result.FAIL, reply.render(), reply, Phase.RCPT, address.addr)
                tx.ledger.append(outcome)
                self._d.events.publish(Refusal(tx.session, outcome, tx, address.addr, "upstream"))
            return reply
        finally:
            if self._d.events.wants(OutcomeRecorded):
                self._published(recorded)

    async def _begin(self) -> tuple["UpstreamTransaction | None", Reply | Rendered]:
        tx = self.tx
        assert tx.mail_from is not None          # a handover opens at an accepted MAIL
        size = tx.mail_params.get("SIZE")
        fwd = tx.forwarding
        mail_from = fwd.rewrite if fwd is not None and fwd.kind == "forward" and fwd.rewrite else tx.mail_from.addr
        utx, reply = await self._d.relay.begin(
            mail_from, [], utf8=tx.smtputf8, eight_bit=tx.body_8bit,
            size=int(size) if isinstance(size, str) else None)
        if utx is not None:
            tx.upstream = utx.upstream
            tx.upstreams_skipped = utx.skipped
        return utx, reply

    # ------------------------------------------------------------------ DATA
    async def deliver(self) -> Reply | Rendered:
        """Hand the message over: to the gateway's own handlers, and to the
        upstream (the shared transaction, or one copy per list recipient);
        the reply for the client. 250 only when every copy is safely handed
        over.

        Between the upstream's answer and the client's reply nothing runs but
        the reply (docs/architecture.md, "Duplicates by design"): the ledger
        entries, the events and the upstream connections wait for
        :meth:`settle` and :meth:`release`, which the server calls once the
        reply is written (or could not be).

        When the client goes away meanwhile (aiosmtpd cancels the session at
        the client's EOF) the handover stops, as before, while no copy is out
        (:meth:`_abandoned`); once a final dot went upstream it runs to its
        end, bounded by the relay's timeouts: the upstream may take the
        message, and only its answer says whether the client's copy is now a
        duplicate (:meth:`_without_client`). Either way the transaction is
        ended here."""
        tx = self.tx
        self._recorded = len(tx.ledger)
        tx.decision = "delivering"   # a disconnect now leaves the transaction's end to the handover
        task = asyncio.get_running_loop().create_task(self._hand_over())
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done() or any(utx.dot_sent for utx in self._upstreams()):
                self._d.orphans.add(task)
                task.add_done_callback(self._without_client)
            else:
                tx.decision = "aborted"
                task.cancel()
                task.add_done_callback(self._abandoned)
            raise

    async def _hand_over(self) -> Reply | Rendered:
        tx = self.tx
        try:
            reply = await self._hand_over_copies()
        except Exception:
            # Our bug: the server defers the client (451) and the transaction
            # stays open, as before the handover; nothing stays open upstream.
            tx.decision = "open"
            await self.release()
            raise
        tx.mark("relayed")
        if reply.is_positive and tx.decision != "local":
            reply = replies.RELAYED.with_suffix(f", trace id {tx.trace_id} ({reply.text})")
        if tx.decision == "delivering":
            tx.decision = "relayed" if reply.is_positive else ("deferred" if reply.is_transient else "refused")
        return reply

    async def _hand_over_copies(self) -> Reply | Rendered:
        tx = self.tx
        local_reply = await self._deliver_local() if any(r.local for r in tx.recipients) else None
        self._local_kept = local_reply is None and any(r.local for r in tx.recipients)
        if local_reply is not None:
            self._settled = (local_reply, "deliver_local", "gateway")
            return local_reply
        if all(r.local for r in tx.recipients):
            tx.decision = "local"
            self._settled = (replies.HANDLED_LOCALLY, "deliver_local", "gateway")
            return replies.HANDLED_LOCALLY.with_suffix(f", trace id {tx.trace_id}")
        if tx.mailing_list is not None:
            return await self._relay_list_copies()
        shared = self._shared
        assert shared is not None   # a relayed recipient opened it
        reply = await shared.data(self._d.finalizer.finalize(tx))
        self._settled = (reply, "relay", "upstream")
        return reply

    def settle(self, written: bool) -> None:
        """After the client's reply to DATA (``written``: it could be written):
        the outcomes of the handover go to the ledger and the event bus, and
        each duplicate window that opened is marked (``tx.duplicate_risk``)
        and published (:class:`DuplicateRisk`). Called once, before the
        transaction ends; never raises (the reply is out already)."""
        tx = self.tx
        settled, self._settled = self._settled, None
        if settled is None:          # nothing was handed over (refused before), or settled already
            return
        try:
            self._record(settled)
            risks = self._duplicate_risks(settled, written)
            if risks:
                tx.duplicate_risk = ",".join(risks)
                for cause in risks:
                    self._d.events.publish(DuplicateRisk(tx, cause))
        except Exception:  # pragma: no cover - bookkeeping never reaches the protocol
            log.exception("transaction %s: recording the handover failed", tx.trace_id)
        finally:
            if self._d.events.wants(OutcomeRecorded):
                self._published(self._recorded)

    def _record(self, settled: tuple) -> None:
        tx = self.tx
        answer, check, by = settled
        if check == "relay_list":
            copies, results = answer
            failed = 0
            for (r, _), one in zip(copies, results):
                if not one.is_positive:
                    failed += 1
                    outcome = Outcome("relay_list", Result.FAIL, one.render(), one, Phase.DATA, r.address.addr)
                    self._d.events.publish(Refusal(tx.session, outcome, tx, r.address.addr, "upstream"))
            tx.ledger.append(Outcome("relay_list", Result.PASS if not failed else Result.FAIL,
                                     f"{len(results) - failed}/{len(results)} copies taken"))
            answer = combine(results)
        elif not answer.is_positive:
            self._refused(answer, check, by)
        if check == "deliver_local":       # the handlers wrote their own ledger entries
            return
        if answer.is_positive:
            fwd = forwarded(tx)
            if fwd is not None:
                what = (f"SRS bounce of {fwd.original} to {fwd.rewrite}" if fwd.kind == "bounce" else
                        f"forwarded ({fwd.evidence}), envelope sender {fwd.rewrite or fwd.original}")
                tx.ledger.append(Outcome("forwarding", Result.PASS, what + ", relayed unchanged under the trace"))
            skipped = f" ({', '.join(tx.upstreams_skipped)} skipped: circuit open)" if tx.upstreams_skipped else ""
            tx.ledger.append(Outcome("relay", Result.PASS, f"upstream {tx.upstream}{skipped}"))
        else:
            tx.ledger.append(Outcome("relay", Result.FAIL, answer.render(), answer))

    def _duplicate_risks(self, settled: tuple, written: bool) -> list[str]:
        """The duplicate windows this handover opened (docs/architecture.md,
        "Duplicates by design"): the client's copy may go out again while a
        copy is already out."""
        tx = self.tx
        final = tx.final_reply
        risks: list[str] = []
        if final is not None and final.is_positive and not written:
            risks.append("client_gone")          # taken (upstream or our own handler), the client never heard
        risks.extend(utx.duplicate_risk for utx in self._upstreams() if utx.duplicate_risk)
        if (final is not None and final.is_transient and settled[1] != "deliver_local"
                and any(r.local for r in tx.recipients)):
            # Our own handlers took their recipients, then the relay deferred:
            # the client sends the message again, to them too.
            risks.append("local_kept_relay_deferred")
        return risks

    def _upstreams(self) -> list["UpstreamTransaction"]:
        out = [self._shared] if self._shared is not None else []
        out.extend(r.upstream for r in self.tx.recipients if r.upstream is not None)
        return out

    def _abandoned(self, task: asyncio.Task) -> None:
        """The end of a handover stopped because its client left before any
        final dot went upstream: nothing relayed (a local handler may have
        kept its copy: then the client's retry repeats it, ``client_gone``)."""
        tx = self.tx
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("transaction %s: handover failed as the client left", tx.trace_id,
                      exc_info=(type(exc), exc, exc.__traceback__) if exc is not None else None)
        outcome = Outcome("session", Result.ERROR, "client disconnected")
        tx.ledger.append(outcome)
        self._d.events.outcome(outcome)
        if self._local_kept:
            tx.duplicate_risk = "client_gone"
            self._d.events.publish(DuplicateRisk(tx, "client_gone"))
        tx.message = None
        self._d.events.publish(TransactionEnded(tx))
        self.release_soon()

    def _without_client(self, task: asyncio.Task) -> None:
        """The end of a handover whose client went away during it: the
        transaction is ended here as the server would have after its reply,
        which no one could get (a positive one marks ``client_gone``)."""
        self._d.orphans.discard(task)
        tx = self.tx
        try:
            reply = task.result()
        except BaseException as exc:    # the transaction still ends, with its log line
            if not isinstance(exc, asyncio.CancelledError):
                log.error("transaction %s: handover failed after the client left", tx.trace_id,
                          exc_info=(type(exc), exc, exc.__traceback__))
            reply = replies.INTERNAL_ERROR
            tx.decision = "aborted"
        tx.final_reply = reply
        tx.mark("done")
        self.settle(written=False)
        tx.message = None
        self._d.events.publish(TransactionEnded(tx))
        self.release_soon()

    def _published(self, recorded: int) -> None:
        """Publish the outcomes delivery added to the ledger since ``recorded``."""
        events = self._d.events
        for outcome in self.tx.ledger[recorded:]:
            events.outcome(outcome)

    async def _deliver_local(self) -> Reply | Rendered | None:
        tx = self.tx
        by_kind: dict[str, list[Recipient]] = {}
        for r in tx.recipients:
            if r.local:
                by_kind.setdefault(r.local, []).append(r)
        if not by_kind:
            return None
        for kind, handler in self._d.local.items():
            if kind in by_kind:
                reply = await handler.deliver(tx, by_kind[kind], lambda: self._d.finalizer.finalize(tx))
                if reply is not None and not reply.is_positive:
                    return reply
        return None

    async def _relay_list_copies(self) -> Reply | Rendered:
        """One copy per recipient, each with its own List-Unsubscribe (RFC 8058)
        replacing whatever the customer set; the reply is reply.combine()'s."""
        tx = self.tx
        lst = tx.mailing_list
        registry = self._d.registry
        assert lst is not None and registry is not None   # called for list mail only, which needs the registry
        copies = [(r, r.upstream) for r in tx.recipients if r.upstream is not None]
        body = list_body(tx.message or b"")
        finalize = self._d.finalizer.finalize

        async def one(r: Recipient, utx: Any) -> Reply | Rendered:
            addr = r.address.addr
            return await utx.data(finalize(tx, addr, registry.list_headers(lst, addr), body))

        results = await asyncio.gather(*(one(r, utx) for r, utx in copies))
        self._settled = ((copies, results), "relay_list", "upstream")
        return combine(results)

    def _refused(self, reply: Reply | Rendered, check: str, by: str) -> None:
        tx = self.tx
        outcome = Outcome(check, Result.FAIL if not reply.is_transient else Result.ERROR,
                          reply.render(), reply, Phase.DATA)
        self._d.events.publish(Refusal(tx.session, outcome, tx, None, by))

    # --------------------------------------------------------------- release
    def take_upstreams(self) -> list["UpstreamTransaction"]:
        """Every upstream transaction still open (the shared one first, then
        the per-recipient ones of list mail), handed to the caller to close."""
        out = [self._shared] if self._shared is not None else []
        self._shared = None
        if self._pending is not None:
            out.append(self._pending)
            self._pending = None
        for r in self.tx.recipients:
            if r.upstream is not None:
                out.append(r.upstream)
                r.upstream = None
        return out

    async def release(self) -> None:
        """Nothing is relayed: the upstream transactions are reset (RSET) and
        their connections go back to the pool."""
        await _close_all(self.take_upstreams())

    def release_soon(self) -> None:
        """``release`` from a synchronous callback (the client is gone)."""
        loop = asyncio.get_running_loop()
        for utx in self.take_upstreams():
            loop.create_task(utx.close())


async def _close_all(owned: list["UpstreamTransaction"]) -> None:
    """Close each (RSET unless done); cancelled meanwhile (the client left),
    the ones not yet closed are abandoned: no connection is ever left held."""
    try:
        for utx in owned:
            await utx.close()
    finally:
        for utx in owned:
            utx.abandon()       # nothing for the ones closed


def _ignore_result(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()
