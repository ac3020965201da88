"""The confirmation mail of double opt-in: how it reads, how it is sent, the
outbox that sends queued ones, and the per-account budget that holds the rest
back (see RegistryService.__init__ on why it is counted in the database)."""
from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timezone
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, formatdate, make_msgid
from typing import Any

from .links import Links
from .model import MailingList, display_address
from .store import Budget
from ..state.deadline import within
from ..storage.db import is_outage

log = logging.getLogger("gateway.registry")


class Outbox(Links):
    hostname: str                      # names the gateway in the mail and its Message-ID
    relay: Any                         # relay pool for the confirmation mails (None: queue only)
    budget: Budget
    _budget_warned: dict[int, float]
    _outbox_task: asyncio.Task | None
    _outbox_kick: asyncio.Event

    def confirmation_message(self, lst: MailingList, address: str, address_hash: str,
                             nonce: str) -> tuple[bytes, bool]:
        """The confirmation mail (RFC 5322, text/plain UTF-8, quoted-printable);
        returns (bytes, needs SMTPUTF8). It shows the list and the address, never
        the consent evidence: ``source`` is the customer's internal note (a
        form, a campaign, an import file name), kept for the API and exports."""
        from email import policy

        url, expires = self.confirm_url(lst, address_hash, nonce)
        utf8 = not (address.isascii() and lst.confirm_from.isascii())
        msg = EmailMessage(policy=policy.SMTPUTF8 if utf8 else policy.SMTP)
        msg["From"] = Address(display_name=lst.name, addr_spec=lst.confirm_from)
        msg["To"] = address
        msg["Subject"] = self.settings.confirm_subject.replace("{list}", lst.name)
        msg["Date"] = formatdate(self.clock(), localtime=False)
        msg["Message-ID"] = make_msgid("confirm", domain=self.hostname)
        msg["Auto-Submitted"] = "auto-generated"
        until = format_datetime(datetime.fromtimestamp(expires, timezone.utc))
        lines = [
            "Hello,",
            "",
            f"someone, hopefully you, asked to subscribe {display_address(address)} to the",
            f"mailing list \"{lst.name}\" <{lst.list_id}>.",
            "",
            "To confirm, open this link and press the \"Confirm\" button:",
            "",
            url,
            "",
            f"The link is valid until {until}.",
            "If you did not ask for this, ignore this mail: you will not be subscribed.",
            "",
            "-- ",
            f"sent by the mail gateway {self.hostname} on behalf of the list owner",
        ]
        msg.set_content("\n".join(lines) + "\n", charset="utf-8", cte="quoted-printable")
        return bytes(msg) if not utf8 else msg.as_bytes(policy=policy.SMTPUTF8), utf8

    async def _send_confirmation(self, lst: MailingList, address: str, address_hash: str,
                                 nonce: str) -> tuple[bool, str]:
        if self.relay is None:
            return False, "no relay in this process"
        data, utf8 = self.confirmation_message(lst, address, address_hash, nonce)
        try:
            async with asyncio.timeout(self.settings.send_timeout):
                utx, reply = await self.relay.begin(lst.confirm_from, [], utf8=utf8, eight_bit=False,
                                                    size=len(data))
                if utx is None:
                    return False, reply.render()
                try:
                    reply = await utx.rcpt(address, [])
                    if not reply.is_positive:
                        return False, reply.render()
                    reply = await utx.data(data)
                    if not reply.is_positive:
                        return False, reply.render()
                finally:
                    await utx.close()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # TimeoutError, connection trouble
            return False, f"{type(exc).__name__}: {exc}"
        return True, reply.render()

    def _budget_exhausted(self, account_id: int, account_name: str, window_start: float) -> None:
        """A confirmation mail was held back by the budget: count it, and warn
        once per account and window (per gateway process): operators want to
        notice bought-list imports."""
        self.stats["confirmations_deferred"] += 1
        if self._budget_warned.get(account_id) == window_start:
            return
        if len(self._budget_warned) > 10_000:
            self._budget_warned = {a: w for a, w in self._budget_warned.items() if w >= window_start}
        self._budget_warned[account_id] = window_start
        self.stats["confirmation_budget_exhausted"] += 1
        b = self.budget
        log.warning("account %s used up its budget of %d confirmation mails per %g s; further confirmation "
                    "mails stay queued until %s (a bought or old list being imported?)", account_name, b.limit,
                    b.window, format_datetime(datetime.fromtimestamp(window_start + b.window, timezone.utc)))

    async def _deliver(self, lst: MailingList, address: str, address_hash: str, nonce: str) -> str:
        ok, detail = await self._send_confirmation(lst, address, address_hash, nonce)
        status = "sent" if ok else "failed"
        self.stats["confirmations_sent" if ok else "confirmations_failed"] += 1
        if not ok:
            log.warning("confirmation mail for list %s failed: %s", lst.id, detail)
        try:
            await self.store.set_confirmation(lst.id, address_hash, status)
        except Exception:
            log.warning("cannot record confirmation state", exc_info=True)
        return status

    async def _outbox(self) -> None:
        """Send queued confirmation mails (bulk imports, CLI, single adds over
        the budget). Several gateways may run this: claims are atomic per
        subscriber and take the account's budget in the same transaction;
        accounts over budget are skipped until their window turns."""
        sem = asyncio.Semaphore(self.settings.outbox_concurrency)
        stale_after = max(60.0, self.settings.send_timeout * 2)
        failing = False
        while True:
            try:
                await within(self._outbox_kick.wait(), self.settings.outbox_interval)
            except asyncio.TimeoutError:
                pass
            self._outbox_kick.clear()
            try:
                while True:
                    batch = await self.store.claim_outbox(self.settings.outbox_batch, stale_after,
                                                          budget=self.budget,
                                                          on_exhausted=self._budget_exhausted)
                    if not batch:
                        break
                    lists = {lid: await self.store.get_list(lid) for lid in {item[0] for item in batch}}

                    async def one(item):
                        list_id, address, address_hash, nonce = item
                        lst = lists[list_id]   # noqa: B023 - awaited below, within this iteration
                        if lst is not None:
                            async with sem:
                                await self._deliver(lst, address, address_hash, nonce)

                    await asyncio.gather(*(one(item) for item in batch))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not is_outage(exc):
                    log.warning("confirmation outbox run failed", exc_info=True)
                elif not failing:        # an outage: once, no traceback; the queue waits in the database
                    log.warning("confirmation outbox: database unavailable, retrying every %g s: %s",
                                self.settings.outbox_interval, str(exc) or type(exc).__name__)
                failing = failing or is_outage(exc)
            else:
                if failing:
                    log.warning("confirmation outbox: database answers again")
                failing = False

    def kick_outbox(self) -> None:
        self._outbox_kick.set()
