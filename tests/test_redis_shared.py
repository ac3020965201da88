"""The scale-out paths on a real Redis (127.0.0.1:6379): the DNSBL answers
shared between gateways' resolvers, AUTH failure counts shared between
gateways, and one Redis client per gateway for both (the resolver's shared
DNS cache borrows the counters' client, closed once, after the resolver). Skipped visibly without Redis, except under CI=true."""
from __future__ import annotations

import secrets

import aiosmtplib
import pytest

from conftest import need, tcp_reachable

REDIS_URL = "redis://127.0.0.1:6379/0"


async def test_dnsbl_answers_shared_between_resolvers(redis_client, dns_server, make_resolver):
    prefix = f"gwtest:{secrets.token_hex(4)}:"
    dns_server.add_zone("bl.shared.test")
    dns_server.set("2.0.0.127.bl.shared.test", "A", ["127.0.0.2"], ttl=300)
    a = make_resolver(redis=redis_client, redis_prefix=prefix)
    b = make_resolver(redis=redis_client, redis_prefix=prefix)
    first = await a.query("2.0.0.127.bl.shared.test", "A", shared=True)
    assert first.records == ("127.0.0.2",)
    keys = [k async for k in redis_client.scan_iter(match=f"{prefix}*")]
    assert keys, "the answer was written to Redis"
    second = await b.query("2.0.0.127.bl.shared.test", "A", shared=True)
    assert second.cached and second.records == ("127.0.0.2",) and b.stats.shared_hits == 1
    assert dns_server.count("2.0.0.127.bl.shared.test", "A") == 1   # one DNS query for both gateways
    ttl = await redis_client.ttl(keys[0])
    assert 0 < ttl <= 300
    for k in keys:
        await redis_client.delete(k)


async def test_auth_failures_counted_across_gateways(sink, gateway_factory, redis_client):
    """Two gateways sharing Redis counters: failures at A count at B."""
    prefix = f"gwtest:{secrets.token_hex(4)}:"
    common = dict(counters={"backend": "redis", "redis_url": REDIS_URL, "key_prefix": prefix},
                  auth={"max_failures_per_ip": 100, "max_failures_per_account": 3})
    a = await gateway_factory(sink, **common)
    await a.add_account()
    b = await gateway_factory(sink, **common, storage={"url": a.gw.config.storage.url})
    for _ in range(3):
        c = aiosmtplib.SMTP(hostname="127.0.0.1", port=a.port(), timeout=10)
        await c.connect()
        with pytest.raises(aiosmtplib.SMTPAuthenticationError):
            await c.login("alice", "wrong")
        await c.quit()
    c = aiosmtplib.SMTP(hostname="127.0.0.1", port=b.port(), timeout=10)
    await c.connect()
    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as err:
        await c.login("alice", "s3cret")
    assert err.value.code == 454, "gateway B sees the failures counted at gateway A"
    await c.quit()
    async for k in redis_client.scan_iter(match=f"{prefix}*"):
        await redis_client.delete(k)


async def test_resolver_borrows_the_counters_redis_client_closed_once_after_it(sink, gateway_factory):
    need(tcp_reachable("127.0.0.1", 6379), "Redis is not reachable at 127.0.0.1:6379")
    prefix = f"gwtest:{secrets.token_hex(4)}:"
    h = await gateway_factory(sink, counters={"backend": "redis", "redis_url": REDIS_URL, "key_prefix": prefix})
    gw = h.gw
    client = gw.counters.client
    assert gw.resolver._redis is client, "one Redis client for the counters and the shared DNS cache"
    assert await gw.counters.ping()
    events: list[str] = []
    resolver_close, client_close = gw.resolver.close, client.aclose

    async def closing_resolver():
        events.append("resolver")
        await resolver_close()

    async def closing_client(*a, **kw):
        events.append("redis")
        await client_close(*a, **kw)

    gw.resolver.close = closing_resolver
    client.aclose = closing_client
    await gw.stop(grace=0.5)
    assert events == ["resolver", "redis"], events


async def test_resolver_without_shared_cache_or_redis_counters_gets_no_redis(sink, gateway_factory):
    h = await gateway_factory(sink)                          # memory counters
    assert h.gw.resolver._redis is None
    need(tcp_reachable("127.0.0.1", 6379), "Redis is not reachable at 127.0.0.1:6379")
    h = await gateway_factory(sink, counters={"backend": "redis", "redis_url": REDIS_URL},
                              dnsbl={"shared_cache": False})
    assert h.gw.resolver._redis is None
