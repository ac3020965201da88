"""Recipients the gateway handles itself, one handler per kind.

The RCPT check ``rcpt_relay`` names each such recipient's kind
(``tx.local_rcpts``: address -> kind); this table says what
happens to it:

- ``service``: the gateway's own service mailboxes (``smtp.service_mailboxes``),
  stored as a maildir (``smtp.service_maildir``), never relayed;
- ``unsubscribe``: the list unsubscribe ``mailto:`` address
  (``registry.mailto_address``): the token in the address or the subject opts
  the recipient out, nothing is stored or relayed;

and one kind that is relayed, not kept:

- SRS bounces (docs/forwarding.md): a recipient at the SRS domain goes
  upstream to the original sender its address decodes to
  (``tx.srs_rcpts``, :func:`relay_target`).

Later the abuse mailbox is one more entry of :data:`LocalHandler` kind.
Handlers run at DATA in the table's order; the first that fails decides the
client's reply (nothing is relayed then).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Protocol

from ..core import replies
from ..core.replies import Rendered, Reply
from ..core.transaction import Outcome, Recipient, Result, Transaction

if TYPE_CHECKING:  # pragma: no cover
    from ..core.address import EnvelopeAddress
    from ..registry.service import RegistryService
    from ..relay.maildir import MaildirWriter

log = logging.getLogger("gateway.delivery")


class LocalHandler(Protocol):
    kind: str

    async def deliver(self, tx: Transaction, recipients: list[Recipient],
                      finalize: Callable[[], bytes]) -> Reply | Rendered | None:
        """None when handled; else the (negative) reply for the client."""
        ...  # pragma: no cover - protocol


def local_kind(tx: Transaction, address: "EnvelopeAddress") -> str | None:
    return tx.local_rcpts.get(address.normalized.lower())


def relay_target(tx: Transaction, address: "EnvelopeAddress") -> str | None:
    """An SRS bounce's decoded original sender, else None."""
    return tx.srs_rcpts.get(address.normalized.lower())


class ServiceMailbox:
    kind = "service"

    def __init__(self, writer: "MaildirWriter"):
        self.writer = writer

    async def deliver(self, tx: Transaction, recipients: list[Recipient],
                      finalize: Callable[[], bytes]) -> Reply | Rendered | None:
        try:
            await self.writer.store(finalize())
        except OSError:
            log.exception("cannot store service mail")
            tx.ledger.append(Outcome("deliver_local", Result.ERROR, "maildir write failed",
                                     replies.SERVICE_MAILBOX_FAILED))
            return replies.SERVICE_MAILBOX_FAILED
        tx.ledger.append(Outcome("deliver_local", Result.PASS, "service mailbox"))
        return None


class UnsubscribeMailto:
    kind = "unsubscribe"

    def __init__(self, registry: "RegistryService"):
        self.registry = registry

    async def deliver(self, tx: Transaction, recipients: list[Recipient],
                      finalize: Callable[[], bytes]) -> Reply | Rendered | None:
        from ..message.parse import parsed_for
        from ..registry.model import RegistryUnavailable, TokenError

        subject = parsed_for(tx).get("subject") or ""
        for r in recipients:
            token = self.registry.token_from_mailto(r.address.local, subject)
            try:
                if token is None:
                    raise TokenError("no unsubscribe token in the address or the subject")
                result = await self.registry.unsubscribe_by_token(token, via="mailto")
            except TokenError as exc:
                tx.ledger.append(Outcome("unsubscribe", Result.FAIL, str(exc), replies.UNSUBSCRIBE_BAD_TOKEN))
                return replies.UNSUBSCRIBE_BAD_TOKEN
            except RegistryUnavailable as exc:
                tx.ledger.append(Outcome("unsubscribe", Result.ERROR, str(exc), replies.REGISTRY_UNAVAILABLE))
                return replies.REGISTRY_UNAVAILABLE
            tx.ledger.append(Outcome("unsubscribe", Result.PASS, f"opt-out from list {result.list_name!r}"))
        return None


def local_handlers(service_mail: "MaildirWriter | None", registry: "RegistryService | None"
                   ) -> dict[str, LocalHandler]:
    """The table, in the order the handlers run at DATA."""
    table: dict[str, LocalHandler] = {}
    if registry is not None:
        table["unsubscribe"] = UnsubscribeMailto(registry)
    if service_mail is not None:
        table["service"] = ServiceMailbox(service_mail)
    return table
