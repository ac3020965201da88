"""Distinct counts over a sliding window (issue 12: the bulk and repeat
detectors): how many distinct members (recipients) a key (an account and a
fingerprint band key) has had in the last ``window`` seconds, and which of
the members just added it had already::

    seen = await distinct.add(["acct:a:07a41c..", "acct:a:3f2e.."], ["bob@x", "eve@y"], window=3600)
    seen[0].count      # distinct members of the first key in the window, these two included
    seen[0].present    # of the members given, those the key already had in the window

**A true sliding window, exact.** Each key keeps its members with the time
each was last added; a member older than ``window`` is dropped before the
key is read. So a count is exactly the distinct members added in the last
``window`` seconds (no sub-window steps), and ``present`` is exact too.

**Exact and capped; not HyperLogLog.** The thresholds are tens of
recipients (``[bulk] recipients_threshold``, 50 by default): a HyperLogLog
(Redis PFADD/PFCOUNT, 12 KB per key once dense, 0.81 % standard error) is
exact only while sparse, and it cannot answer "had this key this member
already?", which the repeat detector needs. A set is exact, answers
membership, and stays small because it is capped: a key takes no new member
past ``cap`` (the caller's refusal point and a margin: past it the answer is
"over" anyway; members already in are still refreshed), so a key costs at
most ``cap`` members. Members are stored as the first 16 hex digits of their
SHA-256 (no address in Redis or in memory).

**Backends.** ``MemoryDistinct``: one process; members in time order per key
(expiry pops from the front: O(expired)); at most ``max_keys`` keys, the
least recently added to forgotten first (counted in ``evicted``).
``RedisDistinct``: a sorted set per key (score: the time in ms), one Lua
script per call for all the keys (EVALSHA, loaded again on NOSCRIPT):
ZREMRANGEBYSCORE (the expired), ZMSCORE (present?), ZCARD, ZADD (below the
cap; refresh the present), PEXPIRE (the window), atomically; no SUNION, so a
call costs O(keys x members x log cap), not O(members stored). It is built
on the gateway's ``RedisCounters`` and shares their client, per-call
deadline, switch to local state (a ``MemoryDistinct`` per outage), probe and
health, as ``state/ratelimit.py`` does; while local, a count is one
gateway's view, and ``scaled()`` gives the threshold to hold it against
(divided by ``expected_nodes``). The time is the caller's clock (the
gateway's, so tests control it): gateways whose clocks differ by ``s``
seconds see a member expire ``s`` seconds apart, nothing more.
"""
from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

from .counters import OnRedisCounters

if TYPE_CHECKING:  # pragma: no cover
    from .counters import Counters, RedisCounters

@dataclass(frozen=True, slots=True)
class Seen:
    count: int                       # distinct members of the key in the window (at most the cap)
    present: frozenset[str]          # of the members given, those it had before this call


class DistinctCounter(Protocol):
    async def add(self, keys: Sequence[str], members: Sequence[str], window: float,
                  cap: int = 1000) -> list[Seen]:
        """Add ``members`` (not empty: no members, no answer) to each key, now."""
        ...
    def scaled(self, limit: int) -> int: ...
    def health(self) -> dict: ...


def member_hash(member: str) -> str:
    return hashlib.sha256(member.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _check_window(window: float) -> None:
    if not window > 0:
        raise ValueError(f"window: must be positive seconds, got {window!r}")


class MemoryDistinct:
    """Capped member sets with their last-added times, in one process (see the module docstring)."""

    def __init__(self, clock: Callable[[], float] = time.time, max_keys: int = 200_000):
        self._clock = clock
        self._max_keys = max_keys
        # key -> {member hash: time last added}, oldest first; keys: least recently added to first
        self._data: OrderedDict[str, OrderedDict[str, float]] = OrderedDict()
        self.evicted = 0

    async def add(self, keys: Sequence[str], members: Sequence[str], window: float,
                  cap: int = 1000) -> list[Seen]:
        return self.add_now(keys, members, window, cap)

    def add_now(self, keys: Sequence[str], members: Sequence[str], window: float, cap: int = 1000) -> list[Seen]:
        _check_window(window)
        if not members:
            return [Seen(0, frozenset()) for _ in keys]
        now = self._clock()
        oldest = now - window
        hashed = {member_hash(m): m for m in members}
        out: list[Seen] = []
        for key in keys:
            seen = self._data.pop(key, None)
            if seen is None:
                seen = OrderedDict()
                if len(self._data) >= self._max_keys:
                    self._data.popitem(last=False)
                    self.evicted += 1
            while seen and next(iter(seen.values())) <= oldest:
                seen.popitem(last=False)
            present = frozenset(m for h, m in hashed.items() if h in seen)
            for h in hashed:
                if h in seen:
                    seen.move_to_end(h)
                    seen[h] = now
                elif len(seen) < cap:
                    seen[h] = now
            self._data[key] = seen
            out.append(Seen(len(seen), present))
        return out

    def __len__(self) -> int:
        return len(self._data)

    def scaled(self, limit: int) -> int:
        return limit

    def health(self) -> dict:
        return {"backend": "memory", "state": "memory", "fallbacks": 0, "redis_errors": 0}


# KEYS: the keys; ARGV[1] now (ms), ARGV[2] window (ms), ARGV[3] cap, ARGV[4..] member hashes.
# Returns one string, per key "<count>:<a 0/1 present flag per member>", the keys joined by ",":
# a flat reply is one read for the client, where nested arrays of integers cost its parser a
# step per element (22 keys and 1 member: 67 steps).
DISTINCT_LUA = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local cap = tonumber(ARGV[3])
local members = {}
for i = 4, #ARGV do members[#members + 1] = ARGV[i] end
local out = {}
for k = 1, #KEYS do
  local key = KEYS[k]
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  local scores = redis.call('ZMSCORE', key, unpack(members))
  local size = redis.call('ZCARD', key)
  local flags = {}
  local add = {}
  for i = 1, #members do
    if scores[i] then
      flags[i] = '1'
      add[#add + 1] = now
      add[#add + 1] = members[i]
    else
      flags[i] = '0'
      if size < cap then
        size = size + 1
        add[#add + 1] = now
        add[#add + 1] = members[i]
      end
    end
  end
  if #add > 0 then
    redis.call('ZADD', key, unpack(add))
    redis.call('PEXPIRE', key, window + 1000)
  end
  out[k] = size .. ':' .. table.concat(flags)
end
return table.concat(out, ',')
"""


_PRESENT = ord("1")     # a present flag in the script's reply


class RedisDistinct(OnRedisCounters[MemoryDistinct]):
    """The same sets in Redis, on the gateway's ``RedisCounters`` (their
    client, deadline, fallback, probe and health)."""

    SCRIPT = DISTINCT_LUA

    def __init__(self, counters: RedisCounters, clock: Callable[[], float] = time.time, max_keys: int = 200_000):
        super().__init__(counters, clock, max_keys, MemoryDistinct)

    def _keys(self, keys: Sequence[str], window: float) -> list[str]:
        return [f"{self._prefix}d:{int(window)}:{k}" for k in keys]   # another window: other keys

    async def add(self, keys: Sequence[str], members: Sequence[str], window: float,
                  cap: int = 1000) -> list[Seen]:
        _check_window(window)
        if not keys or not members:
            return [Seen(0, frozenset()) for _ in keys]
        if not self._counters.fallback:
            back = {member_hash(m): m for m in members}     # each hash once, in order; its member
            hashes = list(back)
            args = (int(self._clock() * 1000), int(window * 1000), cap, *hashes)
            reply = await self._eval(self._keys(keys, window), args)
            if reply is not None:
                out = []
                for row in reply.split(b","):
                    count, _, flags = row.partition(b":")
                    out.append(Seen(int(count), frozenset(back[h] for h, f in zip(hashes, flags) if f == _PRESENT)))
                return out
        return self.local.add_now(keys, members, window, cap)

    def scaled(self, limit: int) -> int:
        return self._counters.scaled(limit)


def distinct_for(counters: Counters | None, clock: Callable[[], float] = time.time) -> DistinctCounter:
    """The distinct counter that goes with the gateway's counters: in Redis when they are."""
    from .counters import RedisCounters

    if isinstance(counters, RedisCounters):
        return RedisDistinct(counters, clock)
    return MemoryDistinct(clock)
