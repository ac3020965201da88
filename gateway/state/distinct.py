"""Distinct counts over a sliding window (issue 12: the bulk and repeat
detectors): how many distinct members (recipients) a key (an account and a
fingerprint band key) has had in the last ``window`` seconds, and which of
the members just added it had already::

    seen = await distinct.add(["acct:a:07a41c..", "acct:a:3f2e.."], ["bob@x", "eve@y"], window=3600)
    seen[0].count      # distinct members of the first key in the window, these two included
    seen[0].present    # of the members given, those the key already had in the window

**Sliding window.** The window is ``SUB_WINDOWS`` (6) sub-windows of
``window / 6`` seconds each, aligned to multiples of that; a count is the
union of the current sub-window and the 5 before it, so the window slides
in steps of a sixth (10 minutes of a 1 hour window): a member added is
counted for between 5/6 and all of ``window``.

**Exact sets, capped; not HyperLogLog.** The thresholds are tens of
recipients (``[bulk] recipients_threshold``, 50 by default): a HyperLogLog
(Redis PFADD/PFCOUNT, 12 KB per key once dense, 0.81 % standard error) is
exact only while sparse and then approximate, and it cannot answer "had this
key this member already?", which the repeat detector needs. A set of the
members' hashes is exact, answers membership, and stays small because it
is capped: a sub-window stops taking new members at ``cap`` (the caller's
refusal point and a margin: past it the answer is "over" anyway), so a key
costs at most ``6 * cap`` members of 16 bytes. Members are stored as the
first 16 hex digits of their SHA-256 (no address in Redis or in memory).

**Backends.** ``MemoryDistinct``: one process; at most ``max_keys`` keys
(the least recently added to are forgotten first, counted in ``evicted``),
sub-windows older than the window dropped on the way. ``RedisDistinct``:
one Lua script per call (EVALSHA, loaded again on NOSCRIPT) does, for every
key, SMISMEMBER over its sub-window sets, SADD to the current one (below the
cap), PEXPIRE (the set lives as long as it can count) and SUNION's size,
atomically. It is built on the gateway's ``RedisCounters`` and shares their
client, per-call deadline, switch to local state (a ``MemoryDistinct`` per
outage), probe and health, as ``state/ratelimit.py`` does; while local, a
count is one gateway's view, and ``scaled()`` gives the threshold to hold it
against (divided by ``expected_nodes``). The time is the caller's clock (the
gateway's): sub-windows are coarse (minutes), so clock skew between gateways
of a second moves a member between sub-windows rarely and by one step.
"""
from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from .counters import Counters, RedisCounters

SUB_WINDOWS = 6


@dataclass(frozen=True, slots=True)
class Seen:
    count: int                       # distinct members of the key in the window (capped per sub-window)
    present: frozenset[str]          # of the members given, those it had before this call


class DistinctCounter(Protocol):
    async def add(self, keys: Sequence[str], members: Sequence[str], window: float,
                  cap: int = 1000) -> list[Seen]:
        """Add ``members`` (not empty: no members, no answer) to each key's current sub-window."""
        ...
    def scaled(self, limit: int) -> int: ...
    def health(self) -> dict: ...


def member_hash(member: str) -> str:
    return hashlib.sha256(member.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _step(window: float) -> float:
    if not window > 0:
        raise ValueError(f"window: must be positive seconds, got {window!r}")
    return window / SUB_WINDOWS


class MemoryDistinct:
    """Capped sets per sub-window in one process (see the module docstring)."""

    def __init__(self, clock: Callable[[], float] = time.time, max_keys: int = 200_000):
        self._clock = clock
        self._max_keys = max_keys
        # key -> {sub-window number: set of member hashes}; order: least recently added to first
        self._data: OrderedDict[str, dict[int, set[str]]] = OrderedDict()
        self.evicted = 0

    async def add(self, keys: Sequence[str], members: Sequence[str], window: float,
                  cap: int = 1000) -> list[Seen]:
        return self.add_now(keys, members, window, cap)

    def add_now(self, keys: Sequence[str], members: Sequence[str], window: float, cap: int = 1000) -> list[Seen]:
        step = _step(window)
        if not members:
            return [Seen(0, frozenset()) for _ in keys]
        now = int(self._clock() // step)
        oldest = now - SUB_WINDOWS + 1
        hashed = {member_hash(m): m for m in members}
        out: list[Seen] = []
        for key in keys:
            subs = self._data.pop(key, None)
            if subs is None:
                subs = {}
                if len(self._data) >= self._max_keys:
                    self._data.popitem(last=False)
                    self.evicted += 1
            for n in [n for n in subs if n < oldest]:
                del subs[n]
            present = frozenset(m for h, m in hashed.items() if any(h in s for s in subs.values()))
            cur = subs.setdefault(now, set())
            for h in hashed:
                if len(cur) >= cap:
                    break
                cur.add(h)
            union: set[str] = set().union(*subs.values())
            self._data[key] = subs
            out.append(Seen(len(union), present))
        return out

    def __len__(self) -> int:
        return len(self._data)

    def scaled(self, limit: int) -> int:
        return limit

    def health(self) -> dict:
        return {"backend": "memory", "state": "memory", "fallbacks": 0, "redis_errors": 0}


# KEYS: the base keys; ARGV[1] current sub-window number, ARGV[2] sub-windows, ARGV[3] ms a set
# lives, ARGV[4] cap, ARGV[5..] member hashes. Returns per key {count, present flags...}.
DISTINCT_LUA = """
local now = tonumber(ARGV[1])
local subs = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local cap = tonumber(ARGV[4])
local members = {}
for i = 5, #ARGV do members[#members + 1] = ARGV[i] end
local out = {}
for k = 1, #KEYS do
  local names = {}
  for n = now - subs + 1, now do names[#names + 1] = KEYS[k] .. ':' .. n end
  local present = {}
  for i = 1, #members do present[i] = 0 end
  for j = 1, #names - 1 do
    if redis.call('EXISTS', names[j]) == 1 then
      local flags = redis.call('SMISMEMBER', names[j], unpack(members))
      for i = 1, #members do if flags[i] == 1 then present[i] = 1 end end
    end
  end
  local cur = names[#names]
  local flags = redis.call('SMISMEMBER', cur, unpack(members))
  local size = redis.call('SCARD', cur)
  for i = 1, #members do
    if flags[i] == 1 then
      present[i] = 1
    elseif size < cap then
      size = size + redis.call('SADD', cur, members[i])
    end
  end
  redis.call('PEXPIRE', cur, ttl)
  local row = {#redis.call('SUNION', unpack(names))}
  for i = 1, #members do row[#row + 1] = present[i] end
  out[k] = row
end
return out
"""


class RedisDistinct:
    """The same sets in Redis, on the gateway's ``RedisCounters`` (their
    client, deadline, fallback, probe and health)."""

    def __init__(self, counters: RedisCounters, clock: Callable[[], float] = time.time, max_keys: int = 200_000):
        self._counters = counters
        self._redis = counters.client
        self._prefix = counters.prefix
        self._clock = clock
        self._max_keys = max_keys
        self._sha: str | None = None
        self.script_loads = 0
        self._local = MemoryDistinct(clock, max_keys)
        self._local_epoch = counters.fallbacks

    @property
    def local(self) -> MemoryDistinct:
        """The local sets of the current outage (fresh per outage)."""
        if self._local_epoch != self._counters.fallbacks:
            self._local = MemoryDistinct(self._clock, self._max_keys)
            self._local_epoch = self._counters.fallbacks
        return self._local

    def _keys(self, keys: Sequence[str], window: float) -> list[str]:
        return [f"{self._prefix}d:{int(window)}:{k}" for k in keys]

    async def add(self, keys: Sequence[str], members: Sequence[str], window: float,
                  cap: int = 1000) -> list[Seen]:
        from redis.exceptions import NoScriptError

        step = _step(window)
        if not keys or not members:
            return [Seen(0, frozenset()) for _ in keys]
        if not self._counters.fallback:
            hashes = list(dict.fromkeys(member_hash(m) for m in members))
            back = {h: m for h, m in zip((member_hash(m) for m in members), members)}
            args = (int(self._clock() // step), SUB_WINDOWS, int(window * 1000) + 1000, cap, *hashes)
            rkeys = self._keys(keys, window)

            async def run():
                if self._sha is None:
                    self._sha = await self._redis.script_load(DISTINCT_LUA)
                    self.script_loads += 1
                try:
                    return await self._redis.evalsha(self._sha, len(rkeys), *rkeys, *args)
                except NoScriptError:
                    self._sha = await self._redis.script_load(DISTINCT_LUA)
                    self.script_loads += 1
                    return await self._redis.evalsha(self._sha, len(rkeys), *rkeys, *args)
            rows = await self._counters._call(run)
            if rows is not None:
                return [Seen(int(row[0]), frozenset(back[h] for h, f in zip(hashes, row[1:]) if int(f)))
                        for row in rows]
        return self.local.add_now(keys, members, window, cap)

    def scaled(self, limit: int) -> int:
        return self._counters.scaled(limit)

    def health(self) -> dict:
        return self._counters.health()


def distinct_for(counters: Counters | None, clock: Callable[[], float] = time.time) -> DistinctCounter:
    """The distinct counter that goes with the gateway's counters: in Redis when they are."""
    from .counters import RedisCounters

    if isinstance(counters, RedisCounters):
        return RedisDistinct(counters, clock)
    return MemoryDistinct(clock)
