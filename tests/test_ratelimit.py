"""The rate-limit primitive (gateway/state/ratelimit.py, issue 12 point 1).

GCRA math on the memory backend with an injected clock (no test sleeps for
rate math); the Redis backend against the machine's Redis (127.0.0.1:6379,
skipped visibly without it, except under CI=true), where time is the
server's, so those tests count instead of timing: exactly N of 3N concurrent
acquires from two gateways' clients, cost and refund, NOSCRIPT recovery, and
Redis cut and black-holed through a FaultProxy (enforced locally at the
scaled limit, logged once, shown in /readyz and /metrics, back by itself).
Only the tests' own keys (a random prefix) are touched, and deleted after."""
from __future__ import annotations

import asyncio
import logging
import math
import random
import secrets

import httpx
import pytest

from conftest import eventually, need, tcp_reachable
from gateway.state.counters import MemoryCounters, RedisCounters
from gateway.state.ratelimit import Decision, MemoryLimiter, Rate, RedisLimiter, limiter_for

REDIS_URL = "redis://127.0.0.1:6379/0"


class ManualClock:
    """Seconds that move only when the test says so."""

    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def mem(clock) -> MemoryLimiter:
    return MemoryLimiter(clock)


# ------------------------------------------------------------------ GCRA math, memory backend

async def test_burst_then_refused_with_exact_retry_after(mem, clock):
    rate = Rate(5, 60)                     # one unit every 12 s, 5 at once
    remaining = [(await mem.acquire("k", rate)).remaining for _ in range(5)]
    assert remaining == [4, 3, 2, 1, 0]
    d = await mem.acquire("k", rate)
    assert not d.allowed and d.remaining == 0
    assert d.retry_after == pytest.approx(12.0)
    clock.advance(11.9)
    d = await mem.acquire("k", rate)
    assert not d.allowed and d.retry_after == pytest.approx(0.1)
    clock.advance(0.1)
    assert (await mem.acquire("k", rate)).allowed, "granted exactly at retry_after"
    assert not (await mem.acquire("k", rate)).allowed


async def test_steady_rate_after_the_burst(mem, clock):
    rate = Rate(10, 10)                    # one a second
    for _ in range(10):
        assert (await mem.acquire("k", rate)).allowed
    granted = 0
    for _ in range(100):                   # 100 tries over 50 s: one granted per second
        clock.advance(0.5)
        granted += (await mem.acquire("k", rate)).allowed
    assert granted == 50
    clock.advance(10)                      # rested: the whole burst again, not more
    assert sum([(await mem.acquire("k", rate)).allowed for _ in range(12)]) == 10


async def test_cost_above_one_is_all_or_nothing(mem, clock):
    rate = Rate(5, 60)
    d = await mem.acquire("k", rate, cost=3)
    assert d.allowed and d.remaining == 2
    d = await mem.acquire("k", rate, cost=3)
    assert not d.allowed and d.remaining == 2
    assert d.retry_after == pytest.approx(12.0), "one more unit is 12 s away"
    d = await mem.acquire("k", rate, cost=2)
    assert d.allowed and d.remaining == 0, "the refused cost=3 charged nothing"
    clock.advance(36)
    assert (await mem.acquire("k", rate, cost=3)).allowed


async def test_cost_above_the_burst_is_never_granted(mem, clock):
    rate = Rate(5, 60)
    d = await mem.acquire("k", rate, cost=6)
    assert not d.allowed and d.retry_after == math.inf and d.remaining == 5
    clock.advance(10 * 86400)
    assert not (await mem.acquire("k", rate, cost=6)).allowed
    assert (await mem.acquire("k", rate, cost=5)).allowed, "the refusal charged nothing"
    assert len(mem) == 1


async def test_dry_run_answers_without_charging(mem, clock):
    rate = Rate(3, 30)
    for _ in range(5):
        d = await mem.acquire("k", rate, dry_run=True)
        assert d.allowed and d.remaining == 2
    assert len(mem) == 0
    for _ in range(3):
        assert (await mem.acquire("k", rate)).allowed
    d = await mem.acquire("k", rate, dry_run=True)
    assert not d.allowed and d.retry_after == pytest.approx(10.0)


async def test_refund_gives_back_what_was_refused_upstream_never_more(mem, clock):
    rate = Rate(5, 60)
    assert (await mem.acquire("k", rate, cost=5)).allowed
    await mem.refund("k", rate, cost=2)    # two recipients refused by the upstream: not charged
    assert (await mem.acquire("k", rate, cost=2)).allowed
    assert not (await mem.acquire("k", rate)).allowed
    await mem.refund("k", rate, cost=100)  # more than was charged: the key is rested, no credit beyond
    assert len(mem) == 0
    assert sum([(await mem.acquire("k", rate)).allowed for _ in range(8)]) == 5
    await mem.refund("never-charged", rate, 3)
    assert len(mem) == 1


async def test_burst_smaller_than_limit(mem, clock):
    rate = Rate(100, 100, burst=10)        # one a second, at most 10 at once
    assert sum([(await mem.acquire("k", rate)).allowed for _ in range(20)]) == 10
    clock.advance(5)
    assert sum([(await mem.acquire("k", rate)).allowed for _ in range(20)]) == 5
    assert not (await mem.acquire("k", rate, cost=11)).allowed


async def test_any_interval_grants_at_most_burst_plus_rate_times_length(mem, clock):
    """The documented bound, over a seeded random load of 2,000 tries."""
    rate = Rate(20, 60, burst=8)
    rng = random.Random(12)
    grants: list[tuple[float, int]] = []
    for _ in range(2000):
        clock.advance(rng.expovariate(1.0))            # about 1 try a second, 3 times the rate
        cost = rng.choice((1, 1, 1, 2, 3))
        if (await mem.acquire("k", rate, cost)).allowed:
            grants.append((clock.now, cost))
    assert len(grants) > 100
    for i, (start, _) in enumerate(grants):
        for length in (1.0, 10.0, 60.0, 300.0):
            total = sum(c for t, c in grants[i:] if t - start <= length)
            assert total <= rate.capacity + length * rate.limit / rate.period + 1e-9, (start, length, total)
    spent = sum(c for _, c in grants)
    assert spent <= rate.capacity + (grants[-1][0] - grants[0][0]) * rate.limit / rate.period


async def test_keys_are_separate_and_a_changed_rate_is_a_new_key(mem):
    assert (await mem.acquire("a", Rate(1, 60))).allowed
    assert (await mem.acquire("b", Rate(1, 60))).allowed
    assert not (await mem.acquire("a", Rate(1, 60))).allowed
    assert (await mem.acquire("a", Rate(2, 60))).allowed


async def test_memory_is_bounded_rested_keys_go_first(clock):
    mem = MemoryLimiter(clock, max_keys=100)
    long = Rate(1, 3600)
    assert (await mem.acquire("live", long)).allowed
    for i in range(99):
        await mem.acquire(f"short{i}", Rate(1, 1))
    clock.advance(2)                       # the short keys are rested now
    for i in range(50):
        await mem.acquire(f"new{i}", long)
    assert len(mem) <= 100 and mem.evicted == 0, "a full table sweeps rested keys, it evicts nothing live"
    assert not (await mem.acquire("live", long)).allowed, "the live key is kept"
    for i in range(1000):                  # all live: least recently charged forgotten, table bounded
        await mem.acquire(f"more{i}", long)
        assert len(mem) <= 100
    assert mem.evicted > 0


def test_rate_and_cost_are_validated():
    for bad in (dict(limit=0, period=1), dict(limit=1, period=0), dict(limit=1, period=1, burst=0),
                dict(limit=1.5, period=1)):
        with pytest.raises(ValueError, match="Rate"):
            Rate(**bad)                                     # type: ignore[arg-type]
    mem = MemoryLimiter()
    with pytest.raises(ValueError, match="cost"):
        mem.acquire_now("k", Rate(1, 1), 0)


def test_scaled_share_while_alone():
    assert Rate(10, 60).scaled(1) == Rate(10, 60)
    assert Rate(10, 60).scaled(3) == Rate(3, 60, 3)
    assert Rate(10, 60, burst=2).scaled(4) == Rate(2, 60, 1)
    assert Rate(1, 60).scaled(5) == Rate(1, 60, 1), "at least one unit"


async def test_limiter_for_follows_the_counters_backend():
    mem = limiter_for(MemoryCounters())
    assert isinstance(mem, MemoryLimiter) and mem.health()["state"] == "memory"
    red = RedisCounters("redis://127.0.0.1:1/0")          # never called
    lim = limiter_for(red)
    assert isinstance(lim, RedisLimiter) and lim.health() == red.health()
    await red.close()


# ------------------------------------------------------------------ Redis backend

@pytest.fixture
async def redis_prefix():
    """A random key prefix on the machine's Redis; its keys deleted after."""
    need(tcp_reachable("127.0.0.1", 6379), "Redis is not reachable at 127.0.0.1:6379")
    import redis.asyncio as redis
    prefix = f"gwtest:{secrets.token_hex(4)}:"
    yield prefix
    client = redis.from_url(REDIS_URL)
    async for k in client.scan_iter(match=f"{prefix}*"):
        await client.delete(k)
    await client.aclose()


@pytest.fixture
async def gateways(redis_prefix):
    """limiter(n) -> a RedisLimiter on its own RedisCounters (its own client, as a gateway has)."""
    made: list[RedisCounters] = []

    def make() -> RedisLimiter:
        c = RedisCounters(REDIS_URL, redis_prefix, timeout=10)    # generous: a shared 2-core machine
        made.append(c)
        return RedisLimiter(c)
    yield make
    for c in made:
        assert not c.fallback, "Redis stayed reachable"
        await c.close()


async def test_redis_two_gateways_grant_exactly_the_limit(gateways, redis_prefix):
    n = 25
    rate = Rate(n, 3600)                   # the refill over the test (one unit per 144 s) is nil
    a, b = gateways(), gateways()
    decisions = await asyncio.gather(*[(a if i % 2 else b).acquire("acct:1:rcpt", rate) for i in range(3 * n)])
    assert sum(d.allowed for d in decisions) == n
    refused = [d for d in decisions if not d.allowed]
    assert all(0 < d.retry_after <= 144.0 and d.remaining == 0 for d in refused)
    d = await a.acquire("acct:1:rcpt", rate, dry_run=True)
    assert not d.allowed and d.remaining == 0
    keys = [k async for k in a._redis.scan_iter(match=f"{redis_prefix}*")]
    assert len(keys) == 1
    pttl = await a._redis.pttl(keys[0])
    assert 0 < pttl <= 3600 * 1000, "the key expires by itself, when it is rested again"


ODD_RATES = [Rate(3, 1), Rate(7, 10), Rate(1000, 86400), Rate(13, 3.7), Rate(86400, 86400, burst=97)]


@pytest.mark.parametrize("rate", ODD_RATES, ids=str)
async def test_memory_burst_is_exactly_the_capacity_for_uneven_intervals(mem, rate):
    """Intervals that are no whole number of microseconds lose no unit to float sums."""
    assert sum([(await mem.acquire("k", rate)).allowed for _ in range(rate.capacity + 3)]) == rate.capacity


async def test_redis_burst_is_exactly_the_capacity_for_uneven_intervals(gateways):
    """The same in the Lua script (the TAT crosses to Redis and back as text)."""
    a = gateways()
    # Server time: intervals of seconds at least, so no unit is earned during the round trips.
    rates = [Rate(3, 3600.7), Rate(7, 3601), Rate(13, 3700.3), Rate(999, 86400),
             Rate(1_000_000, 30 * 86400 + 0.3, burst=97)]
    assert all(r.interval_us > 2.5 * 1e6 and r.interval_us % 1 for r in rates)
    for i, rate in enumerate(rates):
        got = sum([(await a.acquire(f"odd{i}", rate)).allowed for _ in range(rate.capacity + 3)])
        assert got == rate.capacity, rate


async def test_redis_cost_dry_run_and_refund(gateways):
    rate = Rate(10, 3600)
    a, b = gateways(), gateways()
    d = await a.acquire("k", rate, cost=3)
    assert d.allowed and d.remaining == 7
    assert (await b.acquire("k", rate, cost=7, dry_run=True)).allowed
    d = await b.acquire("k", rate, cost=8)
    assert not d.allowed and d.remaining == 7 and d.retry_after == pytest.approx(360.0, abs=1.0)
    assert (await b.acquire("k", rate, cost=7)).allowed, "the refused cost=8 charged nothing"
    await a.refund("k", rate, cost=4)      # refused upstream: given back, seen by the other gateway
    assert (await b.acquire("k", rate, cost=4)).allowed
    assert not (await a.acquire("k", rate)).allowed
    d = await a.acquire("k", rate, cost=11)
    assert not d.allowed and d.retry_after == math.inf
    await a.refund("k", rate, cost=50)     # never more than a rested key: the key is gone
    assert await a._redis.exists(a._key("k", rate)) == 0
    assert sum([(await b.acquire("k", rate)).allowed for _ in range(12)]) == 10


async def _all_or_nothing(limiter, exists) -> None:
    """acquire_all over three windows: the refusing window named, nothing charged when one
    refuses, the least remaining when all grant; refund_all gives back every window."""
    minute, hour, day = Rate(3, 3600), Rate(5, 7200), Rate(100, 86400)
    windows = [("w:m", minute), ("w:h", hour), ("w:d", day)]
    refused, d = await limiter.acquire_all(windows, cost=2)
    assert refused is None and d.allowed and d.remaining == 1, "the least of 1, 3 and 98"
    refused, d = await limiter.acquire_all(windows, cost=2)
    assert refused == 0 and not d.allowed and d.remaining == 1 and d.retry_after > 0, "the minute refuses"
    # nothing of the refused call was charged: the hour and the day still hold 3 and 98
    assert (await limiter.acquire("w:h", hour, cost=3, dry_run=True)).allowed
    assert not (await limiter.acquire("w:h", hour, cost=4, dry_run=True)).allowed
    refused, d = await limiter.acquire_all([("w:d", day), ("w:h", hour)], cost=4)
    assert refused == 1 and not d.allowed, "the index of the refusing window in the list given"
    refused, d = await limiter.acquire_all(windows, dry_run=True)
    assert refused is None and d.remaining == 0
    assert (await limiter.acquire("w:m", minute)).allowed
    await limiter.refund_all(windows, cost=3)
    assert (await limiter.acquire("w:m", minute, cost=3, dry_run=True)).allowed, "the minute back to 3"
    assert (await limiter.acquire("w:h", hour, cost=5, dry_run=True)).allowed, "the hour rested again"
    assert not await exists("w:h", hour), "a rested key is deleted"
    assert await limiter.acquire_all([]) == (None, Decision(True, 0.0, 0))
    await limiter.refund_all([])
    # one cost per window: 4 units of the day and 1 of a message window, or neither
    msgs = Rate(2, 3600)
    refused, d = await limiter.acquire_all([("w:d", day), ("w:msg", msgs)], [4, 1])
    assert refused is None and d.remaining == 1, "the least: 1 message left of 2 (the day has 96)"
    refused, d = await limiter.acquire_all([("w:d", day), ("w:msg", msgs)], [97, 1])
    assert refused == 0, "97 more of the day's 96: refused, and the message window not charged"
    assert (await limiter.acquire("w:msg", msgs, dry_run=True)).allowed
    await limiter.refund_all([("w:d", day), ("w:msg", msgs)], [4, 1])
    assert (await limiter.acquire("w:msg", msgs, cost=2, dry_run=True)).allowed
    with pytest.raises(ValueError, match="2 costs for 1 windows"):
        await limiter.acquire_all([("w:d", day)], [1, 1])
    with pytest.raises(ValueError, match="positive integer"):
        await limiter.refund_all([("w:d", day)], [0])


async def test_memory_acquire_all_is_all_or_nothing(mem):
    async def exists(k: str, r: Rate) -> bool:
        return f"{k}:{r.tag()}" in mem._tat
    await _all_or_nothing(mem, exists)


async def test_redis_acquire_all_is_all_or_nothing_in_one_round_trip(gateways):
    a = gateways()

    async def exists(k: str, r: Rate) -> bool:
        return bool(await a._redis.exists(a._key(k, r)))
    calls: list[int] = []
    real = a._eval

    async def counting(keys, args):
        calls.append(len(keys))
        return await real(keys, args)
    a._eval = counting
    await _all_or_nothing(a, exists)
    assert calls[:2] == [3, 3], "three windows, one script run each call"


async def test_redis_rate_beyond_the_clock_resolution_is_no_outage(gateways):
    """A limit so high that one unit's interval is below the float step of the time in
    microseconds (10**9 a minute: 0.06 us) charges nothing measurable; the script must not
    answer SET with "PX 0" (a Redis error, taken for an outage)."""
    a = gateways()
    rate = Rate(10 ** 9, 60)
    for _ in range(3):
        refused, d = await a.acquire_all([("huge", rate), ("huge2", Rate(10 ** 9, 86400))])
        assert refused is None and d.allowed
    assert not a._counters.fallback and a._counters.redis_errors == 0


async def test_redis_key_expires_by_itself(gateways):
    a = gateways()
    rate = Rate(1, 0.3)
    assert (await a.acquire("short", rate)).allowed
    key = a._key("short", rate)
    assert 0 < await a._redis.pttl(key) <= 300
    exists: list[int] = [1]

    async def gone() -> None:
        for _ in range(100):               # bounded: 100 x 50 ms
            exists[0] = await a._redis.exists(key)
            if not exists[0]:
                return
            await asyncio.sleep(0.05)
    await gone()
    assert exists[0] == 0, "the key expired within 5 s"


async def test_redis_script_reloaded_on_noscript(gateways):
    a = gateways()
    rate = Rate(3, 3600)
    assert (await a.acquire("k", rate)).allowed
    assert a.script_loads == 1
    assert (await a.acquire("k", rate)).allowed
    assert a.script_loads == 1, "loaded once, then EVALSHA"
    a._sha = "0" * 40                      # as after a SCRIPT FLUSH or a Redis restart: Redis answers NOSCRIPT
    d = await a.acquire("k", rate)
    assert d.allowed and d.remaining == 0 and a.script_loads == 2
    assert not a._counters.fallback and a._counters.redis_errors == 0, "NOSCRIPT is not an outage"
    a._sha = None
    assert not (await a.acquire("k", rate)).allowed and a.script_loads == 3


# ------------------------------------------------------------------ Redis away: local, scaled, back

DEADLINE = 0.3


@pytest.fixture
async def gateway(sink, gateway_factory, redis_proxy, redis_prefix):
    h = await gateway_factory(
        sink, http={"enabled": True, "port": 0},
        counters={"backend": "redis", "redis_url": f"redis://127.0.0.1:{redis_proxy.port}/0",
                  "key_prefix": redis_prefix, "timeout": DEADLINE, "expected_nodes": 2,
                  "retry_interval": 0.2, "retry_max": 0.4})
    yield h


async def readyz_counters(h) -> dict:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{h.gw.http_port}", timeout=10) as http:
        r = await http.get("/readyz")
    assert r.status_code == 200, r.text
    return r.json()["counters"]


def fallback_metric(h) -> float:
    for line in h.gw.metrics.render().decode().splitlines():
        if line.startswith("gateway_counters_fallback "):
            return float(line.split()[1])
    raise AssertionError("gateway_counters_fallback not in the metrics")


async def allowed_of(limiter, key: str, rate: Rate, tries: int) -> int:
    return sum([(await limiter.acquire(key, rate)).allowed for _ in range(tries)])


@pytest.mark.parametrize("mode", ["cut", "blackhole"])
async def test_redis_away_enforces_locally_scaled_and_recovers(gateway, redis_proxy, caplog, mode):
    caplog.set_level(logging.INFO)
    h = gateway
    limiter, counters = h.gw.rate_limiter, h.gw.counters
    assert isinstance(limiter, RedisLimiter) and h.gw.services.rate_limiter is limiter
    rate = Rate(6, 3600)
    assert await allowed_of(limiter, "acct:7", rate, 1) == 1          # in Redis: 5 left there
    assert not counters.fallback and (await readyz_counters(h))["state"] == "redis"

    await redis_proxy.set_mode(mode)
    # expected_nodes = 2: this gateway alone grants 6 // 2 = 3, counted from zero locally.
    assert await allowed_of(limiter, "acct:7", rate, 10) == 3
    assert counters.fallback
    assert await allowed_of(limiter, "acct:8", rate, 10) == 3, "every key is enforced, none refused outright"
    await limiter.refund("acct:8", rate, 1)
    assert await allowed_of(limiter, "acct:8", rate, 10) == 1, "refunds work locally too"
    down = [r for r in caplog.records if r.name == "gateway.counters" and "unreachable" in r.getMessage()]
    assert len(down) == 1 and "expected_nodes=2" in down[0].getMessage(), [r.getMessage() for r in down]
    if mode == "blackhole":
        assert f"no answer within {DEADLINE:g} s" in down[0].getMessage()
    assert not any(r.exc_info for r in caplog.records) and "Traceback" not in caplog.text
    assert (await readyz_counters(h))["state"] == "fallback" and fallback_metric(h) == 1.0

    await redis_proxy.set_mode("pass")
    await eventually(lambda: not counters.fallback, "the probe finds Redis again")
    # Back on Redis: what was charged there before the outage still counts (1 of 6).
    assert await allowed_of(limiter, "acct:7", rate, 10) == 5
    assert await allowed_of(limiter, "acct:8", rate, 10) == 6, "the outage's local charges are dropped"
    assert (await readyz_counters(h))["state"] == "redis" and fallback_metric(h) == 0.0
    back = [r for r in caplog.records if r.name == "gateway.counters" and "counting in Redis again" in r.getMessage()]
    assert len(back) == 1 and counters.fallbacks == 1

    await redis_proxy.set_mode("cut")      # a second outage starts from a fresh local limiter
    assert await allowed_of(limiter, "acct:8", rate, 10) == 3
    assert counters.fallbacks == 2


# ------------------------------------------------------------------ counters: several keys at once

async def _counts(counters, window: float = 3600) -> None:
    await counters.incr("a", window, 3)
    await counters.incr("b", window)
    assert await counters.get_many(["a", "missing", "b"], window) == [3, 0, 1]
    assert await counters.get_many(["a"], 60) == [0], "another window: another count"
    assert await counters.get_many([], window) == []


async def test_counters_get_many_in_memory():
    await _counts(MemoryCounters())


async def test_counters_get_many_in_redis_in_one_round_trip(redis_prefix):
    c = RedisCounters(REDIS_URL, redis_prefix, timeout=10)
    try:
        calls: list[tuple] = []
        real = c.fast.execute

        async def execute(*a):
            calls.append(a)
            return await real(*a)
        c.fast.execute = execute
        await _counts(c)
        mgets = [a for a in calls if a[0] == "MGET"]
        assert [len(a) for a in mgets] == [4, 2], "MGET and three keys: one command"
        assert not c.fallback
    finally:
        await c.close()


async def test_counters_get_many_while_redis_is_away_reads_the_local_counts():
    c = RedisCounters("redis://127.0.0.1:9/0", "gwtest:away:", timeout=0.5)   # port 9: nothing listens
    try:
        await _counts(c)
        assert c.fallback
    finally:
        await c.close()
