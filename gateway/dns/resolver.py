"""The cached async resolver every DNS-using check shares (aiodns / c-ares).

What it adds to aiodns:

* a positive cache that honours record TTLs, clamped to [min_ttl, max_ttl];
* a negative cache for NXDOMAIN/NODATA whose lifetime is the zone's SOA
  minimum (RFC 2308 s.5: min(SOA TTL, SOA MINIMUM)), bounded by
  negative_ttl_max. c-ares (through pycares 5) hands no SOA to the caller
  for a negative answer, so the caller names the zone (``soa_zone``) and the
  resolver looks its SOA up once (cached like any answer);
* LRU eviction at ``cache_size`` entries;
* coalescing: concurrent lookups of one (name, type) share one query;
* a per-lookup deadline; a resolver failure or timeout is its own status and
  is never cached, so it cannot be mistaken for "does not exist";
* a static override table (``--dev``, tests without a DNS server);
* an optional Redis cache shared by several gateways, used for the answers a
  caller marks ``shared`` (the DNSBL answers);
* counters for metrics.
"""
from __future__ import annotations

import asyncio
import bisect
import enum
import ipaddress
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import orjson

from .settings import ResolverSettings, parse_static_record, split_nameserver
from ..state.deadline import within

log = logging.getLogger("gateway.dns")


class Status(str, enum.Enum):
    OK = "ok"
    NXDOMAIN = "nxdomain"   # the name does not exist
    NODATA = "nodata"       # the name exists, no records of this type
    FAILURE = "failure"     # SERVFAIL, REFUSED, unreachable server, bad response...
    TIMEOUT = "timeout"     # no answer within the deadline


@dataclass(frozen=True, slots=True)
class DnsAnswer:
    """One lookup's result.

    ``records`` by type: A/AAAA: address strings; MX: (preference, host)
    with the host lower-case without the trailing dot ("" is the root, so
    ``(0, "")`` is a null MX); TXT: the text (strings of one record joined);
    SOA: (mname, rname, serial, refresh, retry, expire, minimum);
    CNAME/NS/PTR: host names. ``ttl`` is the lifetime the answer was cached
    with; ``cached`` says it came from a cache (memory or shared).
    """

    name: str
    rtype: str
    status: Status
    records: tuple = ()
    ttl: int = 0
    cached: bool = False
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status is Status.OK

    @property
    def negative(self) -> bool:
        """The name or type authoritatively does not exist."""
        return self.status is Status.NXDOMAIN or self.status is Status.NODATA

    @property
    def failed(self) -> bool:
        """No answer we can trust (the question is still open)."""
        return self.status is Status.FAILURE or self.status is Status.TIMEOUT


# Latency histogram bounds, seconds (Prometheus-style cumulative buckets).
LATENCY_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass
class ResolverStats:
    lookups: int = 0          # calls of query()
    queries: int = 0          # queries sent to DNS servers
    cache_hits: int = 0       # answered from the memory cache (positive or negative)
    negative_hits: int = 0    # ... of which negative answers
    shared_hits: int = 0      # answered from the shared (Redis) cache
    shared_errors: int = 0    # the shared cache failed (lookup went to DNS)
    coalesced: int = 0        # lookups that joined a query already in flight
    static: int = 0           # answered from the static table
    failures: int = 0         # FAILURE answers from DNS
    timeouts: int = 0         # TIMEOUT (deadline passed)
    evictions: int = 0        # LRU evictions
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS) + 1))
    latency_sum: float = 0.0  # seconds, DNS queries only

    def observe(self, seconds: float) -> None:
        self.latency_counts[bisect.bisect_left(LATENCY_BOUNDS, seconds)] += 1
        self.latency_sum += seconds

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "latency_counts"}
        d["latency_buckets"] = {
            **{str(b): c for b, c in zip(LATENCY_BOUNDS, _cumulative(self.latency_counts))},
            "+Inf": sum(self.latency_counts),
        }
        return d


def _cumulative(counts: list[int]) -> list[int]:
    out, total = [], 0
    for c in counts:
        total += c
        out.append(total)
    return out


def normalize_name(name: str) -> str:
    return name.rstrip(".").lower()


def _to_ares_server(spec: str) -> str:
    host, port = split_nameserver(spec)
    if ipaddress.ip_address(host).version == 6:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def _static_table(lines: list[str]) -> dict[str, dict[str, tuple] | None]:
    """name -> {type: records} ; None marks NXDOMAIN."""
    table: dict[str, dict[str, tuple] | None] = {}
    for line in lines:
        name, rtype, data = parse_static_record(line)
        if rtype == "NXDOMAIN":
            table[name] = None
            continue
        rec: Any
        if rtype == "MX":
            pref, _, host = data.partition(" ")
            rec = (int(pref), normalize_name(host.strip()))
        elif rtype in ("CNAME", "NS", "PTR"):
            rec = normalize_name(data)
        elif rtype == "SOA":
            f = data.split()
            rec = (normalize_name(f[0]), normalize_name(f[1]), *map(int, f[2:7]))
        elif rtype == "TXT":
            rec = data[1:-1] if len(data) >= 2 and data[0] == data[-1] == '"' else data
        else:
            rec = data
        entry = table.setdefault(name, {})
        if entry is None:
            raise ValueError(f"static record {line!r}: name is also marked NXDOMAIN")
        entry[rtype] = entry.get(rtype, ()) + (rec,)
    return table


def _record_value(rtype: str, data: Any) -> Any:
    if rtype in ("A", "AAAA"):
        return data.addr
    if rtype == "MX":
        return (data.priority, normalize_name(data.exchange))
    if rtype == "TXT":
        raw = data.data
        return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    if rtype == "SOA":
        return (normalize_name(data.mname), normalize_name(data.rname), data.serial, data.refresh,
                data.retry, data.expire, data.minimum)
    if rtype == "CNAME":
        return normalize_name(data.cname)
    if rtype == "NS":
        return normalize_name(data.nsdname)
    if rtype == "PTR":
        return normalize_name(data.dname)
    return repr(data)


class Resolver:
    """``await resolver.query(name, "MX")`` -> :class:`DnsAnswer`; never raises for DNS reasons."""

    def __init__(self, settings: ResolverSettings, redis: Any = None, *, clock=time.monotonic,
                 zone_file: str | None = None):
        self.settings = settings
        self.stats = ResolverStats()
        self._redis = redis
        self._clock = clock
        self._static = _static_table(settings.static)
        # dev mode only: the dev zone (dns/devzone.py) on top of the static table
        self._zone = None
        if zone_file:
            from .devzone import ZoneFile
            self._zone = ZoneFile(zone_file)
        self._cache: OrderedDict[tuple[str, str], tuple[float, DnsAnswer]] = OrderedDict()
        self._inflight: dict[tuple[str, str], asyncio.Future[DnsAnswer]] = {}
        self._channel: Any = None  # aiodns.DNSResolver, made on first use (needs the loop)
        self._closed = False

    # -- public -------------------------------------------------------------------
    async def query(self, name: str, rtype: str = "A", *, soa_zone: str | None = None,
                    shared: bool = False, positive_ttl_cap: int | None = None,
                    fresh: bool = False, timeout: float | None = None) -> DnsAnswer:
        """Look ``name``/``rtype`` up.

        soa_zone: zone whose SOA minimum bounds the negative-cache lifetime.
        shared: use the shared (Redis) cache too. positive_ttl_cap: cache an
        OK answer at most this long (DNSBL listings). fresh: skip the cache
        read (health probes). timeout: this caller's own, shorter deadline.
        """
        stats = self.stats
        stats.lookups += 1
        key = (name, rtype)
        cache = self._cache
        if not fresh:
            entry = cache.get(key)
            if entry is None and (name[-1:] == "." or not name.islower()):
                name = normalize_name(name)
                key = (name, rtype)
                entry = cache.get(key)
            if entry is not None:
                if entry[0] > self._clock():
                    cache.move_to_end(key)
                    stats.cache_hits += 1
                    answer = entry[1]
                    if answer.status is not Status.OK:
                        stats.negative_hits += 1
                    return answer
                del cache[key]
        else:
            name = normalize_name(name)
            key = (name, rtype)
        if self._zone is not None and self._zone.changed():
            try:
                self._static = _static_table(self.settings.static + self._zone.records)
            except ValueError as exc:   # e.g. a name both NXDOMAIN and with records
                log.warning("dev zone %s not applied: %s", self._zone.path, exc)
        if self._static and name in self._static or self.settings.static_only:
            stats.static += 1
            return self._from_static(name, rtype)
        task = self._inflight.get(key)
        if task is not None:
            stats.coalesced += 1
        else:
            task = asyncio.ensure_future(self._fetch(name, rtype, soa_zone, shared, positive_ttl_cap))
            self._inflight[key] = task
            task.add_done_callback(self._forget_inflight(key))
        if timeout is None:
            return await asyncio.shield(task)
        try:
            return await within(asyncio.shield(task), timeout)
        except asyncio.TimeoutError:
            return DnsAnswer(name, rtype, Status.TIMEOUT, detail=f"no answer within {timeout:g}s")

    async def close(self) -> None:
        self._closed = True
        for task in list(self._inflight.values()):
            task.cancel()
        self._inflight.clear()
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close()

    # -- internals ----------------------------------------------------------------------
    def _forget_inflight(self, key: tuple[str, str]) -> Callable[[asyncio.Future[DnsAnswer]], None]:
        """The done callback of an in-flight query: it is no longer in flight."""
        def done(_task: asyncio.Future[DnsAnswer]) -> None:
            self._inflight.pop(key, None)
        return done

    def _from_static(self, name: str, rtype: str) -> DnsAnswer:
        entry = self._static.get(name)
        if entry is None:
            return DnsAnswer(name, rtype, Status.NXDOMAIN, detail="static")
        records = entry.get(rtype)
        if not records:
            return DnsAnswer(name, rtype, Status.NODATA, detail="static")
        return DnsAnswer(name, rtype, Status.OK, records, 0, detail="static")

    def _get_channel(self) -> Any:
        if self._channel is None:
            if self._closed:
                raise RuntimeError("resolver closed")
            import aiodns  # imported here so static-only use needs no c-ares

            kwargs: dict[str, Any] = {
                "timeout": self.settings.timeout / self.settings.tries,
                "tries": self.settings.tries,
            }
            # pycares 5.2 builds ares_options itself and offers no way to set
            # qcache_max_ttl, so c-ares' own query cache (<= min(record TTL,
            # 1 h)) stays on; docs/dns.md explains what that means.
            channel = aiodns.DNSResolver(loop=asyncio.get_running_loop(), **kwargs)
            if self.settings.nameservers:
                channel.nameservers = [_to_ares_server(s) for s in self.settings.nameservers]
            self._channel = channel
        return self._channel

    async def _fetch(self, name: str, rtype: str, soa_zone: str | None, shared: bool,
                     cap: int | None) -> DnsAnswer:
        deadline = self._clock() + self.settings.timeout
        try:
            if shared and self._redis is not None:
                answer = await self._shared_get(name, rtype, deadline)
                if answer is not None:
                    self._store(name, rtype, answer, answer.ttl)
                    return answer
            answer = await self._ask(name, rtype, deadline)
            if answer.status is Status.OK:
                ttl = min(max(answer.ttl, self.settings.min_ttl), self.settings.max_ttl)
                if cap is not None:
                    ttl = min(ttl, cap)
            elif answer.negative:
                ttl = await self._negative_ttl(soa_zone, deadline)
            else:
                return answer  # failures are never cached
            answer = DnsAnswer(name, rtype, answer.status, answer.records, ttl, False, answer.detail)
            self._store(name, rtype, answer, ttl)
            if shared and self._redis is not None and ttl > 0:
                await self._shared_set(name, rtype, answer, ttl, deadline)
            return answer
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug or an unexpected library error is a failure, not a verdict
            log.exception("dns lookup %s %s failed", name, rtype)
            self.stats.failures += 1
            return DnsAnswer(name, rtype, Status.FAILURE, detail=f"internal: {type(exc).__name__}")

    def _store(self, name: str, rtype: str, answer: DnsAnswer, ttl: int) -> None:
        if ttl <= 0 or self.settings.cache_size == 0:
            return
        cached = DnsAnswer(name, rtype, answer.status, answer.records, ttl, True, answer.detail)
        key = (name, rtype)
        cache = self._cache
        cache[key] = (self._clock() + ttl, cached)
        cache.move_to_end(key)
        while len(cache) > self.settings.cache_size:
            cache.popitem(last=False)
            self.stats.evictions += 1

    async def _ask(self, name: str, rtype: str, deadline: float) -> DnsAnswer:
        import aiodns
        import pycares

        channel = self._get_channel()
        self.stats.queries += 1
        started = time.perf_counter()
        remaining = max(deadline - self._clock(), 0.001)
        try:
            async with asyncio.timeout(remaining):
                result = await channel.query_dns(name, rtype)
        except TimeoutError:
            self.stats.timeouts += 1
            return DnsAnswer(name, rtype, Status.TIMEOUT, detail=f"no answer within {self.settings.timeout:g}s")
        except aiodns.error.DNSError as exc:
            code = exc.args[0] if exc.args else None
            self.stats.observe(time.perf_counter() - started)
            if code == pycares.errno.ARES_ENOTFOUND:
                return DnsAnswer(name, rtype, Status.NXDOMAIN)
            if code == pycares.errno.ARES_ENODATA:
                return DnsAnswer(name, rtype, Status.NODATA)
            if code == pycares.errno.ARES_EBADNAME:
                # not a name DNS can hold: it cannot exist
                return DnsAnswer(name, rtype, Status.NXDOMAIN, detail="bad name")
            if code == pycares.errno.ARES_ETIMEOUT:
                self.stats.timeouts += 1
                return DnsAnswer(name, rtype, Status.TIMEOUT, detail="c-ares timeout")
            self.stats.failures += 1
            text = exc.args[1] if len(exc.args) > 1 else str(code)
            return DnsAnswer(name, rtype, Status.FAILURE, detail=str(text))
        self.stats.observe(time.perf_counter() - started)
        want = getattr(pycares, f"QUERY_TYPE_{rtype}")
        records, ttl = [], None
        for rr in result.answer:
            ttl = rr.ttl if ttl is None else min(ttl, rr.ttl)  # CNAMEs on the way count too
            if rr.type == want:
                records.append(_record_value(rtype, rr.data))
        if not records:
            return DnsAnswer(name, rtype, Status.NODATA)
        return DnsAnswer(name, rtype, Status.OK, tuple(records), int(ttl or 0))

    async def _negative_ttl(self, soa_zone: str | None, deadline: float) -> int:
        s = self.settings
        ttl = s.negative_ttl
        zone = normalize_name(soa_zone) if soa_zone else ""
        # the zone named, else its parent (a non-apex name, or one that does not exist)
        for _ in range(2):
            remaining = deadline - self._clock()
            if not zone or remaining <= 0:
                break
            soa = await self.query(zone, "SOA", timeout=remaining)
            if soa.ok and soa.records:
                minimum = soa.records[0][6]
                ttl = min(minimum, soa.ttl) if soa.ttl else minimum
                break
            if soa.failed or "." not in zone:
                break
            zone = zone.partition(".")[2]
        return max(0, min(ttl, s.negative_ttl_max))

    # -- shared cache (Redis) ---------------------------------------------------------------
    def _redis_key(self, name: str, rtype: str) -> str:
        return f"{self.settings.redis_prefix}{rtype}:{name}"

    async def _shared_get(self, name: str, rtype: str, deadline: float) -> DnsAnswer | None:
        try:
            async with asyncio.timeout(max(deadline - self._clock(), 0.001) / 2):
                raw = await self._redis.get(self._redis_key(name, rtype))
            if raw is None:
                return None
            d = orjson.loads(raw)
            ttl = int(d["x"] - time.time())
            if ttl <= 0:
                return None
            records = tuple(tuple(r) if isinstance(r, list) else r for r in d["r"])
            self.stats.shared_hits += 1
            return DnsAnswer(name, rtype, Status(d["s"]), records, ttl, True, "shared")
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception as exc:
            self.stats.shared_errors += 1
            log.warning("shared dns cache read failed: %s", type(exc).__name__)
            return None

    async def _shared_set(self, name: str, rtype: str, answer: DnsAnswer, ttl: int, deadline: float) -> None:
        payload = orjson.dumps({"s": answer.status.value, "r": list(answer.records), "x": time.time() + ttl})
        try:
            async with asyncio.timeout(max(deadline - self._clock(), 0.05)):
                await self._redis.set(self._redis_key(name, rtype), payload, ex=ttl)
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception as exc:
            self.stats.shared_errors += 1
            log.warning("shared dns cache write failed: %s", type(exc).__name__)
