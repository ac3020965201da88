"""state/distinct.py: distinct members per key over a sliding window, in
memory and in Redis (127.0.0.1:6379, skipped visibly without it, except
under CI=true), both on a clock the test controls; the sets are exact, so
the counts are checked exactly. Only the tests' own keys (a random prefix) are
touched, and deleted after."""
from __future__ import annotations

import secrets

import pytest

from conftest import need, tcp_reachable
from gateway.state.counters import RedisCounters
from gateway.state.distinct import MemoryDistinct, RedisDistinct, distinct_for

REDIS_URL = "redis://127.0.0.1:6379/0"
WINDOW = 600.0


class Clock:
    def __init__(self, start: float = 6000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def backend(request):
    clock = Clock()
    if request.param == "memory":
        yield MemoryDistinct(clock), clock
        return
    need(tcp_reachable("127.0.0.1", 6379), "Redis is not reachable at 127.0.0.1:6379")
    prefix = f"test-distinct-{secrets.token_hex(6)}:"
    counters = RedisCounters(REDIS_URL, prefix, clock, timeout=2.0)
    try:
        yield RedisDistinct(counters, clock), clock
        keys = [k async for k in counters.client.scan_iter(match=prefix + "*")]
        if keys:
            await counters.client.delete(*keys)
        assert not counters.fallback, "Redis went away during the test"
    finally:
        await counters.close()


both = pytest.mark.parametrize("backend", ["memory", "redis"], indirect=True)


@both
async def test_counts_distinct_members_and_reports_those_present(backend):
    d, clock = backend
    first = await d.add(["k1", "k2"], ["a@x", "b@x"], WINDOW)
    assert [(s.count, s.present) for s in first] == [(2, frozenset()), (2, frozenset())]
    again = await d.add(["k1"], ["b@x", "c@x", "c@x"], WINDOW)
    assert again[0].count == 3 and again[0].present == {"b@x"}
    other = await d.add(["k2"], ["z@x"], WINDOW)
    assert other[0].count == 3 and other[0].present == frozenset()


@both
async def test_the_window_slides_exactly(backend):
    d, clock = backend
    await d.add(["k"], ["a@x"], WINDOW)          # a at 6000
    clock.now += 100
    await d.add(["k"], ["b@x"], WINDOW)          # b at 6100
    clock.now += 499.5                           # 6599.5: both within the last 600 s
    seen = await d.add(["k"], ["c@x"], WINDOW)
    assert seen[0].count == 3
    clock.now += 0.5                             # 6600: a is 600 s old, out; b and c in
    seen = await d.add(["k"], ["a@x"], WINDOW)
    assert seen[0].count == 3 and seen[0].present == frozenset()
    clock.now += 300                             # 6900: b (6100) is out; c (6599.5) and a (6600) in
    seen = await d.add(["k"], ["b@x", "c@x"], WINDOW)
    assert seen[0].count == 3 and seen[0].present == {"c@x"}
    clock.now += 600                             # all of it is out
    seen = await d.add(["k"], ["z@x"], WINDOW)
    assert seen[0].count == 1 and seen[0].present == frozenset()


@both
async def test_adding_again_refreshes_a_member(backend):
    d, clock = backend
    await d.add(["k"], ["a@x"], WINDOW)
    clock.now += 500
    assert (await d.add(["k"], ["a@x"], WINDOW))[0].present == {"a@x"}
    clock.now += 500                             # 1000 s after the first add, 500 after the last
    assert (await d.add(["k"], ["a@x"], WINDOW))[0].present == {"a@x"}


@both
async def test_a_key_is_capped(backend):
    d, clock = backend
    seen = await d.add(["k"], [f"r{i}@x" for i in range(30)], WINDOW, cap=10)
    assert seen[0].count == 10
    seen = await d.add(["k"], [f"s{i}@x" for i in range(30)], WINDOW, cap=10)
    assert seen[0].count == 10                   # full: no new member
    clock.now += 600                             # all expired: room again
    seen = await d.add(["k"], [f"s{i}@x" for i in range(30)], WINDOW, cap=10)
    assert seen[0].count == 10 and seen[0].present == frozenset()


@both
async def test_no_members_no_answer(backend):
    d, _ = backend
    assert [s.count for s in await d.add(["k", "l"], [], WINDOW)] == [0, 0]


def test_memory_keys_are_bounded():
    d = MemoryDistinct(Clock(), max_keys=5)
    for i in range(12):
        d.add_now([f"k{i}"], ["a@x"], WINDOW)
    assert len(d) == 5 and d.evicted == 7
    assert d.add_now(["k11"], ["a@x"], WINDOW)[0].present == {"a@x"}     # the newest kept
    assert d.add_now(["k0"], ["a@x"], WINDOW)[0].present == frozenset()  # the oldest forgotten


async def test_redis_down_counts_locally_with_scaled_threshold():
    # an address nothing listens on: the first call falls back to local sets
    counters = RedisCounters("redis://127.0.0.1:1/0", "x:", Clock(), timeout=0.2, expected_nodes=4,
                             retry_interval=60, retry_max=60)
    try:
        d = distinct_for(counters, Clock())
        assert isinstance(d, RedisDistinct)
        seen = await d.add(["k"], ["a@x", "b@x"], WINDOW)
        assert seen[0].count == 2 and counters.fallback
        assert d.scaled(50) == 12 and d.health()["state"] == "fallback"
        assert (await d.add(["k"], ["a@x"], WINDOW))[0].present == {"a@x"}
    finally:
        await counters.close()


@pytest.mark.parametrize("mode", ["cut", "blackhole"])
async def test_redis_cut_counts_locally_then_redis_again(mode):
    """Redis cut through a proxy the test controls: the counts go on locally
    (threshold scaled by expected_nodes), and once the probe finds Redis the
    Redis sets, which still hold what was added before the cut, count again."""
    from conftest import eventually
    from faultproxy import FaultProxy

    need(tcp_reachable("127.0.0.1", 6379), "Redis is not reachable at 127.0.0.1:6379")
    proxy = await FaultProxy("127.0.0.1", 6379).start()
    clock = Clock()
    prefix = f"test-distinct-{secrets.token_hex(6)}:"
    counters = RedisCounters(f"redis://127.0.0.1:{proxy.port}/0", prefix, clock, timeout=0.3, expected_nodes=2,
                             retry_interval=0.2, retry_max=0.4)
    d = RedisDistinct(counters, clock)
    try:
        assert (await d.add(["k"], ["a@x", "b@x"], WINDOW))[0].count == 2
        await proxy.set_mode(mode)
        seen = await d.add(["k"], ["c@x"], WINDOW)
        assert counters.fallback and seen[0].count == 1          # local, from zero
        assert d.scaled(50) == 25 and d.health()["state"] == "fallback"
        assert (await d.add(["k"], ["c@x"], WINDOW))[0].present == {"c@x"}
        await proxy.set_mode("pass")
        await eventually(lambda: not counters.fallback, "the probe finds Redis again")
        seen = await d.add(["k"], ["a@x", "d@x"], WINDOW)
        assert seen[0].count == 3 and seen[0].present == {"a@x"}  # the Redis set: a, b, and now d
        assert d.scaled(50) == 50
    finally:
        await proxy.set_mode("pass")
        keys = [k async for k in counters.client.scan_iter(match=prefix + "*")]
        if keys:
            await counters.client.delete(*keys)
        await counters.close()
        await proxy.stop()
