"""DNSBL / DNSWL lookups of the connecting address (RFC 5782), postscreen style.

Every configured zone is asked in parallel under one time budget; each zone
that lists the address adds its weight (an allow list has a negative weight)
and the total against the threshold decides. The rules that decide are pure
functions (:func:`classify_answer`, :func:`decide`, :func:`judge_probe`); the
:class:`Dnsbl` service does the I/O through the shared resolver and probes
each zone's health in the background.

Answers in 127.255.255.0/24 (the "you may not query us" codes) and answers
outside 127.0.0.0/8 (a resolver rewriting NXDOMAIN, a dead list's domain
parked on a wildcard) are errors, never listings.

A zone's query name may carry an access key (e.g. Spamhaus DQS); only its
display name is ever shown, and the key is removed from TXT reasons.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import time
from dataclasses import dataclass
from typing import Callable

from .resolver import DnsAnswer, Resolver, Status
from .settings import DnsblSettings, DnsblZone, parse_code_range
from ..state.background import stop_tasks

log = logging.getLogger("gateway.dns.dnsbl")

_LOOPBACK_8 = ipaddress.IPv4Network("127.0.0.0/8")
_REFUSED_24 = ipaddress.IPv4Network("127.255.255.0/24")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]+")
MAX_REASON = 160

LISTED, CLEAN, ERROR, DISABLED = "listed", "clean", "error", "disabled"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _address(ip: str | IPAddress) -> IPAddress:
    """``ip`` as an address object; a string is parsed, an address is taken as it is."""
    if isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return ip
    return ipaddress.ip_address(ip)


def query_label(ip: str | IPAddress) -> str:
    """Reversed octets (IPv4) or nibbles (IPv6), RFC 5782 s.2.1 / 2.4.

    The address is taken as given: ``::ffff:7f00:2`` is the IPv6 test point
    of RFC 5782 s.5, in nibble form. Session peers go through
    :func:`peer_address` first.
    """
    return _address(ip).reverse_pointer.rsplit(".", 2)[0]


def peer_address(ip: str) -> IPAddress:
    """A peer address as the DNSBL should see it, parsed: an IPv4-mapped IPv6
    peer (``::ffff:192.0.2.1`` from a dual-stack socket) is the IPv4 client it is.
    Raises ValueError when ``ip`` is not an IP address."""
    addr = ipaddress.ip_address(ip)
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr


@dataclass(frozen=True, slots=True)
class ZoneResult:
    zone: DnsblZone
    status: str                   # listed | clean | error | disabled
    codes: tuple[str, ...] = ()   # the counted return codes
    reason: str = ""              # TXT reason, cleaned, key removed
    detail: str = ""              # what went wrong (error / disabled)
    kind: str = ""                # error kind: dns | timeout | outside | refused

    @property
    def display(self) -> str:
        return self.zone.display


@dataclass(frozen=True, slots=True)
class DnsblVerdict:
    ip: str
    score: int
    threshold: int
    decision: str                 # pass | listed | tempfail
    results: tuple[ZoneResult, ...] = ()

    @property
    def listed(self) -> bool:
        return self.decision == "listed"

    @property
    def tempfail(self) -> bool:
        return self.decision == "tempfail"

    @property
    def hits(self) -> list[ZoneResult]:
        return [r for r in self.results if r.status == LISTED]

    @property
    def errors(self) -> list[ZoneResult]:
        return [r for r in self.results if r.status == ERROR]

    def reply_detail(self) -> str:
        """For the client: the listing zones' display names and reasons."""
        parts = []
        for r in self.hits:
            if r.zone.weight > 0:
                parts.append(f"{r.display} ({r.reason})" if r.reason else r.display)
        return f"{self.ip} listed by " + ", ".join(parts)

    def log_detail(self) -> str:
        """For the ledger: every zone's result (display names only)."""
        bits = [f"score {self.score}/{self.threshold}"]
        for r in self.results:
            if r.status == LISTED:
                bits.append(f"{r.display}={'+'.join(r.codes)}({r.zone.weight:+d})")
            elif r.status in (ERROR, DISABLED):
                bits.append(f"{r.display}:{r.status}:{r.detail}")
        return "; ".join(bits)


# -- pure rules ------------------------------------------------------------------------------

class CodeMatcher:
    """Which return codes of a zone count (empty list: any valid code)."""

    def __init__(self, zone: DnsblZone):
        self.ranges = [parse_code_range(c) for c in zone.codes]

    def __call__(self, addr: ipaddress.IPv4Address) -> bool:
        if not self.ranges:
            return True
        v = int(addr)
        return any(lo <= v <= hi for lo, hi in self.ranges)


def classify_answer(zone: DnsblZone, answer: DnsAnswer, matcher: CodeMatcher | None = None) -> ZoneResult:
    """One zone's A answer -> listed / clean / error."""
    if answer.negative:
        return ZoneResult(zone, CLEAN)
    if answer.status is Status.TIMEOUT:
        return ZoneResult(zone, ERROR, detail="timeout", kind="timeout")
    if answer.status is not Status.OK:
        return ZoneResult(zone, ERROR, detail=answer.detail or answer.status.value, kind="dns")
    matcher = matcher or CodeMatcher(zone)
    counted: list[str] = []
    for rec in answer.records:
        try:
            addr = ipaddress.ip_address(rec)
        except ValueError:
            return ZoneResult(zone, ERROR, detail=f"unparsable answer {rec!r}", kind="outside")
        if addr.version != 4 or addr not in _LOOPBACK_8:
            return ZoneResult(zone, ERROR, detail=f"answer {addr} outside 127.0.0.0/8", kind="outside")
        if addr in _REFUSED_24:
            return ZoneResult(zone, ERROR, detail=f"zone refused the query ({addr})", kind="refused")
        if matcher(addr):
            counted.append(str(addr))
    if counted:
        return ZoneResult(zone, LISTED, tuple(counted))
    return ZoneResult(zone, CLEAN, detail="return code not counted")


def clean_reason(zone: DnsblZone, texts: tuple) -> str:
    """The TXT reason as it may be shown: one line, bounded, without the zone's key."""
    text = " ".join(str(t) for t in texts)
    name = zone.name.strip(".")
    if name:
        text = re.sub(re.escape(name), zone.display, text, flags=re.IGNORECASE)
    text = _UNSAFE.sub(" ", text).strip()
    if len(text) > MAX_REASON:
        text = text[: MAX_REASON - 3].rstrip() + "..."
    return text


def decide(settings: DnsblSettings, ip: str, results: list[ZoneResult]) -> DnsblVerdict:
    """Sum the weights of the listing zones and compare with the threshold.

    With a zone in error the true score lies between the score plus the
    negative weights of the failed zones and the score plus their positive
    weights. If that range is entirely on one side of the threshold the
    failure does not matter; otherwise on_error decides: "closed" defers,
    "open" goes on as if the failed zones had not listed.
    """
    score = sum(r.zone.weight for r in results if r.status == LISTED)
    low = score + sum(r.zone.weight for r in results if r.status == ERROR and r.zone.weight < 0)
    high = score + sum(r.zone.weight for r in results if r.status == ERROR and r.zone.weight > 0)
    t = settings.threshold
    if low >= t:
        decision = "listed"
    elif high < t:
        decision = "pass"
    elif settings.on_error == "closed":
        decision = "tempfail"
    else:
        decision = "listed" if score >= t else "pass"
    return DnsblVerdict(ip, score, t, decision, tuple(results))


def judge_probe(zone: DnsblZone, must: DnsAnswer, must_not: DnsAnswer) -> tuple[str | None, str]:
    """RFC 5782 s.5 test points -> ("healthy" | "disabled" | None (undecided), reason)."""
    if must.failed or must_not.failed:
        return None, f"probe failed: {(must if must.failed else must_not).status.value}"
    generic = DnsblZone(zone.name, zone.display, zone.weight, [], zone.txt, zone.probe)
    r2, r1 = classify_answer(generic, must), classify_answer(generic, must_not)
    for r in (r2, r1):
        if r.status == ERROR:
            return "disabled", r.detail
    if r1.status == LISTED:
        return "disabled", "lists 127.0.0.1 (the zone lists everything?)"
    if r2.status != LISTED:
        return "disabled", "does not list 127.0.0.2 (RFC 5782 test point)"
    return "healthy", "test points answer as RFC 5782 requires"


# -- the service -------------------------------------------------------------------------------

@dataclass
class ZoneHealth:
    state: str = "unknown"        # unknown | healthy | disabled
    reason: str = ""
    probe_failures: int = 0


@dataclass
class DnsblStats:
    checks: int = 0
    listed: int = 0
    tempfail: int = 0
    zone_errors: int = 0
    zone_disabled_events: int = 0  # alerts raised
    probes: int = 0
    probe_failures: int = 0


class Dnsbl:
    """``await dnsbl.check(ip)`` -> :class:`DnsblVerdict`; ``start()``/``await stop()`` run the probes."""

    def __init__(self, settings: DnsblSettings, resolver: Resolver, *,
                 on_alert: Callable[[DnsblZone, str], None] | None = None):
        self.settings = settings
        self.resolver = resolver
        self.on_alert = on_alert
        self.stats = DnsblStats()
        self.health: dict[str, ZoneHealth] = {z.name: ZoneHealth() for z in settings.zones}
        self._matchers = {z.name: CodeMatcher(z) for z in settings.zones}
        self._probe_task: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()

    # -- checking ----------------------------------------------------------------------------
    def _ask(self, zone: DnsblZone, label: str, rtype: str, fresh: bool = False,
             timeout: float | None = None):
        return self.resolver.query(
            f"{label}.{zone.name.strip('.')}", rtype, soa_zone=zone.name,
            shared=self.settings.shared_cache, positive_ttl_cap=self.settings.listed_cache_ttl,
            fresh=fresh, timeout=timeout)

    async def check(self, ip: str | IPAddress) -> DnsblVerdict:
        """Ask every zone about ``ip`` (a string or an address object) and decide."""
        s = self.settings
        self.stats.checks += 1
        addr = _address(ip)
        ordered = await self._lookup(addr)
        ip = str(addr)
        verdict = decide(s, ip, ordered)
        for r in ordered:
            if r.status == ERROR:
                self.stats.zone_errors += 1
        if verdict.listed:
            self.stats.listed += 1
        elif verdict.tempfail:
            self.stats.tempfail += 1
        if verdict.errors:
            log.info("dnsbl %s: %s (on_error=%s)", ip, verdict.log_detail(), s.on_error)
        return verdict

    async def _lookup(self, addr: IPAddress) -> list[ZoneResult]:
        """The queries of one check (A of every trusted zone, then TXT of the listing
        ones), under the time budget; each zone's result in configured order.
        Decides nothing and counts nothing."""
        s = self.settings
        label = query_label(addr)
        deadline = time.monotonic() + s.budget
        results: dict[str, ZoneResult] = {}
        tasks: dict[asyncio.Task, DnsblZone] = {}
        for zone in s.zones:
            h = self.health[zone.name]
            if h.state == "disabled":
                results[zone.name] = ZoneResult(zone, DISABLED, detail=h.reason)
            else:
                tasks[asyncio.ensure_future(self._ask(zone, label, "A"))] = zone
        await self._collect(tasks, deadline, lambda z, a: classify_answer(z, a, self._matchers[z.name]), results)

        txt_tasks = {asyncio.ensure_future(self._ask(z, label, "TXT")): z
                     for z in s.zones if z.txt and results[z.name].status == LISTED}
        if txt_tasks:
            reasons: dict[str, ZoneResult] = {}
            await self._collect(txt_tasks, deadline, self._with_reason(results), reasons)
            for name, r in reasons.items():
                if r.status == LISTED:
                    results[name] = r
        return [results[z.name] for z in s.zones]

    def _with_reason(self, results: dict[str, ZoneResult]):
        def attach(zone: DnsblZone, answer: DnsAnswer) -> ZoneResult:
            r = results[zone.name]
            if answer.ok and answer.records:
                return ZoneResult(zone, LISTED, r.codes, clean_reason(zone, answer.records))
            return r
        return attach

    @staticmethod
    async def _collect(tasks: dict[asyncio.Task, DnsblZone], deadline: float,
                       judge: Callable[[DnsblZone, DnsAnswer], ZoneResult],
                       out: dict[str, ZoneResult]) -> None:
        if not tasks:
            return
        done, pending = await asyncio.wait(tasks, timeout=max(deadline - time.monotonic(), 0))
        for task in pending:
            task.cancel()  # only this waiter: the shared query goes on and fills the cache
            zone = tasks[task]
            out[zone.name] = judge(zone, DnsAnswer("", "A", Status.TIMEOUT, detail="budget spent"))
        for task in done:
            zone = tasks[task]
            out[zone.name] = judge(zone, task.result())

    def prefetch(self, ip: str | IPAddress) -> None:
        """Start the queries of a check in the background, to warm the cache (connect
        phase, when deciding at MAIL). Only :meth:`check` decides, counts and logs."""
        task = asyncio.ensure_future(self._lookup(_address(ip)))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- health --------------------------------------------------------------------------------
    async def probe(self) -> dict[str, ZoneHealth]:
        """One round of RFC 5782 s.5 probes of every zone (in parallel)."""
        zones = [z for z in self.settings.zones if z.probe]
        await asyncio.gather(*(self._probe_zone(z) for z in zones))
        return self.health

    async def _probe_zone(self, zone: DnsblZone) -> None:
        self.stats.probes += 1
        budget = self.settings.budget
        must, must_not = await asyncio.gather(
            self.resolver.query(f"{query_label('127.0.0.2')}.{zone.name.strip('.')}", "A",
                                soa_zone=zone.name, fresh=True, timeout=budget),
            self.resolver.query(f"{query_label('127.0.0.1')}.{zone.name.strip('.')}", "A",
                                soa_zone=zone.name, fresh=True, timeout=budget))
        state, reason = judge_probe(zone, must, must_not)
        h = self.health[zone.name]
        if state is None:
            h.probe_failures += 1
            self.stats.probe_failures += 1
            log.info("dnsbl zone %s: %s (state stays %s)", zone.display, reason, h.state)
            return
        if state == "disabled" and h.state != "disabled":
            self.stats.zone_disabled_events += 1
            log.warning("dnsbl zone %s disabled: %s", zone.display, reason)
            if self.on_alert is not None:
                self.on_alert(zone, reason)
        elif state == "healthy" and h.state == "disabled":
            log.warning("dnsbl zone %s healthy again, re-enabled", zone.display)
        h.state, h.reason = state, reason

    @property
    def disabled_zones(self) -> list[str]:
        """Display names of the zones currently not trusted (a gauge for /metrics)."""
        return [z.display for z in self.settings.zones if self.health[z.name].state == "disabled"]

    def start(self) -> None:
        """Start the background health probes (call inside the running loop)."""
        if self._probe_task is None and self.settings.health_interval > 0 and self.settings.zones:
            self._probe_task = asyncio.ensure_future(self._probe_loop())

    async def _probe_loop(self) -> None:
        while True:
            try:
                await self.probe()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("dnsbl health probe failed")
            await asyncio.sleep(self.settings.health_interval)

    async def stop(self) -> None:
        tasks = [t for t in [self._probe_task, *self._background] if t is not None]
        self._probe_task = None
        await stop_tasks(tasks, "DNSBL probes")
