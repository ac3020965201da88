"""DNS proof of sender domains (P-FORGE).

``gateway account domain add`` gives a domain a random token; the customer
publishes ``_gateway-proof.<domain>. TXT "gateway-proof=<token>"``;
``gateway account domain verify`` (:func:`verify_account_domain`) looks it up
and marks the domain verified. :class:`DomainProofChecker` proves every
verified domain again at an interval: a record that is gone (NXDOMAIN,
NODATA, or no TXT string with the token) sends the domain back to pending
with a note. A resolver failure or timeout is no answer and never revokes.
Operator-approved domains carry no proof and are not re-checked.

Lookups use ``fresh=True``: the gateway's own cache must not hide a record
that was just published or removed (c-ares' internal cache still honours the
record's TTL, so a removal is seen at most one TTL later).
"""
from __future__ import annotations

import asyncio
import enum
import logging
import time
from dataclasses import dataclass
from typing import Any

from ..state.background import BackgroundTask
from ..dns.resolver import Status
from .model import SenderDomain
from .settings import AccountSettings

log = logging.getLogger("gateway.accounts.proof")

PROOF_LABEL = "_gateway-proof"
PROOF_PREFIX = "gateway-proof="


def proof_name(domain: str) -> str:
    """The DNS name that carries the proof of ``domain`` (an A-label)."""
    return f"{PROOF_LABEL}.{domain.rstrip('.').lower()}"


def proof_record(domain: str, token: str) -> str:
    """The record to publish, in zone-file form."""
    return f'{proof_name(domain)}. TXT "{PROOF_PREFIX}{token}"'


class ProofStatus(str, enum.Enum):
    PUBLISHED = "published"   # a TXT string carries the token
    ABSENT = "absent"         # NXDOMAIN, NODATA, or TXT without the token: an answer
    UNKNOWN = "unknown"       # resolver failure or timeout: no answer, decide nothing


@dataclass(frozen=True, slots=True)
class ProofResult:
    status: ProofStatus
    detail: str

    @property
    def published(self) -> bool:
        return self.status is ProofStatus.PUBLISHED


def token_in(records: tuple | list, token: str) -> bool:
    """Does one of the TXT strings equal ``gateway-proof=<token>``? (pure)"""
    want = PROOF_PREFIX + token
    return bool(token) and any(isinstance(r, str) and r.strip() == want for r in records)


async def lookup_proof(resolver: Any, domain: str, token: str, timeout: float | None = None) -> ProofResult:
    name = proof_name(domain)
    answer = await resolver.query(name, "TXT", fresh=True, timeout=timeout)
    if answer.failed:
        what = answer.status.value + (f" ({answer.detail})" if answer.detail else "")
        return ProofResult(ProofStatus.UNKNOWN, f"DNS lookup of {name} TXT failed: {what}")
    if answer.status is Status.NXDOMAIN:
        return ProofResult(ProofStatus.ABSENT, f"{name} does not exist (NXDOMAIN)")
    if not answer.ok or not answer.records:
        return ProofResult(ProofStatus.ABSENT, f"{name} has no TXT record")
    if token_in(answer.records, token):
        return ProofResult(ProofStatus.PUBLISHED, f"TXT {name} carries the token")
    return ProofResult(ProofStatus.ABSENT, f"TXT record(s) at {name} do not carry this domain's token")


# ------------------------------------------------------------------ verify one domain (CLI, admin)
@dataclass(frozen=True, slots=True)
class VerifyOutcome:
    status: str               # verified | approved | pending | unknown
    domain: SenderDomain      # as it was before
    detail: str

    @property
    def authorized(self) -> bool:
        return self.status in ("verified", "approved")

    @property
    def record(self) -> str:
        return proof_record(self.domain.domain, self.domain.token)


def _find(account: Any, domain: str) -> SenderDomain | None:
    for d in account.domains:
        if d.domain == domain:
            return d
    return None


def _stamp(now: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(now))


async def verify_account_domain(store: Any, resolver: Any, name: str, domain: str,
                                timeout: float | None = None) -> VerifyOutcome:
    """Look the proof of ``domain`` of account ``name`` up and record the result.

    Published: the domain becomes (stays) verified. Not published: a pending
    domain stays pending; a verified one goes back to pending, as the
    periodic re-check would do. DNS failure: nothing changes. An
    operator-approved domain needs no proof and is left alone.
    Raises AccountError for an unknown account or domain.
    """
    from .store import AccountError, normalize_domain

    dom = normalize_domain(domain)
    account = await store.get(name)
    current = _find(account, dom)
    if current is None:
        raise AccountError(f"domain {dom} is not on account {name!r}")
    if current.status == "approved":
        return VerifyOutcome("approved", current, current.note or "approved by an operator")
    result = await lookup_proof(resolver, dom, current.token, timeout)
    if result.status is ProofStatus.UNKNOWN:
        return VerifyOutcome("unknown", current, result.detail)
    if result.published:
        await store.set_domain_status(name, dom, "verified", note=f"proven by DNS {_stamp(store.clock())}")
        return VerifyOutcome("verified", current, result.detail)
    if current.status == "verified":
        await store.set_domain_status(name, dom, "pending",
                                      note=f"proof gone {_stamp(store.clock())}: {result.detail}")
    return VerifyOutcome("pending", current, result.detail)


# ------------------------------------------------------------------ periodic re-check
@dataclass
class RecheckReport:
    checked: int = 0
    kept: int = 0
    revoked: int = 0
    unknown: int = 0


class DomainProofChecker:
    """Background task: prove every verified domain again every interval."""

    def __init__(self, store: Any, resolver: Any, settings: AccountSettings | None = None):
        self.store = store
        self.resolver = resolver
        self.settings = settings or AccountSettings()
        self.last: RecheckReport | None = None
        self._task = BackgroundTask("domain-proof-recheck")

    def start(self) -> None:
        if self.settings.proof_recheck_interval > 0:
            self._task.start(self._loop)

    async def stop(self) -> None:
        await self._task.stop()

    async def _loop(self) -> None:
        # First pass one interval after start: a restart of many gateways
        # must not send every proof query at once.
        while True:
            await asyncio.sleep(self.settings.proof_recheck_interval)
            try:
                self.last = await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # the database may be away; the next pass tries again
                log.warning("sender domain proof re-check failed", exc_info=True)

    async def run_once(self) -> RecheckReport:
        # The store's own refresher keeps the snapshot current (the checker runs
        # only in the gateway, after AccountStore.start()); a domain changed
        # since is guarded by _revoke's conditional UPDATE.
        todo = [(acc.name, d) for acc in self.store.all_cached() for d in acc.domains if d.status == "verified"]
        report = RecheckReport()
        sem = asyncio.Semaphore(self.settings.proof_concurrency)

        async def one(name: str, dom: SenderDomain) -> None:
            async with sem:
                result = await lookup_proof(self.resolver, dom.domain, dom.token,
                                            self.settings.proof_lookup_timeout)
            report.checked += 1
            if result.published:
                report.kept += 1
            elif result.status is ProofStatus.UNKNOWN:
                report.unknown += 1
                log.info("proof of %s (account %s) not checked: %s", dom.domain, name, result.detail)
            elif await self._revoke(name, dom, result.detail):
                report.revoked += 1

        await asyncio.gather(*(one(n, d) for n, d in todo))
        if todo:
            log.info("sender domain proofs re-checked: %d kept, %d revoked, %d unknown",
                     report.kept, report.revoked, report.unknown)
        return report

    async def _revoke(self, name: str, dom: SenderDomain, detail: str) -> bool:
        from .store import AccountError

        # Only what was looked up is revoked: an operator may have approved
        # the domain, or removed and re-added it, while the lookup ran. The
        # UPDATE itself checks status and token, so such a change wins.
        try:
            changed = await self.store.set_domain_status(
                name, dom.domain, "pending", note=f"proof gone {_stamp(self.store.clock())}: {detail}",
                expected_status="verified", expected_token=dom.token)
        except AccountError:
            return False
        if changed:
            log.warning("sender domain %s of account %s revoked to pending: %s", dom.domain, name, detail)
        return changed
