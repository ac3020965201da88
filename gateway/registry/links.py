"""Links and tokens of the registry: the List-* header fields and unsubscribe
links of list mail, opt-out by token (one-click, page, mailto, API), and the
confirmation link with its page and confirm step."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from urllib.parse import quote

from .base import RegistryBase, clean_ip
from .model import MailingList, TokenError, UnsubscribeResult, mask_address, normalize_address
from .tokens import UNSUBSCRIBE_TOKEN_CHARS

log = logging.getLogger("gateway.registry")

# How an opt-out reached the gateway: the RFC 8058 one-click POST of a mail
# client, the button of the unsubscribe page, a mail to the mailto: address,
# a removal through the API (the list owner on the person's behalf).
OPTOUT_VIAS = ("one-click", "page", "mailto", "api")

_TOKEN_IN_TEXT = re.compile(r"(?<![a-z2-7])([a-z2-7]{%d})(?![a-z2-7])" % UNSUBSCRIBE_TOKEN_CHARS)


@dataclass(frozen=True, slots=True)
class PageInfo:
    """What a confirmation/unsubscribe page may show (nothing more)."""
    list_name: str
    masked_address: str
    state: str                 # pending | confirmed | gone | stale | subscribed | unsubscribed


class Links(RegistryBase):
    optouts: dict[tuple[str, str], int]

    # ------------------------------------------------------------ header injection
    def _list_and_hash(self, lst: MailingList | str, address: str) -> tuple[str, str]:
        keys = self._need_keys()
        list_id = lst.id if isinstance(lst, MailingList) else lst
        return list_id, keys.address_hash(list_id, normalize_address(address))

    def unsubscribe_token(self, lst: MailingList | str, address: str) -> str:
        """50 characters of lower-case base32; never expires; fits a mailto local part."""
        list_id, addr_hash = self._list_and_hash(lst, address)
        return self._need_keys().unsubscribe_token(list_id, addr_hash)

    def unsubscribe_url(self, lst: MailingList | str, address: str) -> str:
        """The RFC 8058 https URL (GET: page with a button; POST: one-click)."""
        return self._unsubscribe_url(self.unsubscribe_token(lst, address))

    def unsubscribe_mailto(self, lst: MailingList | str, address: str) -> str | None:
        """``mailto:u+TOKEN@host?subject=unsubscribe%20TOKEN`` if registry.mailto_address is set."""
        if not self.settings.mailto_address:
            return None
        return self._unsubscribe_mailto(self.unsubscribe_token(lst, address))

    def _unsubscribe_url(self, token: str) -> str:
        return f"{self.settings.base_url}/unsubscribe/{token}"

    def _unsubscribe_mailto(self, token: str) -> str:
        local, _, domain = self.settings.mailto_address.rpartition("@")
        return f"mailto:{local}+{token}@{domain}?subject={quote('unsubscribe ' + token)}"

    def list_headers(self, lst: MailingList, address: str) -> list[tuple[str, str]]:
        """The header fields to add to list mail for one recipient (P-STD, RFC 2369/2919/8058)."""
        token = self.unsubscribe_token(lst, address)
        targets = [f"<{self._unsubscribe_url(token)}>"]
        if self.settings.mailto_address:
            targets.append(f"<{self._unsubscribe_mailto(token)}>")
        return [("List-Id", lst.list_id_header),
                ("List-Unsubscribe", ", ".join(targets)),
                ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click")]

    @staticmethod
    def token_from_mailto(local_part: str, subject: str = "") -> str | None:
        """The unsubscribe token of a mail to the mailto: address: from the
        ``+TOKEN`` of the local part, else from the subject."""
        _, plus, tail = local_part.partition("+")
        if plus and len(tail) == UNSUBSCRIBE_TOKEN_CHARS:
            return tail.lower()
        m = _TOKEN_IN_TEXT.search((subject or "").lower())
        return m.group(1) if m else None

    # ============================================================ opt-out
    async def unsubscribe_by_token(self, token: str, *, via: str) -> UnsubscribeResult:
        """Opt out: delete the subscriber record and keep only the keyed hash in
        the list's suppression set. Idempotent. Raises TokenError (forged or
        damaged token) or RegistryUnavailable. ``via`` (one of OPTOUT_VIAS:
        one-click, page, mailto) is logged and counted."""
        if via not in OPTOUT_VIAS:
            raise ValueError(f"unknown opt-out way {via!r}")
        claim = self._need_keys().read_unsubscribe(token)
        lst = await self._db(self.store.get_list(claim.list_id))
        if lst is None:
            self._count_optout(via, False, "")
            return UnsubscribeResult("", False)
        removed = await self._db(self.store.unsubscribe(claim.list_id, claim.address_hash))
        self._count_optout(via, removed, lst.id)
        if removed:
            await self.store.erased()
        return UnsubscribeResult(lst.name, removed)

    def _count_optout(self, via: str, removed: bool, list_id: str) -> None:
        self.stats["unsubscribes"] += 1
        self.optouts[(via, "removed" if removed else "already")] += 1
        log.info("opt-out list=%s removed=%s via=%s", list_id or "-", removed, via)

    async def unsubscribe_view(self, token: str) -> PageInfo:
        claim = self._need_keys().read_unsubscribe(token)
        lst = await self._db(self.store.get_list(claim.list_id))
        if lst is None:
            return PageInfo("", "", "gone")
        sub = await self._db(self.store.subscriber(claim.list_id, claim.address_hash))
        if sub is None:
            return PageInfo(lst.name, "", "unsubscribed")
        return PageInfo(lst.name, mask_address(sub.address), "subscribed")

    # ============================================================ opt-in (confirmation)
    async def confirmation_view(self, token: str) -> PageInfo:
        """What the GET page shows. Confirms nothing."""
        claim = self._need_keys().read_confirm(token, self.clock())
        lst = await self._db(self.store.get_list(claim.list_id))
        if lst is None:
            raise TokenError("this list no longer exists")
        found = await self._db(self.store.subscriber_nonce(claim.list_id, claim.address_hash))
        if found is None:
            raise TokenError("this subscription request no longer exists (it was withdrawn or removed)")
        address, status, nonce = found
        if nonce != claim.nonce:
            raise TokenError("this link was replaced by a newer confirmation mail; use the newest one")
        return PageInfo(lst.name, mask_address(address), status)

    async def confirm(self, token: str, *, ip: str = "", user_agent: str = "") -> PageInfo:
        """Confirm the subscription (the POST of the page). Idempotent. Records
        when and from which IP/user agent. Lifts an earlier opt-out of the address."""
        claim = self._need_keys().read_confirm(token, self.clock())
        lst = await self._db(self.store.get_list(claim.list_id))
        if lst is None:
            raise TokenError("this list no longer exists")
        result, address = await self._db(self.store.confirm(claim.list_id, claim.address_hash, claim.nonce,
                                                            clean_ip(ip, "ip") if ip else "",
                                                            (user_agent or "")[:512]))
        if result == "gone":
            raise TokenError("this subscription request no longer exists (it was withdrawn or removed)")
        if result == "stale":
            raise TokenError("this link was replaced by a newer confirmation mail; use the newest one")
        return PageInfo(lst.name, mask_address(address), "confirmed")

    def confirm_url(self, lst: MailingList, address_hash: str, nonce: str) -> tuple[str, float]:
        expires = self.clock() + self.settings.confirm_token_ttl
        token = self._need_keys().confirm_token(lst.id, address_hash, nonce, expires)
        return f"{self.settings.base_url}/confirm/{token}", expires
