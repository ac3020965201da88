"""Does a sender domain exist and take mail? (P-DOM)

A domain passes when it has an MX whose host resolves to at least one usable
address, or, with no MX at all, an A/AAAA record that is usable (the implicit
MX of RFC 5321 s.5.1). It fails on NXDOMAIN, on a null MX (RFC 7505), and
when every mail host resolves only into special-purpose networks
(``bogus_networks``: 0/8, 127/8, RFC 1918, link-local, documentation, ...)
or does not resolve at all. A resolver failure or timeout is never a
verdict: it is TEMPFAIL and the caller defers.

:func:`evaluate` is the pure rule; :func:`check_domain_exists` gathers the
answers through the shared resolver. Both the MAIL FROM check
(``checks/mail_domain_exists.py``) and the header From check call the latter.
"""
from __future__ import annotations

import asyncio
import enum
import ipaddress
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache

import idna

from ..core import replies
from ..core.replies import Reply
from .resolver import DnsAnswer, Resolver, Status
from .settings import DomainSettings


class DomainStatus(str, enum.Enum):
    EXISTS = "exists"
    NXDOMAIN = "nxdomain"      # the domain does not exist
    NULL_MX = "null_mx"        # RFC 7505: the domain says it takes no mail
    NO_MAIL = "no_mail"        # exists, but no usable mail host (no MX/A/AAAA, or only bogus ones)
    TEMPFAIL = "tempfail"      # DNS failed or timed out: ask again later
    INVALID = "invalid"        # not a domain name DNS can hold


@dataclass(frozen=True, slots=True)
class DomainVerdict:
    domain: str                # A-label form that was looked up
    status: DomainStatus
    detail: str = ""
    via: str = ""              # "MX" | "A" | "AAAA" (implicit MX) when it exists

    @property
    def exists(self) -> bool:
        return self.status is DomainStatus.EXISTS


def reply_for(verdict: DomainVerdict, header: bool = False) -> Reply | None:
    """The catalogue reply for a verdict (None when the domain passes)."""
    st = verdict.status
    if st is DomainStatus.EXISTS:
        return None
    if st is DomainStatus.TEMPFAIL:
        return replies.DNS_TEMPFAIL
    if st is DomainStatus.NULL_MX:
        return replies.HEADER_FROM_NULL_MX if header else replies.NULL_MX
    if st is DomainStatus.NO_MAIL:
        return replies.HEADER_FROM_DOMAIN_NO_MAIL if header else replies.DOMAIN_NO_MAIL
    return replies.HEADER_FROM_DOMAIN_NOT_FOUND if header else replies.DOMAIN_NOT_FOUND


def to_a_label(domain: str) -> str | None:
    """U-label or A-label domain -> lower-case A-label form, None if not a valid name."""
    d = domain.strip().rstrip(".")
    if not d or d.startswith("["):
        return None
    try:
        if d.isascii():
            out = d.lower()
            # validate xn-- labels too (a bogus A-label is not a name)
            if "xn--" in out:
                idna.decode(out)
        else:
            out = idna.encode(d, uts46=True).decode("ascii").lower()
    except idna.IDNAError:
        return None
    if len(out) > 253 or any(not 0 < len(label) <= 63 for label in out.split(".")):
        return None
    return out


@lru_cache(maxsize=64)
def _networks(bogus: tuple[str, ...]) -> tuple:
    return tuple(ipaddress.ip_network(n, strict=False) for n in bogus)


def is_bogus(address: str, networks: tuple) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return True
    if ip.version == 6 and ip.ipv4_mapped is not None:
        mapped = ip.ipv4_mapped
        if any(mapped in n for n in networks if n.version == 4):
            return True
    return any(ip in n for n in networks if n.version == ip.version)


@dataclass(frozen=True, slots=True)
class HostAddresses:
    """A mail host's A and AAAA answers."""

    host: str
    a: DnsAnswer
    aaaa: DnsAnswer


def classify_host(h: HostAddresses, networks: tuple) -> str:
    """usable | bogus | missing | unknown"""
    addrs = [*(h.a.records if h.a.ok else ()), *(h.aaaa.records if h.aaaa.ok else ())]
    if any(not is_bogus(a, networks) for a in addrs):
        return "usable"
    if h.a.failed or h.aaaa.failed:
        return "unknown"
    return "bogus" if addrs else "missing"


def evaluate(domain: str, mx: DnsAnswer, hosts: list[HostAddresses], settings: DomainSettings) -> DomainVerdict:
    """The rule, from the answers gathered by :func:`check_domain_exists`.

    ``hosts`` holds the mail hosts' addresses: the MX hosts when there are
    MX records, else the domain itself (implicit MX).
    """
    nets = _networks(tuple(settings.bogus_networks))
    if mx.failed:
        return DomainVerdict(domain, DomainStatus.TEMPFAIL, f"MX lookup: {mx.status.value}")
    if mx.status is Status.NXDOMAIN:
        return DomainVerdict(domain, DomainStatus.NXDOMAIN, "NXDOMAIN")
    if mx.ok:
        real = [r for r in mx.records if r[1] not in ("", ".")]
        if not real:
            return DomainVerdict(domain, DomainStatus.NULL_MX, "null MX (RFC 7505)")
        if not settings.check_mx_hosts:
            return DomainVerdict(domain, DomainStatus.EXISTS, f"{len(real)} MX", "MX")
        kinds = {h.host: classify_host(h, nets) for h in hosts}
        if "usable" in kinds.values():
            return DomainVerdict(domain, DomainStatus.EXISTS, f"{len(real)} MX", "MX")
        if "unknown" in kinds.values():
            return DomainVerdict(domain, DomainStatus.TEMPFAIL, "MX host lookup failed")
        desc = ", ".join(f"{h}={k}" for h, k in kinds.items())
        return DomainVerdict(domain, DomainStatus.NO_MAIL, f"no usable MX host ({desc})")
    # NODATA for MX: the implicit MX is the domain's own A/AAAA (RFC 5321 s.5.1)
    if not hosts:
        return DomainVerdict(domain, DomainStatus.NO_MAIL, "no MX, A or AAAA")
    h = hosts[0]
    if h.a.status is Status.NXDOMAIN and h.aaaa.status is Status.NXDOMAIN:
        return DomainVerdict(domain, DomainStatus.NXDOMAIN, "NXDOMAIN")
    kind = classify_host(h, nets)
    if kind == "usable":
        via = "A" if h.a.ok and any(not is_bogus(a, nets) for a in h.a.records) else "AAAA"
        return DomainVerdict(domain, DomainStatus.EXISTS, f"implicit MX ({via})", via)
    if kind == "unknown":
        return DomainVerdict(domain, DomainStatus.TEMPFAIL, "A/AAAA lookup failed")
    if kind == "bogus":
        return DomainVerdict(domain, DomainStatus.NO_MAIL, "no MX; A/AAAA only in bogus networks")
    return DomainVerdict(domain, DomainStatus.NO_MAIL, "no MX, A or AAAA")


async def _addresses(resolver: Resolver, host: str, soa_zone: str) -> HostAddresses:
    a, aaaa = await asyncio.gather(resolver.query(host, "A", soa_zone=soa_zone),
                                   resolver.query(host, "AAAA", soa_zone=soa_zone))
    return HostAddresses(host, a, aaaa)


# Verdicts per resolver, kept no longer than the shortest TTL of the answers
# they were made from: the same sender domain on every message costs a dict
# lookup instead of several cached queries, task switches and address scans.
_verdicts: "weakref.WeakKeyDictionary[Resolver, OrderedDict]" = weakref.WeakKeyDictionary()
_VERDICTS_MAX = 10_000


async def check_domain_exists(resolver: Resolver, domain: str, settings: DomainSettings) -> DomainVerdict:
    """Look ``domain`` (A-label or U-label) up and judge it; never raises for DNS reasons."""
    cache = _verdicts.get(resolver)
    if cache is None:
        cache = _verdicts[resolver] = OrderedDict()
    key = (domain, id(settings))
    hit = cache.get(key)
    now = time.monotonic()
    if hit is not None and hit[0] > now:
        cache.move_to_end(key)
        return hit[1]
    verdict, ttl = await _check_domain_exists(resolver, domain, settings)
    if ttl > 0 and verdict.status is not DomainStatus.TEMPFAIL:
        cache[key] = (now + ttl, verdict)
        cache.move_to_end(key)
        if len(cache) > _VERDICTS_MAX:
            cache.popitem(last=False)
    return verdict


async def _check_domain_exists(resolver: Resolver, domain: str, settings: DomainSettings
                               ) -> tuple[DomainVerdict, int]:
    """The verdict and how long it may be reused (the shortest TTL involved)."""
    name = to_a_label(domain)
    if name is None:
        return DomainVerdict(domain, DomainStatus.INVALID, "not a valid domain name"), 0
    # negative answers are cached for the SOA minimum of the zone the name
    # lives in (the resolver tries the name, then its parent)
    mx = await resolver.query(name, "MX", soa_zone=name)
    hosts: list[HostAddresses] = []
    if mx.ok and settings.check_mx_hosts:
        real = sorted((r for r in mx.records if r[1] not in ("", ".")), key=lambda r: r[0])
        targets = list(dict.fromkeys(r[1] for r in real))[: settings.max_mx_hosts]
        hosts = list(await asyncio.gather(*(_addresses(resolver, t, t) for t in targets)))
    elif mx.status is Status.NODATA:
        hosts = [await _addresses(resolver, name, name)]
    ttl = min([mx.ttl, *(x.ttl for h in hosts for x in (h.a, h.aaaa))])
    return evaluate(name, mx, hosts, settings), ttl
