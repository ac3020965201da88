"""Administration of the registry (HTTP API, CLI): an account's API keys, its
lists, their subscribers with consent evidence, bulk imports, removals and
resends."""
from __future__ import annotations

import re
import secrets
import unicodedata
from datetime import datetime, timezone
from typing import Any, Sequence

from .base import clean_ip
from .model import (AddResult, BudgetExhausted, Invalid, MailingList, NotFound, Subscriber, list_name,
                    normalize_address, normalize_list_id, normalize_sender_pattern)
from .outbox import Outbox
from .tokens import api_key_hash


def _clean_text(value: Any, field: str, limit: int) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise Invalid(field, "must be a string")
    text = value.strip()
    if len(text) > limit:
        raise Invalid(field, f"at most {limit} characters")
    if any(unicodedata.category(c)[0] == "C" for c in text):
        raise Invalid(field, "must not contain control characters")
    return text


def _when(value: Any, field: str, now: float) -> float:
    if value is None:
        return now
    if isinstance(value, datetime):
        value = value.timestamp() if value.tzinfo else value.replace(tzinfo=timezone.utc).timestamp()
    if isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise Invalid(field, "must be an ISO 8601 time or unix seconds") from None
        return _when(dt, field, now)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Invalid(field, "must be an ISO 8601 time or unix seconds")
    if value > now + 300:
        raise Invalid(field, "lies in the future")
    if value < 946684800:  # 2000-01-01
        raise Invalid(field, "lies before 2000")
    return float(value)


def _domain_authorized(domain: str, allow_sub: bool, domains: list[tuple[str, str]]) -> bool:
    for dom, status in domains:
        if status not in ("verified", "approved"):
            continue
        if domain == dom or (allow_sub and domain.endswith("." + dom)):
            return True
    return False


class Admin(Outbox):
    # ============================================================ accounts, API keys
    async def _account(self, account_name: str) -> tuple[int, bool, list[tuple[str, str]]]:
        acc = await self._db(self.store.account(account_name))
        if acc is None:
            raise NotFound(f"no account {account_name!r}")
        return acc

    async def issue_api_key(self, account_name: str, label: str = "") -> str:
        """A new API key for the account; only its SHA-256 is stored."""
        acc_id, _, _ = await self._account(account_name)
        key = "gwk_" + secrets.token_urlsafe(32)
        await self._db(self.store.add_api_key(acc_id, api_key_hash(key), _clean_text(label, "label", 128)))
        return key

    async def revoke_api_keys(self, account_name: str, label: str | None = None) -> int:
        acc_id, _, _ = await self._account(account_name)
        return await self._db(self.store.revoke_api_keys(acc_id, label))

    async def account_for_api_key(self, key: str) -> str | None:
        if not key or len(key) > 200:
            return None
        return await self._db(self.store.account_for_key(api_key_hash(key)))

    # ============================================================ lists
    async def create_list(self, account_name: str, *, name: str, list_id: str, senders: Sequence[str],
                          confirm_from: str) -> MailingList:
        """Register a list. Senders and the confirmation From must be in the
        account's verified/approved sender domains (P-FORGE)."""
        acc_id, allow_sub, domains = await self._account(account_name)
        name = list_name(name)
        lid = normalize_list_id(list_id)
        if not senders:
            raise Invalid("senders", "at least one envelope sender is needed")
        if len(senders) > 20:
            raise Invalid("senders", "at most 20")
        patterns = []
        for i, s in enumerate(senders):
            p = normalize_sender_pattern(s, f"senders[{i}]")
            if not _domain_authorized(p.rpartition("@")[2], allow_sub, domains):
                raise Invalid(f"senders[{i}]", f"domain of {s!r} is not a verified sender domain of your account")
            if p not in patterns:
                patterns.append(p)
        cf = normalize_address(confirm_from, "confirm_from")
        if not _domain_authorized(cf.rpartition("@")[2], allow_sub, domains):
            raise Invalid("confirm_from", "domain is not a verified sender domain of your account")
        new_id = await self._db(self.store.create_list(acc_id, name, lid, patterns, cf))
        lst = await self._db(self.store.get_list(new_id))
        assert lst is not None
        return lst

    async def get_list(self, account_name: str, list_id: str) -> MailingList:
        """The account's list; NotFound for another account's list exactly as for none (P-HARVEST)."""
        acc_id, _, _ = await self._account(account_name)
        if not re.fullmatch(r"[0-9a-f]{16}", list_id or ""):
            raise NotFound("no such list")
        lst = await self._db(self.store.get_list(list_id, acc_id))
        if lst is None:
            raise NotFound("no such list")
        return lst

    async def lists(self, account_name: str) -> list[MailingList]:
        acc_id, _, _ = await self._account(account_name)
        return await self._db(self.store.lists(account_id=acc_id))

    async def delete_list(self, account_name: str, list_id: str) -> None:
        """Delete a list with its subscribers and suppression set."""
        lst = await self.get_list(account_name, list_id)
        if not await self._db(self.store.delete_list(lst.account_id, lst.id)):
            raise NotFound("no such list")
        await self.store.erased()

    # ============================================================ subscribers
    def _evidence(self, row: dict, prefix: str, default_source: str = "") -> dict:
        now = self.clock()
        address = normalize_address(row.get("address"), f"{prefix}address")
        return {"address": address,
                "source": _clean_text(row.get("source") or default_source, f"{prefix}source", 255),
                "ip": clean_ip(row.get("ip"), f"{prefix}ip"),
                "user_agent": _clean_text(row.get("user_agent"), f"{prefix}user_agent", 512),
                "requested_at": _when(row.get("requested_at"), f"{prefix}requested_at", now)}

    async def add_subscriber(self, account_name: str, list_id: str, address: str, *, source: str = "",
                             ip: str = "", user_agent: str = "", requested_at: Any = None,
                             reoptin: bool = False) -> AddResult:
        """Add a pending subscriber and send the confirmation mail now.
        Conflict("exists") if subscribed/pending, Conflict("suppressed") if the
        address opted out and ``reoptin`` is false; with ``reoptin`` a fresh
        double opt-in starts (RateLimited if one was started within
        reoptin_interval). ``confirmation`` of the result: sent | failed, or
        queued when the account's budget of confirmation mails for this window
        is used up (the outbox sends it in a later window)."""
        lst = await self.get_list(account_name, list_id)
        keys = self._need_keys()
        ev = self._evidence({"address": address, "source": source, "ip": ip, "user_agent": user_agent,
                             "requested_at": requested_at}, "")
        addr_hash = keys.address_hash(lst.id, ev["address"])
        budget = self.budget
        sub, nonce = await self._db(self.store.add_pending(
            lst.id, ev["address"], addr_hash, source=ev["source"], requested_at=ev["requested_at"], ip=ev["ip"],
            user_agent=ev["user_agent"], reoptin=reoptin, reoptin_interval=self.settings.reoptin_interval,
            confirm_status="sending", account_id=lst.account_id, budget=budget))
        if sub.confirmation == "queued":
            self._budget_exhausted(lst.account_id, lst.account, budget.start(self.clock()))
            return AddResult(sub, "queued", "the account's budget of confirmation mails for this window is used "
                                            "up; the mail is queued and goes out in a later window")
        status = await self._deliver(lst, ev["address"], addr_hash, nonce)
        sub = await self._db(self.store.subscriber(lst.id, addr_hash)) or sub
        return AddResult(sub, status)

    async def import_subscribers(self, account_name: str, list_id: str, rows: Sequence[Any], *,
                                 reoptin: bool = False, source: str = "") -> list[dict]:
        """Bulk add. Each row is validated on its own: a bad one gets the result
        ``invalid`` with the ``field`` (address, source, ip, user_agent,
        requested_at) and the reason, and the good rows are imported anyway.
        Each new address becomes pending with its confirmation mail queued (sent
        by the outbox within outbox_interval, as far as the account's budget of
        confirmation mails allows; the rest in later windows). Returns one
        result per row, in order: {"address", "result":
        queued|exists|suppressed|rate_limited|duplicate|invalid, "reason"
        [, "field"]}, with the row's "line" if it had one (CSV files).
        ``Invalid`` only for the request as a whole (more than max_bulk rows)."""
        lst = await self.get_list(account_name, list_id)
        keys = self._need_keys()
        if len(rows) > self.settings.max_bulk:
            raise Invalid("subscribers", f"at most {self.settings.max_bulk} per request")
        clean, seen, out, positions = [], set(), [], []
        for row in rows:
            res: dict = {}
            if isinstance(row, dict) and isinstance(row.get("line"), int):
                res["line"] = row["line"]
            out.append(res)
            if not isinstance(row, dict):
                res.update(address="", result="invalid", field="", reason="must be an object")
                continue
            try:
                ev = self._evidence(row, "", source)
            except Invalid as exc:
                given = row.get("address")
                res.update(address=given[:320] if isinstance(given, str) else "", result="invalid", field=exc.field,
                           reason=exc.reason)
                continue
            res["address"] = ev["address"]
            if ev["address"] in seen:
                res.update(result="duplicate", reason="appears earlier in this import")
                continue
            seen.add(ev["address"])
            ev["address_hash"] = keys.address_hash(lst.id, ev["address"])
            positions.append(len(out) - 1)
            clean.append(ev)
        for chunk_start in range(0, len(clean), 1000):
            chunk = clean[chunk_start:chunk_start + 1000]
            results = await self._db(self.store.import_pending(
                lst.id, chunk, reoptin=reoptin, reoptin_interval=self.settings.reoptin_interval), bounded=False)
            for j, (result, reason) in enumerate(results):
                out[positions[chunk_start + j]].update(result=result, reason=reason)
        if clean:
            self.kick_outbox()
        return out

    async def subscriber(self, account_name: str, list_id: str, address: str) -> Subscriber:
        lst = await self.get_list(account_name, list_id)
        sub = await self._db(self.store.subscriber(*self._list_and_hash(lst, address)))
        if sub is None:
            raise NotFound("not a subscriber of this list")
        return sub

    async def is_suppressed(self, account_name: str, list_id: str, address: str) -> bool:
        lst = await self.get_list(account_name, list_id)
        return await self._db(self.store.suppressed(*self._list_and_hash(lst, address)))

    async def subscribers(self, account_name: str, list_id: str, *, status: str | None = None,
                          cursor: int = 0, limit: int = 100) -> tuple[list[Subscriber], int | None]:
        """A page of subscribers with consent evidence; the next cursor or None."""
        lst = await self.get_list(account_name, list_id)
        if status not in (None, "pending", "confirmed"):
            raise Invalid("status", "must be pending or confirmed")
        limit = max(1, min(limit, 1000))
        rows = await self._db(self.store.subscribers(lst.id, status, cursor, limit), bounded=False)
        nxt = rows[-1][0] if len(rows) == limit else None
        return [s for _, s in rows], nxt

    async def iter_subscribers(self, account_name: str, list_id: str, status: str | None = None):
        """All subscribers, in pages (export)."""
        cursor: int | None = 0
        while cursor is not None:
            page, cursor = await self.subscribers(account_name, list_id, status=status, cursor=cursor, limit=1000)
            for sub in page:
                yield sub

    async def remove_subscriber(self, account_name: str, list_id: str, address: str) -> bool:
        """Remove a subscriber on the person's behalf: the same permanent removal
        as an opt-out (the keyed hash stays in the suppression set)."""
        lst = await self.get_list(account_name, list_id)
        removed = await self._db(self.store.unsubscribe(*self._list_and_hash(lst, address)))
        self._count_optout("api", removed, lst.id)
        if removed:
            await self.store.erased()
        return removed

    async def resend_confirmation(self, account_name: str, list_id: str, address: str) -> str:
        """Send the confirmation mail again: RateLimited within resend_interval
        of the last one or after max_confirmation_mails, BudgetExhausted (a
        RateLimited, retry_after = until the next window) when the account's
        budget of confirmation mails is used up; "sent" | "failed"."""
        lst = await self.get_list(account_name, list_id)
        _, addr_hash = self._list_and_hash(lst, address)
        budget = self.budget
        try:
            address, nonce = await self._db(self.store.claim_resend(
                lst.id, addr_hash, self.settings.resend_interval, self.settings.max_confirmation_mails,
                account_id=lst.account_id, budget=budget))
        except BudgetExhausted:
            self._budget_exhausted(lst.account_id, lst.account, budget.start(self.clock()))
            raise
        return await self._deliver(lst, address, addr_hash, nonce)

    async def list_stats(self, account_name: str, list_id: str) -> dict:
        lst = await self.get_list(account_name, list_id)
        return await self._db(self.store.stats(lst.id), bounded=False)
