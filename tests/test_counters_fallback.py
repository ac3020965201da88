"""Redis down is a decision, not a crash (state/counters.py): the AUTH limiter's
counters in the machine's Redis (127.0.0.1:6379) behind a FaultProxy that the
test cuts (refused connections) and black-holes (accepted, never answered).
While Redis is down the right password still works, wrong ones are limited
locally at the limit divided by expected_nodes, the switch is logged once
(no traceback), and /readyz and /metrics show it; once Redis answers again
the counters go back to it (logged once). The machine's Redis itself is never
touched but for the test's own keys. Skipped visibly without Redis, except
under CI=true."""
from __future__ import annotations

import asyncio
import logging
import secrets

import aiosmtplib
import httpx
import pytest

from conftest import eventually
from faultproxy import FaultProxy

DEADLINE = 0.3          # [counters] timeout in these tests
MARGIN = 2.0            # generous: a shared 2-core machine; a missing deadline would hang for ever


@pytest.fixture
async def gateway(sink, gateway_factory, redis_proxy):
    import redis.asyncio as redis

    prefix = f"gwtest:{secrets.token_hex(4)}:"
    h = await gateway_factory(
        sink, http={"enabled": True, "port": 0},
        counters={"backend": "redis", "redis_url": f"redis://127.0.0.1:{redis_proxy.port}/0",
                  "key_prefix": prefix, "timeout": DEADLINE, "expected_nodes": 2,
                  "retry_interval": 0.2, "retry_max": 0.4},
        auth={"max_failures_per_ip": 100, "max_failures_per_account": 4})
    await h.add_account()
    yield h
    client = redis.from_url("redis://127.0.0.1:6379/0")      # the test's own keys only
    async for k in client.scan_iter(match=f"{prefix}*"):
        await client.delete(k)
    await client.aclose()


async def auth(port: int, password: str) -> int:
    """One session, one AUTH: the reply code."""
    c = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10, start_tls=False, local_hostname="client.test")
    await c.connect()
    await c.ehlo()
    try:
        resp = await c.auth_plain("alice", password)    # one attempt (login() may try several)
        return resp.code
    except aiosmtplib.SMTPResponseException as exc:
        return exc.code
    finally:
        await c.quit()


async def timed_auth(port: int, password: str) -> int:
    loop = asyncio.get_running_loop()
    start = loop.time()
    code = await auth(port, password)
    took = loop.time() - start
    assert took < DEADLINE + MARGIN, f"AUTH answered after {took:.2f} s: a Redis call without its deadline"
    return code


async def readyz(h) -> dict:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{h.gw.http_port}", timeout=10) as http:
        r = await http.get("/readyz")
    assert r.status_code == 200, r.text           # a gateway counting locally is still ready
    return r.json()


def fallback_metric(h) -> float:
    for line in h.gw.metrics.render().decode().splitlines():
        if line.startswith("gateway_counters_fallback "):
            return float(line.split()[1])
    raise AssertionError("gateway_counters_fallback not in the metrics")


def counter_lines(caplog, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "gateway.counters" and text in r.getMessage()]


async def down_then_back(h, proxy: FaultProxy, mode: str, caplog, check_time: bool) -> None:
    caplog.set_level(logging.INFO)
    port = h.port()
    counters = h.gw.counters
    attempt = timed_auth if check_time else auth
    assert await auth(port, "s3cret") == 235
    assert not counters.fallback and (await readyz(h))["counters"]["state"] == "redis"
    assert fallback_metric(h) == 0.0

    await proxy.set_mode(mode)
    assert await attempt(port, "s3cret") == 235, "the right password works while Redis is down"
    assert counters.fallback
    # max_failures_per_account = 4 over expected_nodes = 2: two local failures block the account here.
    assert await attempt(port, "wrong") == 535
    assert await attempt(port, "wrong") == 535
    assert await attempt(port, "s3cret") == 454, "wrong passwords are still limited, locally"
    assert await attempt(port, "s3cret") == 454
    down = counter_lines(caplog, "unreachable")
    assert len(down) == 1, [r.getMessage() for r in down]
    assert "expected_nodes=2" in down[0].getMessage()
    assert not any(r.exc_info for r in caplog.records) and "Traceback" not in caplog.text, caplog.text
    assert not any(r.levelno >= logging.ERROR for r in caplog.records), caplog.text
    body = await readyz(h)
    assert body["status"] == "ready" and body["counters"]["state"] == "fallback", body
    assert fallback_metric(h) == 1.0

    await proxy.set_mode("pass")
    await eventually(lambda: not counters.fallback, "the probe finds Redis again")
    assert len(counter_lines(caplog, "counting in Redis again")) == 1
    assert len(counter_lines(caplog, "unreachable")) == 1
    # The outage's local failures are dropped; Redis never saw them.
    assert await auth(port, "s3cret") == 235
    assert (await readyz(h))["counters"]["state"] == "redis"
    assert fallback_metric(h) == 0.0
    assert counters.fallbacks == 1


async def test_redis_cut_falls_back_to_local_scaled_limits_and_back(gateway, redis_proxy, caplog):
    await down_then_back(gateway, redis_proxy, "cut", caplog, check_time=False)


async def test_redis_blackholed_costs_the_deadline_once_and_back(gateway, redis_proxy, caplog):
    await down_then_back(gateway, redis_proxy, "blackhole", caplog, check_time=True)
    down = counter_lines(caplog, "unreachable")[0].getMessage()
    assert f"no answer within {DEADLINE:g} s" in down, down
