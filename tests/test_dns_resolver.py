"""The cached resolver against a real UDP DNS server on loopback."""
from __future__ import annotations

import asyncio
import socket
import time

import pytest

from dns_fixtures import dns_server, make_resolver  # noqa: F401
from dns_server import TestDnsServer
from gateway.dns.resolver import Resolver, Status
from gateway.dns.settings import ResolverSettings, split_nameserver


@pytest.fixture
def zone(dns_server):
    dns_server.add_zone("example.test", minimum=60)
    dns_server.set("example.test", "MX", ["10 mx.example.test"])
    dns_server.set("mx.example.test", "A", ["93.184.216.34"])
    dns_server.set("mx.example.test", "AAAA", ["2606:2800:220:1::1"])
    dns_server.set("txt.example.test", "TXT", ["v=spf1 -all"])
    dns_server.set("alias.example.test", "CNAME", ["mx.example.test"])
    return dns_server


async def test_record_types(zone, make_resolver):
    r = make_resolver()
    mx = await r.query("example.test", "MX")
    assert mx.status is Status.OK and mx.records == ((10, "mx.example.test"),)
    assert (await r.query("mx.example.test", "A")).records == ("93.184.216.34",)
    assert (await r.query("mx.example.test", "AAAA")).records == ("2606:2800:220:1::1",)
    assert (await r.query("txt.example.test", "TXT")).records == ("v=spf1 -all",)
    alias = await r.query("ALIAS.Example.Test.", "A")  # case and trailing dot normalised
    assert alias.records == ("93.184.216.34",) and alias.name == "alias.example.test"


async def test_nxdomain_nodata_failure_are_distinct(zone, make_resolver):
    r = make_resolver()
    zone.mode("broken.example.test", "servfail")
    nx = await r.query("nothere.example.test", "A")
    nodata = await r.query("example.test", "A")
    fail = await r.query("broken.example.test", "A")
    assert nx.status is Status.NXDOMAIN and nx.negative and not nx.failed
    assert nodata.status is Status.NODATA and nodata.negative
    assert fail.status is Status.FAILURE and fail.failed and not fail.negative


async def test_servfail_not_cached(zone, make_resolver):
    r = make_resolver()
    zone.mode("broken.example.test", "servfail")
    await r.query("broken.example.test", "A")
    seen = zone.count("broken.example.test", "A")
    again = await r.query("broken.example.test", "A")
    assert again.status is Status.FAILURE and not again.cached
    assert zone.count("broken.example.test", "A") > seen
    assert r.stats.failures == 2


async def test_timeout_within_deadline(zone, make_resolver):
    zone.mode("silent.example.test", "drop")
    r = make_resolver(timeout=0.5, tries=1)
    started = time.monotonic()
    answer = await r.query("silent.example.test", "A")
    elapsed = time.monotonic() - started
    assert answer.status is Status.TIMEOUT and answer.failed
    assert elapsed < 0.5 + 0.5  # the deadline, plus scheduling margin
    assert zone.count("silent.example.test", "A") >= 1
    assert r.stats.timeouts == 1
    # a caller's own shorter deadline
    zone.mode("silent2.example.test", "drop")
    started = time.monotonic()
    answer = await r.query("silent2.example.test", "A", timeout=0.1)
    assert answer.status is Status.TIMEOUT and time.monotonic() - started < 0.1 + 0.4


async def test_positive_ttl_expiry(zone, make_resolver):
    r = make_resolver()
    zone.set("ttl.example.test", "A", ["192.0.2.10"], ttl=1)
    first = await r.query("ttl.example.test", "A")
    assert first.records == ("192.0.2.10",) and first.ttl == 1 and not first.cached
    zone.set("ttl.example.test", "A", ["192.0.2.11"], ttl=1)
    cached = await r.query("ttl.example.test", "A")
    assert cached.cached and cached.records == ("192.0.2.10",)
    assert zone.count("ttl.example.test", "A") == 1
    await asyncio.sleep(1.2)
    fresh = await r.query("ttl.example.test", "A")
    assert fresh.records == ("192.0.2.11",) and not fresh.cached
    assert zone.count("ttl.example.test", "A") == 2


async def test_ttl_floor_and_ceiling(zone, make_resolver):
    zone.set("short.example.test", "A", ["192.0.2.1"], ttl=1)
    zone.set("long.example.test", "A", ["192.0.2.2"], ttl=86400)
    r = make_resolver(min_ttl=30, max_ttl=600)
    assert (await r.query("short.example.test", "A")).ttl == 30
    assert (await r.query("long.example.test", "A")).ttl == 600
    await asyncio.sleep(1.1)
    assert (await r.query("short.example.test", "A")).cached  # the floor holds it
    assert zone.count("short.example.test", "A") == 1


async def test_negative_cache_uses_soa_minimum(dns_server, make_resolver):
    dns_server.add_zone("neg.test", minimum=1, soa_ttl=3600)
    r = make_resolver(negative_ttl=300)
    first = await r.query("missing.neg.test", "A", soa_zone="neg.test")
    assert first.status is Status.NXDOMAIN and first.ttl == 1
    second = await r.query("missing.neg.test", "A", soa_zone="neg.test")
    assert second.cached and second.status is Status.NXDOMAIN
    assert dns_server.count("missing.neg.test", "A") == 1
    dns_server.set("missing.neg.test", "A", ["192.0.2.7"], ttl=0)
    await asyncio.sleep(1.2)
    third = await r.query("missing.neg.test", "A", soa_zone="neg.test")
    assert third.status is Status.OK and third.records == ("192.0.2.7",)
    # the SOA was looked up once and cached
    assert dns_server.count("neg.test", "SOA") == 1


async def test_negative_ttl_bounded_and_default(dns_server, make_resolver):
    dns_server.add_zone("long-neg.test", minimum=86400, soa_ttl=86400)
    r = make_resolver(negative_ttl=7, negative_ttl_max=120)
    bounded = await r.query("x.long-neg.test", "A", soa_zone="long-neg.test")
    assert bounded.ttl == 120
    # no zone named: the configured default
    assert (await r.query("y.long-neg.test", "A")).ttl == 7
    # a name that is not the apex: the resolver tries the parent's SOA
    assert (await r.query("z.long-neg.test", "MX", soa_zone="z.long-neg.test")).ttl == 120


async def test_coalescing_one_query_at_the_server(zone, make_resolver):
    r = make_resolver()
    zone.set("hot.example.test", "A", ["192.0.2.99"])
    answers = await asyncio.gather(*(r.query("hot.example.test", "A") for _ in range(100)))
    assert all(a.records == ("192.0.2.99",) for a in answers)
    assert zone.count("hot.example.test", "A") == 1
    assert r.stats.coalesced == 99 and r.stats.queries == 1


async def test_cancelled_waiter_does_not_cancel_shared_query(zone, make_resolver):
    r = make_resolver()
    zone.set("shared.example.test", "A", ["192.0.2.5"])
    t1 = asyncio.ensure_future(r.query("shared.example.test", "A"))
    t2 = asyncio.ensure_future(r.query("shared.example.test", "A"))
    await asyncio.sleep(0)
    t1.cancel()
    assert (await t2).records == ("192.0.2.5",)
    assert zone.count("shared.example.test", "A") == 1


async def test_lru_eviction(zone, make_resolver):
    r = make_resolver(cache_size=3)
    for i in range(4):
        zone.set(f"h{i}.example.test", "A", [f"192.0.2.{i + 1}"])
        await r.query(f"h{i}.example.test", "A")
    assert r.stats.evictions == 1
    assert (await r.query("h3.example.test", "A")).cached
    # evicted: asked again (c-ares' own query cache may answer it, see docs/dns.md,
    # so count at the resolver rather than at the server)
    before = r.stats.queries
    again = await r.query("h0.example.test", "A")
    assert not again.cached and r.stats.queries == before + 1


async def test_ipv6_nameserver():
    try:
        srv = TestDnsServer(host="::1").start()
    except OSError:
        pytest.skip("no IPv6 loopback in this environment")
    try:
        srv.set("v6.test", "A", ["192.0.2.6"])
        r = Resolver(ResolverSettings(nameservers=[srv.address], timeout=1.0))
        try:
            assert (await r.query("v6.test", "A")).records == ("192.0.2.6",)
        finally:
            await r.close()
    finally:
        srv.stop()


async def test_static_table_needs_no_server():
    # nameserver is a closed port: anything not in the table would fail
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    dead = f"127.0.0.1:{s.getsockname()[1]}"
    s.close()
    r = Resolver(ResolverSettings(nameservers=[dead], timeout=0.3, static=[
        "dev.example MX 10 mx.dev.example",
        "mx.dev.example A 192.0.2.25",
        "mx.dev.example AAAA 2001:db8::25",
        "null.example MX 0 .",
        "2.0.0.127.bl.example A 127.0.0.2",
        "2.0.0.127.bl.example TXT \"listed for testing\"",
        "gone.example NXDOMAIN",
    ]))
    try:
        assert (await r.query("dev.example", "MX")).records == ((10, "mx.dev.example"),)
        assert (await r.query("mx.dev.example", "AAAA")).records == ("2001:db8::25",)
        assert (await r.query("null.example", "MX")).records == ((0, ""),)
        assert (await r.query("2.0.0.127.bl.example", "TXT")).records == ("listed for testing",)
        assert (await r.query("gone.example", "A")).status is Status.NXDOMAIN
        assert (await r.query("dev.example", "A")).status is Status.NODATA
        assert (await r.query("elsewhere.example", "A")).failed  # goes to (dead) DNS
        assert r.stats.static == 6
    finally:
        await r.close()
    only = Resolver(ResolverSettings(static=["a.example A 192.0.2.1"], static_only=True))
    assert (await only.query("b.example", "A")).status is Status.NXDOMAIN
    assert only.stats.queries == 0
    await only.close()


class FakeRedis:
    """Just the two calls the resolver uses, with redis-py's signatures."""

    def __init__(self, fail: bool = False):
        self.data: dict[str, bytes] = {}
        self.fail = fail

    async def get(self, key):
        if self.fail:
            raise ConnectionError("redis down")
        return self.data.get(key)

    async def set(self, key, value, ex=None):
        if self.fail:
            raise ConnectionError("redis down")
        self.data[key] = value


async def test_shared_cache_between_gateways(zone, make_resolver):
    redis = FakeRedis()
    zone.set("2.0.0.127.bl.example.test", "A", ["127.0.0.2"], ttl=300)
    a, b = make_resolver(redis=redis), make_resolver(redis=redis)
    first = await a.query("2.0.0.127.bl.example.test", "A", shared=True)
    assert first.records == ("127.0.0.2",) and any(k.endswith("2.0.0.127.bl.example.test") for k in redis.data)
    second = await b.query("2.0.0.127.bl.example.test", "A", shared=True)
    assert second.cached and second.records == ("127.0.0.2",) and b.stats.shared_hits == 1
    assert zone.count("2.0.0.127.bl.example.test", "A") == 1
    # not-shared lookups never touch Redis
    await a.query("mx.example.test", "A")
    assert not any("mx.example.test" in k for k in redis.data)


async def test_shared_cache_failure_falls_back_to_dns(zone, make_resolver):
    r = make_resolver(redis=FakeRedis(fail=True))
    answer = await r.query("mx.example.test", "A", shared=True)
    assert answer.records == ("93.184.216.34",)
    assert r.stats.shared_errors == 2  # read and write


async def test_stats(zone, make_resolver):
    r = make_resolver()
    await r.query("mx.example.test", "A")
    await r.query("mx.example.test", "A")
    await r.query("nope.example.test", "A")
    d = r.stats.as_dict()
    assert d["lookups"] == 3 and d["cache_hits"] == 1 and d["queries"] >= 2
    assert d["latency_buckets"]["+Inf"] == d["queries"]


@pytest.mark.parametrize("kw, message", [
    ({"nameservers": ["dns.example"]}, "IP address"),
    ({"nameservers": ["127.0.0.1:99999"]}, "bad port"),
    ({"timeout": 0}, "timeout"),
    ({"min_ttl": 10, "max_ttl": 5}, "min_ttl"),
    ({"static": ["x.example A ::1"]}, "family"),
    ({"static": ["x.example MX mx.example"]}, "MX data"),
    ({"static": ["x.example SRV 1 2 3 x"]}, "unsupported"),
])
def test_settings_validation(kw, message):
    with pytest.raises(ValueError, match=message):
        ResolverSettings(**kw)


def test_nameserver_forms():
    assert split_nameserver("192.0.2.1") == ("192.0.2.1", 53)
    assert split_nameserver("192.0.2.1:5353") == ("192.0.2.1", 5353)
    assert split_nameserver("::1") == ("::1", 53)
    assert split_nameserver("[::1]:5353") == ("::1", 5353)
