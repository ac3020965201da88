"""Rate limits (issue 12): a GCRA limiter charged per unit (a recipient, a
message, a connection), in memory (one gateway) or in Redis (several
gateways and workers), behind one interface::

    decision = await limiter.acquire("acct:42:rcpt", Rate(1000, 86400), cost=5)
    if not decision.allowed: ... decision.retry_after seconds ...
    await limiter.refund("acct:42:rcpt", Rate(1000, 86400), cost=2)   # two were refused upstream
    refused, decision = await limiter.acquire_all([("acct:42:rcpt:m", per_minute), ("acct:42:rcpt:d", per_day)])
    await limiter.refund_all([...])

``acquire_all`` charges several windows (an account's minute, hour and day,
and its identity's) as one: every window is decided first, then all are
charged or none; ``cost`` is one number for every window or one per window
(a message's recipients in one, the message itself in another); ``refused`` is the index of the window that refused
(``None`` when all granted) and ``decision`` that window's (when granted:
the one with the least ``remaining``). In Redis that is one script run, one
round trip, for all of them.

**Semantics (GCRA, the "virtual scheduling" form of a token bucket).**
``Rate(limit, period, burst=limit)`` allows ``limit`` units per ``period``
seconds at the steady rate (one unit every ``period / limit`` s, the
emission interval) and at most ``burst`` units at once from a rested key.
Over any interval of ``t`` seconds at most ``burst + t * limit / period``
units are granted; a rested key may spend its burst at the start of a
period and then earn ``limit`` more within it, as a fixed window allows
``2 * limit`` across its boundary. A smaller ``burst`` (e.g. an hour's share
of a daily limit) makes that tighter. One key holds one number, the
theoretical arrival time (TAT) of the next unit; a key whose TAT has passed
is a rested key and can be forgotten, so every key expires by itself.

``acquire(key, rate, cost)`` is all or nothing: it grants ``cost`` units
(the recipients of one RCPT batch, say) or none; ``cost > burst`` is never
granted (``retry_after`` is ``inf``). ``dry_run=True`` answers the same
question without charging. ``retry_after`` is the wait until ``cost`` units
would be granted; ``remaining`` the units grantable right after this call.

**Charging only what was relayed: reserve, then refund.** ``acquire``
charges at once (atomically with the check), and ``refund(key, rate, n)``
gives back the units the upstream refused. The alternative, a check without
charge now and a charge after the relay, is not exact: two sessions on two
gateways both pass the check and both charge, and the sum goes over. With
reserve/refund the units in flight count against the limit until refunded,
so the sum never exceeds it; the price is that a concurrent session may be
refused for units that are refunded a moment later (it is told to retry).
A refund never gives back more than a rested key holds (TAT never goes
below now).

**Library or own Lua.** ``limits`` (PyPI) was checked (5.8) and not taken:
it has fixed window, moving window and an approximate sliding window
counter, no GCRA; its moving window pushes one Redis list entry per unit
(O(limit) memory per key) with the caller's ``time.time()`` as the
timestamp (clock skew between gateways moves the window); ``hit`` answers
a bool, the reset time is a second, separate round trip; there is no
refund; and its async storage opens its own connection pool without our
per-call deadline or the local fallback with limits scaled by
``expected_nodes`` that ``state/counters.py`` already has. So the Lua is
ours (one short script, below).

**Redis.** One script, loaded once (SCRIPT LOAD, then EVALSHA by its sha;
on NOSCRIPT, after a Redis restart or a SCRIPT FLUSH, it is loaded again
and the call repeated once). The check, the charge and the key's PEXPIRE
(to the moment the key is rested again) happen in the script, atomically:
no INCR-then-EXPIRE race, no key without an expiry. The time is the Redis
server's (``redis.call('TIME')``), not the caller's: gateways whose clocks
differ by ``s`` seconds would otherwise see one bucket refilled by
``s / interval`` units more or less, and a TAT written by a fast clock would
look like the future to a slow one. The server's clock is the one clock
that every gateway sharing the key sees. (Redis >= 5 replicates a script's
effects, not the script, so TIME in a writing script is allowed.)

**Redis away.** The Redis limiter is built on the ``RedisCounters`` of the
gateway and shares everything that counters have for an outage: the
client, the per-call deadline (``[counters] timeout``), the switch to local
state (logged once by the counters), the background probe with back-off,
and ``health()`` (so /readyz and /metrics show one state for both). While
the counters are in fallback, every call goes to a local ``MemoryLimiter``
with the limit and the burst divided by ``expected_nodes`` (at least 1),
so N gateways limiting alone together grant about what the shared limit
would. It never stops enforcing. Each outage starts a fresh local limiter;
after it the Redis keys, which still hold what was charged before the
outage, apply again.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

from .counters import OnRedisCounters

if TYPE_CHECKING:  # pragma: no cover
    from .counters import Counters, RedisCounters

US = 1_000_000          # the math runs in microseconds, in memory as in Redis
SLACK_US = 1.0          # float sums of intervals: a grant at exactly the burst is not lost to rounding


@dataclass(frozen=True)
class Rate:
    """``limit`` units per ``period`` seconds, at most ``burst`` at once (default: ``limit``)."""

    limit: int
    period: float
    burst: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.limit, int) or self.limit < 1:
            raise ValueError(f"Rate.limit: must be a positive integer, got {self.limit!r}")
        if not self.period > 0:
            raise ValueError(f"Rate.period: must be positive seconds, got {self.period!r}")
        if self.burst is not None and (not isinstance(self.burst, int) or self.burst < 1):
            raise ValueError(f"Rate.burst: must be a positive integer, got {self.burst!r}")

    @property
    def capacity(self) -> int:
        return self.limit if self.burst is None else self.burst

    @property
    def interval_us(self) -> float:
        """The emission interval: microseconds per unit at the steady rate."""
        return self.period * US / self.limit

    def scaled(self, nodes: int) -> "Rate":
        """This gateway's share while it limits alone (one of ``nodes``)."""
        if nodes <= 1:
            return self
        return Rate(max(1, self.limit // nodes), self.period, max(1, self.capacity // nodes))

    def tag(self) -> str:
        """Part of the Redis key: a changed rate starts a new key (the old one expires)."""
        return f"{self.limit}/{self.period:g}/{self.capacity}"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after: float          # seconds until ``cost`` units would be granted; 0 when allowed; inf if never
    remaining: int              # units grantable right after this call


Charge = tuple[str, Rate]     # (key, rate): one window of a multi-window charge
Costs = int | Sequence[int]    # one cost for every window of a charge, or one per window


class RateLimiter(Protocol):
    async def acquire(self, key: str, rate: Rate, cost: int = 1, *, dry_run: bool = False) -> Decision: ...
    async def acquire_all(self, charges: Sequence[Charge], cost: Costs = 1, *,
                          dry_run: bool = False) -> tuple[int | None, Decision]: ...
    async def refund(self, key: str, rate: Rate, cost: int = 1) -> None: ...
    async def refund_all(self, charges: Sequence[Charge], cost: Costs = 1) -> None: ...
    def health(self) -> dict: ...


def _check_cost(cost: int) -> None:
    if not isinstance(cost, int) or cost < 1:
        raise ValueError(f"cost: must be a positive integer, got {cost!r}")


def _costs(cost: Costs, n: int) -> list[int]:
    """The cost of each of ``n`` windows, checked."""
    costs = [cost] * n if isinstance(cost, int) else list(cost)
    if len(costs) != n:
        raise ValueError(f"cost: {len(costs)} costs for {n} windows")
    for c in costs:
        _check_cost(c)
    return costs


def gcra(tat: float | None, now: float, rate: Rate, cost: int) -> tuple[Decision, float]:
    """One GCRA step (times in microseconds): the decision and the TAT to
    store if it is granted. The Lua script below is the same arithmetic."""
    interval = rate.interval_us
    capacity = rate.capacity * interval
    tat = now if tat is None or tat < now else tat
    new = tat + cost * interval
    if cost <= rate.capacity and new - now <= capacity + SLACK_US:
        return Decision(True, 0.0, int((now + capacity + SLACK_US - new) // interval)), new
    retry = math.inf if cost > rate.capacity else max(0.0, new - now - capacity) / US
    return Decision(False, retry, int((now + capacity + SLACK_US - tat) // interval)), tat


class MemoryLimiter:
    """GCRA in one process: O(1) a call; at most ``max_keys`` keys. A rested
    key (TAT passed) is as good as absent; when the table is full the rested
    keys are swept, and if that is not enough the least recently charged
    keys are forgotten down to 90 % (counted in ``evicted``), so a sweep
    happens at most once per ``max_keys / 10`` new keys."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_keys: int = 1_000_000):
        self._clock = clock
        self._tat: dict[str, float] = {}        # insertion order = least recently charged first
        self._max_keys = max_keys
        self.evicted = 0

    def _now(self) -> float:
        return self._clock() * US

    async def acquire(self, key: str, rate: Rate, cost: int = 1, *, dry_run: bool = False) -> Decision:
        return self.acquire_all_now(((key, rate),), cost, dry_run=dry_run)[1]

    async def acquire_all(self, charges: Sequence[Charge], cost: Costs = 1, *,
                          dry_run: bool = False) -> tuple[int | None, Decision]:
        return self.acquire_all_now(charges, cost, dry_run=dry_run)

    def acquire_now(self, key: str, rate: Rate, cost: int = 1, *, dry_run: bool = False) -> Decision:
        """``acquire`` without the await (nothing in memory waits)."""
        return self.acquire_all_now(((key, rate),), cost, dry_run=dry_run)[1]

    def acquire_all_now(self, charges: Sequence[Charge], cost: Costs = 1, *,
                        dry_run: bool = False) -> tuple[int | None, Decision]:
        """``acquire_all`` without the await: every window decided first, then all charged or none."""
        costs = _costs(cost, len(charges))
        now = self._now()
        news: list[tuple[str, float]] = []
        least: Decision | None = None
        for i, ((key, rate), c) in enumerate(zip(charges, costs)):
            k = f"{key}:{rate.tag()}"
            decision, new = gcra(self._tat.get(k), now, rate, c)
            if not decision.allowed:
                return i, decision
            news.append((k, new))
            if least is None or decision.remaining < least.remaining:
                least = decision
        if not dry_run:
            for k, new in news:
                if self._tat.pop(k, None) is None and len(self._tat) >= self._max_keys:
                    self._sweep(now)
                self._tat[k] = new
        return None, least if least is not None else Decision(True, 0.0, 0)

    async def refund(self, key: str, rate: Rate, cost: int = 1) -> None:
        self.refund_all_now(((key, rate),), cost)

    async def refund_all(self, charges: Sequence[Charge], cost: Costs = 1) -> None:
        self.refund_all_now(charges, cost)

    def refund_all_now(self, charges: Sequence[Charge], cost: Costs = 1) -> None:
        costs = _costs(cost, len(charges))
        now = self._now()
        for (key, rate), c in zip(charges, costs):
            k = f"{key}:{rate.tag()}"
            tat = self._tat.get(k)
            if tat is None:
                continue
            new = tat - c * rate.interval_us
            if new <= now:
                del self._tat[k]            # rested: nothing left to remember
            else:
                self._tat[k] = new

    def _sweep(self, now: float) -> None:
        for k in [k for k, tat in self._tat.items() if tat <= now]:
            del self._tat[k]
        keep = self._max_keys * 9 // 10
        while len(self._tat) > keep:
            del self._tat[next(iter(self._tat))]
            self.evicted += 1

    def __len__(self) -> int:
        return len(self._tat)

    def health(self) -> dict:
        return {"backend": "memory", "state": "memory", "fallbacks": 0, "redis_errors": 0}


# KEYS: the windows charged together; ARGV[1] mode ("acquire", "peek", "refund"), then per key
# its interval (us), burst (units) and cost. Every window is decided before any is
# written: all are charged or none. Returns {allowed 0/1, retry_after us (-1: never),
# remaining, index of the refusing key (1-based; 0 when allowed)}; remaining is the least of
# the windows when allowed. Numbers cross to Redis as strings with %.17g so the TAT survives
# the round trip exactly (Lua's tostring keeps 14 digits). An expiry is at least 1 ms: at a
# rate above ~8 million units a second (an interval under half the float step of "now" in
# microseconds) a charge moves no TAT, and "PX 0" would be an error.
GCRA_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local mode = ARGV[1]
local slack = 1.0
local news = {}
local least = nil
for i = 1, #KEYS do
  local interval = tonumber(ARGV[3 * i - 1])
  local burst = tonumber(ARGV[3 * i])
  local cost = tonumber(ARGV[3 * i + 1])
  local stored = redis.call('GET', KEYS[i])
  local tat = now
  if stored then tat = math.max(tonumber(stored), now) end
  if mode == 'refund' then
    if stored then
      local back = tat - cost * interval
      if back <= now then
        redis.call('DEL', KEYS[i])
      else
        redis.call('SET', KEYS[i], string.format('%.17g', back), 'PX', math.ceil((back - now) / 1000))
      end
    end
  else
    local capacity = burst * interval
    local new = tat + cost * interval
    if cost <= burst and new - now <= capacity + slack then
      news[i] = new
      local left = math.floor((now + capacity + slack - new) / interval)
      if least == nil or left < least then least = left end
    else
      local remaining = math.floor((now + capacity + slack - tat) / interval)
      if cost > burst then return {0, -1, remaining, i} end
      return {0, math.ceil(math.max(0, new - now - capacity)), remaining, i}
    end
  end
end
if mode == 'acquire' then
  for i = 1, #KEYS do
    redis.call('SET', KEYS[i], string.format('%.17g', news[i]), 'PX', math.max(1, math.ceil((news[i] - now) / 1000)))
  end
end
return {1, 0, least or 0, 0}
"""


class RedisLimiter(OnRedisCounters[MemoryLimiter]):
    """GCRA in Redis, on the gateway's ``RedisCounters`` (their client,
    deadline, fallback, probe and health; see the module docstring). Every
    call is one script run, one round trip, however many windows it charges."""

    SCRIPT = GCRA_LUA

    def __init__(self, counters: RedisCounters, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 1_000_000):
        super().__init__(counters, clock, max_keys, MemoryLimiter)

    def _key(self, key: str, rate: Rate) -> str:
        return f"{self._prefix}r:{key}:{rate.tag()}"

    async def _script(self, charges: Sequence[Charge], costs: list[int], mode: str):
        """Run the script under the counters' deadline; None when Redis is away."""
        args: list[object] = [mode]
        for (_, rate), c in zip(charges, costs):
            args += (repr(rate.interval_us), rate.capacity, c)
        return await self._eval([self._key(k, r) for k, r in charges], tuple(args))

    def _scaled(self, charges: Sequence[Charge]) -> list[Charge]:
        nodes = self._counters.expected_nodes
        return [(k, r.scaled(nodes)) for k, r in charges]

    async def acquire(self, key: str, rate: Rate, cost: int = 1, *, dry_run: bool = False) -> Decision:
        return (await self.acquire_all(((key, rate),), cost, dry_run=dry_run))[1]

    async def acquire_all(self, charges: Sequence[Charge], cost: Costs = 1, *,
                          dry_run: bool = False) -> tuple[int | None, Decision]:
        costs = _costs(cost, len(charges))
        if not charges:
            return None, Decision(True, 0.0, 0)
        if not self._counters.fallback:
            out = await self._script(charges, costs, "peek" if dry_run else "acquire")
            if out is not None:
                allowed, retry_us, remaining, index = (int(x) for x in out)
                if allowed:
                    return None, Decision(True, 0.0, remaining)
                return index - 1, Decision(False, math.inf if retry_us < 0 else retry_us / US, remaining)
        return self.local.acquire_all_now(self._scaled(charges), cost, dry_run=dry_run)

    async def refund(self, key: str, rate: Rate, cost: int = 1) -> None:
        await self.refund_all(((key, rate),), cost)

    async def refund_all(self, charges: Sequence[Charge], cost: Costs = 1) -> None:
        costs = _costs(cost, len(charges))
        if not charges:
            return
        if not self._counters.fallback and await self._script(charges, costs, "refund") is not None:
            return
        self.local.refund_all_now(self._scaled(charges), cost)


def limiter_for(counters: Counters, clock: Callable[[], float] = time.monotonic) -> RateLimiter:
    """The limiter that goes with the gateway's counters: in Redis when they are."""
    from .counters import RedisCounters

    if isinstance(counters, RedisCounters):
        return RedisLimiter(counters, clock)
    return MemoryLimiter(clock)
