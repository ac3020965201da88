"""Registry store + service on SQLite and PostgreSQL (same tests, one code path).

PostgreSQL: 127.0.0.1:5432, trust auth; a fresh database gw_test_<random> is
created for the run and dropped afterwards. Without a server the PostgreSQL
variants skip visibly (and fail under CI=true).
"""
from __future__ import annotations

import asyncio
import email
import email.policy
import re
import secrets
import time
import uuid

import pytest
import sqlalchemy as sa

from conftest import need, pg_database_url, tcp_reachable
from gateway.accounts.store import AccountStore
from gateway.registry.cache import HashSet, ListSnapshots
from gateway.registry.model import (Conflict, Invalid, NotFound, RateLimited, RegistryUnavailable, TokenError,
                                    normalize_address)
from gateway.registry.service import RegistryService
from gateway.registry.settings import RegistrySettings
from gateway.registry.store import decode_events, encode_events
from gateway.registry.tokens import Keys
from gateway.core import replies
from gateway.storage.db import create_engine, migrate

SECRET = "test-registry-secret-0123456789abcdef"


@pytest.fixture(scope="module")
def pg_url():
    url, drop = pg_database_url()
    yield url
    drop()


# ------------------------------------------------------------------ a relay that records
class FakeUtx:
    def __init__(self, relay, mail_from):
        self.relay, self.mail_from, self.rcpts = relay, mail_from, []

    async def rcpt(self, address, options):
        if address in self.relay.refuse:
            return replies.Rendered(550, "5.1.1", "no such user")
        self.rcpts.append(address)
        return replies.RECIPIENT_OK

    async def data(self, data):
        self.relay.sent.append((self.mail_from, list(self.rcpts), data))
        return replies.Rendered(250, "2.0.0", "queued")

    async def close(self):
        pass


class FakeRelay:
    def __init__(self):
        self.sent: list[tuple[str, list[str], bytes]] = []
        self.refuse: set[str] = set()
        self.down = False

    async def begin(self, mail_from, options, utf8, eight_bit, size):
        if self.down:
            return None, replies.UPSTREAM_UNAVAILABLE
        return FakeUtx(self, mail_from), replies.SENDER_OK

    def links(self, to: str) -> list[str]:
        out = []
        for _, rcpts, data in self.sent:
            if to in rcpts:
                msg = email.message_from_bytes(data, policy=email.policy.default)
                out += re.findall(r"https?://\S+/confirm/[a-z2-7]+", msg.get_content())
        return out


class Env:
    def __init__(self, svc, engine, relay, account, other, url):
        self.svc, self.engine, self.relay, self.account, self.other, self.url = \
            svc, engine, relay, account, other, url

    async def new_list(self, **kw) -> str:
        args = {"name": f"News {uuid.uuid4().hex[:6]}", "list_id": f"news-{uuid.uuid4().hex[:8]}.example.com",
                "senders": ["news@example.com"], "confirm_from": "confirm@example.com"}
        args.update(kw)
        return (await self.svc.create_list(self.account, **args)).id

    async def subscribe(self, list_id: str, address: str, **kw) -> None:
        await self.svc.add_subscriber(self.account, list_id, address, **kw)
        token = self.relay.links(normalize_address(address))[-1].rsplit("/", 1)[1]
        await self.svc.confirm(token, ip="192.0.2.7", user_agent="pytest")


async def _make(url: str, relay=None, clock=time.time, **settings) -> tuple[RegistryService, object]:
    engine = create_engine(url)
    await migrate(engine)
    svc = RegistryService(engine, RegistrySettings(secret=SECRET, **settings), secret=SECRET.encode(),
                          hostname="gw.test", relay=relay, clock=clock)
    await svc.start()
    return svc, engine


@pytest.fixture(params=["sqlite", "postgres"])
async def env(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'reg.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    relay = FakeRelay()
    svc, engine = await _make(url, relay, outbox_interval=0.1)
    accounts = AccountStore(engine, scrypt_n=16)
    name, other = f"acc-{uuid.uuid4().hex[:8]}", f"oth-{uuid.uuid4().hex[:8]}"
    for acc in (name, other):
        await accounts.add(acc, "pw")
        await accounts.add_domain(acc, "example.com", approved_by="test")
    e = Env(svc, engine, relay, name, other, url)
    yield e
    await svc.stop()
    await engine.dispose()


# ------------------------------------------------------------------ pure parts
def test_normalization_domain_case_and_idn():
    assert normalize_address("Bob@ExAmple.ORG") == "Bob@example.org"
    assert normalize_address("<bob@Bücher.DE>") == "bob@xn--bcher-kva.de"
    assert normalize_address("bob@xn--bcher-kva.de") == normalize_address("bob@bücher.de")
    with pytest.raises(Invalid) as exc:
        normalize_address("not an address")
    assert exc.value.field == "address"


def test_tokens_forged_and_expired():
    keys = Keys(b"k" * 32)
    h = keys.address_hash("0123456789abcdef", "bob@example.org")
    tok = keys.unsubscribe_token("0123456789abcdef", h)
    assert len(tok) == 50 and re.fullmatch(r"[a-z2-7]+", tok)
    assert keys.read_unsubscribe(tok.upper()).address_hash == h      # case-insensitive (mailto)
    bad = tok[:-1] + ("a" if tok[-1] != "a" else "b")
    with pytest.raises(TokenError):
        keys.read_unsubscribe(bad)
    with pytest.raises(TokenError):
        Keys(b"x" * 32).read_unsubscribe(tok)
    ctok = keys.confirm_token("0123456789abcdef", h, "00" * 8, expires=1000)
    with pytest.raises(TokenError):
        keys.read_unsubscribe(ctok)                                  # one purpose never verifies as another
    assert keys.read_confirm(ctok, now=999).nonce == "00" * 8
    with pytest.raises(TokenError) as exc:
        keys.read_confirm(ctok, now=1001)
    assert exc.value.expired
    for junk in ("", "!!!", "a" * 500, "zzzz"):
        with pytest.raises(TokenError):
            keys.read_confirm(junk, now=0)


def test_events_roundtrip_and_chunking():
    events = [("s", "0123456789abcdef", "ab" * 12)] * 400 + [("l", "", "")]
    payloads = encode_events(events)
    assert len(payloads) > 1 and all(len(p) < 8000 for p in payloads)
    assert [e for p in payloads for e in decode_events(p)] == events
    assert decode_events("garbage") == [("f", "", "")]


def test_mailto_token_parsing():
    tok = "a" * 50
    assert RegistryService.token_from_mailto("u+" + tok.upper()) == tok
    assert RegistryService.token_from_mailto("u", "Re: unsubscribe " + tok) == tok
    assert RegistryService.token_from_mailto("u", "hello") is None


# ------------------------------------------------------------------ store + service on both databases
async def test_list_validation_and_isolation(env: Env):
    svc = env.svc
    with pytest.raises(Invalid) as exc:
        await svc.create_list(env.account, name="x", list_id="nodot", senders=["a@example.com"],
                              confirm_from="c@example.com")
    assert exc.value.field == "list_id"
    with pytest.raises(Invalid) as exc:
        await svc.create_list(env.account, name="x", list_id="x.example.com", senders=["a@evil.example.net"],
                              confirm_from="c@example.com")
    assert exc.value.field == "senders[0]"
    with pytest.raises(Invalid) as exc:
        await svc.create_list(env.account, name="x", list_id="x.example.com", senders=["a*@exa*mple.com"],
                              confirm_from="c@example.com")
    assert exc.value.field == "senders[0]"
    lid = await env.new_list(name="Weekly", list_id="weekly.example.com")
    with pytest.raises(Conflict) as exc:
        await env.new_list(name="Weekly")
    assert exc.value.field == "name"
    with pytest.raises(Conflict):
        await env.new_list(senders=["news@example.com"])   # the sender belongs to another list of ours
    # another account: the same list id is "not found", exactly like a random one
    with pytest.raises(NotFound) as a:
        await svc.get_list(env.other, lid)
    with pytest.raises(NotFound) as b:
        await svc.get_list(env.other, secrets.token_hex(8))
    assert str(a.value) == str(b.value)
    with pytest.raises(NotFound):
        await svc.add_subscriber(env.other, lid, "bob@example.org")
    assert [lst.id for lst in await svc.lists(env.account)] == [lid]
    assert await svc.lists(env.other) == []
    # the other account may use the same names: nothing tells it ours exist
    await svc.create_list(env.other, name="Weekly", list_id="weekly.example.com", senders=["news@example.com"],
                          confirm_from="c@example.com")


async def test_list_for_sender_exact_and_verp(env: Env):
    svc = env.svc
    exact = await env.new_list(senders=["news@example.com"])
    verp = await env.new_list(senders=["bounce-*@example.com"])
    assert (await svc.list_for_sender(env.account, "news@EXAMPLE.com")).id == exact
    assert (await svc.list_for_sender(env.account, "bounce-bob=example.org@example.com")).id == verp
    assert await svc.list_for_sender(env.account, "other@example.com") is None
    assert await svc.list_for_sender(env.account, "") is None
    assert await svc.list_for_sender(env.other, "news@example.com") is None
    # a new list is seen at once (cache invalidated by the write)
    third = await env.new_list(senders=["digest@example.com"])
    assert (await svc.list_for_sender(env.account, "digest@example.com")).id == third
    await svc.delete_list(env.account, third)
    assert await svc.list_for_sender(env.account, "digest@example.com") is None


async def test_double_optin_optout_and_fresh_optin(env: Env):
    svc, relay = env.svc, env.relay
    lid = await env.new_list()
    res = await svc.add_subscriber(env.account, lid, "Bob@Example.ORG", source="signup form",
                                   ip="198.51.100.4", user_agent="Mozilla/5.0", requested_at=time.time() - 60)
    assert res.confirmation == "sent" and res.subscriber.status == "pending"
    assert res.subscriber.address == "Bob@example.org"
    assert await svc.recipient_status(lid, "Bob@example.org") == "pending"
    mail_from, rcpts, data = relay.sent[-1]
    assert mail_from == "confirm@example.com" and rcpts == ["Bob@example.org"]
    msg = email.message_from_bytes(data, policy=email.policy.default)
    for h in ("From", "To", "Subject", "Date", "Message-ID"):
        assert msg[h], h
    link = relay.links("Bob@example.org")[-1]
    token = link.rsplit("/", 1)[1]
    view = await svc.confirmation_view(token)
    assert view.state == "pending" and "Bob" not in view.masked_address
    assert await svc.recipient_status(lid, "Bob@example.org") == "pending"   # viewing confirms nothing
    assert (await svc.confirm(token, ip="203.0.113.9", user_agent="UA/1")).state == "confirmed"
    assert (await svc.confirm(token)).state == "confirmed"                   # idempotent
    assert await svc.recipient_status(lid, "Bob@example.org") == "confirmed"
    sub = await svc.subscriber(env.account, lid, "Bob@example.org")
    assert sub.confirmed_ip == "203.0.113.9" and sub.requested_ip == "198.51.100.4"
    assert sub.source == "signup form" and sub.confirmed_user_agent == "UA/1"
    with pytest.raises(Conflict) as exc:
        await svc.add_subscriber(env.account, lid, "Bob@example.org")
    assert exc.value.code == "exists"

    utoken = svc.unsubscribe_token(lid, "Bob@example.org")
    assert svc.unsubscribe_url(lid, "Bob@EXAMPLE.org").endswith("/unsubscribe/" + utoken)
    r = await svc.unsubscribe_by_token(utoken, via="one-click")
    assert r.removed
    assert not (await svc.unsubscribe_by_token(utoken, via="one-click")).removed               # idempotent
    assert await svc.recipient_status(lid, "Bob@example.org") == "unsubscribed"
    with pytest.raises(NotFound):
        await svc.subscriber(env.account, lid, "Bob@example.org")
    await _assert_nowhere(env.engine, ["bob@example.org"])
    with pytest.raises(TokenError):
        await svc.confirm(token)                                           # the old link is dead
    with pytest.raises(Conflict) as exc:
        await svc.add_subscriber(env.account, lid, "Bob@EXAMPLE.org")
    assert exc.value.code == "suppressed" and "opt-in" in exc.value.reason
    res = await svc.add_subscriber(env.account, lid, "Bob@example.org", reoptin=True)
    assert res.subscriber.status == "pending"
    assert await svc.recipient_status(lid, "Bob@example.org") == "pending"
    with pytest.raises(TokenError):
        await svc.confirm(token)                                           # still dead: new nonce
    new_token = relay.links("Bob@example.org")[-1].rsplit("/", 1)[1]
    assert new_token != token
    await svc.confirm(new_token)
    assert await svc.recipient_status(lid, "Bob@example.org") == "confirmed"
    stats = await svc.list_stats(env.account, lid)
    assert stats["confirmed"] == 1 and stats["unsubscribed"] == 0
    # opt out again; a fresh opt-in may start (the person confirmed the last one themselves) ...
    await svc.remove_subscriber(env.account, lid, "Bob@example.org")
    await svc.add_subscriber(env.account, lid, "Bob@example.org", reoptin=True)
    # ... but if the person ignores it and the customer tries again: refused within reoptin_interval
    await svc.remove_subscriber(env.account, lid, "Bob@example.org")
    with pytest.raises(RateLimited):
        await svc.add_subscriber(env.account, lid, "Bob@example.org", reoptin=True)


async def _assert_nowhere(engine, needles: list[str]) -> None:
    """No table holds the address in any column, in any case."""
    async with engine.connect() as conn:
        names = await conn.run_sync(lambda c: sa.inspect(c).get_table_names())
        for name in names:
            rows = (await conn.execute(sa.text(f'SELECT * FROM "{name}"'))).all()
            for row in rows:
                text = " ".join(str(v) for v in row).lower()
                for needle in needles:
                    assert needle.lower() not in text, f"{needle} found in table {name}: {row}"


async def test_expired_and_forged_confirmation(env: Env, monkeypatch):
    svc = env.svc
    lid = await env.new_list()
    await svc.add_subscriber(env.account, lid, "carol@example.org")
    token = env.relay.links("carol@example.org")[-1].rsplit("/", 1)[1]
    with pytest.raises(TokenError) as exc:
        await svc.confirm(token[:-2] + "aa" if not token.endswith("aa") else token[:-2] + "bb")
    assert not exc.value.expired
    real_clock = svc.clock
    monkeypatch.setattr(svc, "clock", lambda: real_clock() + svc.settings.confirm_token_ttl + 10)
    with pytest.raises(TokenError) as exc:
        await svc.confirm(token)
    assert exc.value.expired
    monkeypatch.setattr(svc, "clock", real_clock)
    assert await svc.recipient_status(lid, "carol@example.org") == "pending"


async def test_resend_is_rate_limited_and_failures_recorded(env: Env):
    svc, relay = env.svc, env.relay
    lid = await env.new_list()
    relay.refuse.add("dave@example.org")
    res = await svc.add_subscriber(env.account, lid, "dave@example.org")
    assert res.confirmation == "failed"
    assert (await svc.subscriber(env.account, lid, "dave@example.org")).confirmation == "failed"
    with pytest.raises(RateLimited) as exc:
        await svc.resend_confirmation(env.account, lid, "dave@example.org")
    assert exc.value.retry_after > 0
    svc.settings = RegistrySettings(secret=SECRET, resend_interval=0.01, max_confirmation_mails=2)
    await asyncio.sleep(0.02)
    relay.refuse.clear()
    assert await svc.resend_confirmation(env.account, lid, "dave@example.org") == "sent"
    await asyncio.sleep(0.02)
    with pytest.raises(RateLimited):   # max_confirmation_mails reached
        await svc.resend_confirmation(env.account, lid, "dave@example.org")


async def test_bulk_import_validates_each_row_then_queues(env: Env):
    svc, relay = env.svc, env.relay
    lid = await env.new_list()
    # a bad row is reported on its own (field and reason); the good rows are imported
    out = await svc.import_subscribers(env.account, lid, [
        {"address": "nope", "line": 2}, {"address": "a@example.org", "ip": "999.1.1.1", "line": 3},
        {"address": "b@example.org", "requested_at": "yesterday"}, "not an object"])
    assert [(o["result"], o["field"]) for o in out] == [("invalid", "address"), ("invalid", "ip"),
                                                        ("invalid", "requested_at"), ("invalid", "")], out
    assert [o.get("line") for o in out] == [2, 3, None, None] and out[0]["address"] == "nope"
    assert all(o["reason"] for o in out)
    assert (await svc.subscribers(env.account, lid))[0] == []          # nothing stored
    out = await svc.import_subscribers(env.account, lid, [{"address": "a@example.org"}, {"address": "x@@y"}])
    assert [o["result"] for o in out] == ["queued", "invalid"], out
    assert [s.address for s in (await svc.subscribers(env.account, lid))[0]] == ["a@example.org"]
    await svc.remove_subscriber(env.account, lid, "a@example.org")
    await env.subscribe(lid, "old@example.org")
    await svc.remove_subscriber(env.account, lid, "old@example.org")
    rows = [{"address": f"user{i}@example.org", "source": "import"} for i in range(30)]
    rows += [{"address": "USER1@example.org"}, {"address": "user1@example.org"}, {"address": "old@example.org"}]
    out = await svc.import_subscribers(env.account, lid, rows)
    results = [o["result"] for o in out]
    assert results[:30] == ["queued"] * 30
    assert results[30] == "queued"            # local part case is significant (RFC 5321)
    assert results[31] == "duplicate" and results[32] == "suppressed"
    deadline = time.monotonic() + 10
    while len(relay.sent) < 2 + 31 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert len({r[1][0] for r in relay.sent}) >= 31
    page, cursor = await svc.subscribers(env.account, lid, status="pending", limit=10)
    assert len(page) == 10 and cursor is not None
    everything = [s async for s in svc.iter_subscribers(env.account, lid)]
    assert len(everything) == 31
    deadline = time.monotonic() + 10
    while (await svc.list_stats(env.account, lid))["confirmation_mails"] != {"sent": 31}:
        assert time.monotonic() < deadline, await svc.list_stats(env.account, lid)
        await asyncio.sleep(0.05)
    sub5 = await svc.subscriber(env.account, lid, "user5@example.org")
    assert sub5.confirmation == "sent" and sub5.confirmation_mails == 1, sub5


async def test_cache_answers_without_database_and_invalidates(env: Env):
    svc = env.svc
    svc.cache.snapshots = None     # the per-entry layer alone (list snapshots: test_snapshot_*)
    lid = await env.new_list()
    await env.subscribe(lid, "erin@example.org")
    # On PostgreSQL the NOTIFY of our own writes comes back through LISTEN a
    # moment after the commit and (rightly) drops what it names; let it land
    # before priming the cache, or the first read below is a legitimate miss.
    await asyncio.sleep(0.5)
    assert await svc.recipient_status(lid, "erin@example.org") == "confirmed"
    assert await svc.recipient_status(lid, "nobody@example.org") == "unknown"     # negative entry
    calls = _counting_lookups(svc)
    for _ in range(5):
        assert await svc.recipient_status(lid, "erin@example.org") == "confirmed"
        assert await svc.recipient_status(lid, "nobody@example.org") == "unknown"
    assert calls[0] == 0
    # concurrent misses share one round trip
    svc.cache.flush()
    got = await asyncio.gather(*(svc.recipient_status(lid, "erin@example.org") for _ in range(20)))
    assert set(got) == {"confirmed"} and calls[0] == 1
    # an opt-out invalidates at once in this process
    await svc.remove_subscriber(env.account, lid, "erin@example.org")
    assert await svc.recipient_status(lid, "erin@example.org") == "unsubscribed"
    # a lost channel means: ask the database, never the cache
    svc.cache.healthy = False
    calls[0] = 0
    assert await svc.recipient_status(lid, "nobody@example.org") == "unknown"
    assert calls[0] == 1


async def test_cache_is_bounded_lru(env: Env):
    svc = env.svc
    svc.cache.snapshots = None     # the per-entry layer alone
    svc.cache.size = 50
    lid = await env.new_list()
    for i in range(200):
        await svc.recipient_status(lid, f"x{i}@example.org")
    assert len(svc.cache) == 50


# ---------------------------------------------------------------- list snapshots
async def _snapshot_ready(svc, lid: str, timeout: float = 10.0, traffic: str | None = None) -> None:
    """Wait for the list to be held in memory. With ``traffic`` (an address),
    keep looking it up meanwhile, as RCPTs do: a flush (e.g. another
    gateway's write seen late) discards a load in flight, and the next
    lookup starts it again."""
    snaps = svc.cache.snapshots
    deadline = time.monotonic() + timeout
    while not snaps.ready(lid):
        assert time.monotonic() < deadline, f"list snapshot of {lid} not loaded within {timeout} s"
        if traffic is not None:
            await svc.recipient_status(lid, traffic)
        await asyncio.sleep(0.01)


def _counting_lookups(svc) -> list[int]:
    calls = [0]
    real = svc.store.lookup_status

    async def counting(*a):
        calls[0] += 1
        return await real(*a)

    svc.store.lookup_status = counting
    return calls


def _gated_pages(snaps) -> tuple[asyncio.Event, asyncio.Event]:
    """Hold the snapshot load after its first page until ``gate`` is set."""
    real = snaps.fetch_page
    first, gate = asyncio.Event(), asyncio.Event()

    async def gated(*a):
        rows = await real(*a)
        if not first.is_set():
            first.set()
            await gate.wait()
        return rows

    snaps.fetch_page = gated
    return first, gate


def test_hash_set_sorted_and_unsorted_pages():
    keys = [(5 << 32) | 7, (5 << 32) | 3, 1, (1 << 95) + 12345, (5 << 32) | 9]
    ordered, shuffled = HashSet(), HashSet()
    for k in sorted(keys):
        ordered.extend([k])
    shuffled.extend(keys[:2])
    shuffled.extend(keys[2:])
    assert ordered.sorted and not shuffled.sorted
    shuffled.finish()
    for s in (ordered, shuffled):
        assert len(s) == 5
        assert all(k in s for k in keys)
        assert (5 << 32) | 8 not in s and 0 not in s and (1 << 95) not in s and (6 << 32) not in s
    assert list(ordered.hi) == list(shuffled.hi) and list(ordered.lo) == list(shuffled.lo)


async def test_snapshot_answers_every_state_without_queries(env: Env):
    """A list loaded into memory (in pages) answers confirmed, pending,
    unsubscribed, pending-again-after-opt-out and unknown exactly as the
    database does, with no lookup query."""
    svc = env.svc
    svc.cache.snapshots.page_size = 2
    lid = await env.new_list()
    for i in range(5):
        await env.subscribe(lid, f"conf{i}@example.org")
    await svc.add_subscriber(env.account, lid, "pend@example.org")
    await env.subscribe(lid, "gone@example.org")
    await svc.remove_subscriber(env.account, lid, "gone@example.org")
    await env.subscribe(lid, "back@example.org")
    await svc.remove_subscriber(env.account, lid, "back@example.org")
    await svc.add_subscriber(env.account, lid, "back@example.org", reoptin=True)
    await asyncio.sleep(0.5)        # PostgreSQL: our own NOTIFYs come back; let them land first
    want = {f"conf{i}@example.org": "confirmed" for i in range(5)}
    want.update({"pend@example.org": "pending", "gone@example.org": "unsubscribed",
                 "back@example.org": "pending", "nobody@example.org": "unknown", "conf1@Example.ORG": "confirmed",
                 "CONF1@example.org": "unknown"})     # domains are case-folded, local parts are not
    assert await svc.recipient_status(lid, "conf0@example.org") == "confirmed"   # starts the load
    await _snapshot_ready(svc, lid)
    calls = _counting_lookups(svc)
    hits = svc.cache.snapshots.stats["hits"]
    assert {a: await svc.recipient_status(lid, a) for a in want} == want
    assert calls[0] == 0 and svc.cache.snapshots.stats["hits"] - hits == len(want)
    # 7 subscriber rows (5 confirmed, 2 pending) + 2 suppression entries ("gone", "back")
    assert svc.cache.snapshots.entries == 9


async def test_snapshot_changes_during_and_after_load(env: Env):
    """Writes that land while the list is loading, or after, are answered from
    the database (dirty), never from the snapshot's old state."""
    svc = env.svc
    snaps = svc.cache.snapshots
    snaps.page_size = 2
    lid = await env.new_list()
    people = [f"p{i}@example.org" for i in range(6)]
    for a in people:
        await env.subscribe(lid, a)
    await asyncio.sleep(0.5)
    first, gate = _gated_pages(snaps)
    assert await svc.recipient_status(lid, people[0]) == "confirmed"   # starts the load
    await asyncio.wait_for(first.wait(), 5)
    for a in people[:4]:                                      # some of these are in the page already read
        await svc.remove_subscriber(env.account, lid, a)
    gate.set()
    await _snapshot_ready(svc, lid)
    assert [await svc.recipient_status(lid, a) for a in people] == ["unsubscribed"] * 4 + ["confirmed"] * 2
    # after the load: an opt-out is seen at once as well
    await svc.remove_subscriber(env.account, lid, people[5])
    assert await svc.recipient_status(lid, people[5]) == "unsubscribed"
    await env.subscribe(lid, "new@example.org")
    assert await svc.recipient_status(lid, "new@example.org") == "confirmed"


async def test_snapshot_flush_during_load_discards_it(env: Env):
    svc = env.svc
    snaps = svc.cache.snapshots
    snaps.page_size = 1
    lid = await env.new_list()
    for a in ("a@example.org", "b@example.org"):
        await env.subscribe(lid, a)
    first, gate = _gated_pages(snaps)
    await svc.recipient_status(lid, "a@example.org")
    await asyncio.wait_for(first.wait(), 5)
    svc.cache.flush()                       # e.g. the invalidation channel reconnected
    gate.set()
    deadline = time.monotonic() + 5
    while snaps.stats["discarded"] == 0:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    assert not snaps.ready(lid)
    assert await svc.recipient_status(lid, "b@example.org") == "confirmed"   # a new load starts
    await _snapshot_ready(svc, lid)


async def test_snapshot_not_served_while_channel_down(env: Env):
    svc = env.svc
    lid = await env.new_list()
    await env.subscribe(lid, "c@example.org")
    await svc.recipient_status(lid, "c@example.org")
    await _snapshot_ready(svc, lid)
    calls = _counting_lookups(svc)
    svc.cache.healthy = False
    assert await svc.recipient_status(lid, "c@example.org") == "confirmed"
    assert await svc.recipient_status(lid, "c@example.org") == "confirmed"
    assert calls[0] == 2, "with the channel down every lookup reads the database"


async def test_snapshot_budget_too_big_lru_and_failures(env: Env):
    """A list over the budget is never held (its lookups read the database);
    loading another list beyond the budget drops the least recently used one;
    a failed load retries later and the database answers meanwhile."""
    svc = env.svc
    snaps = ListSnapshots(svc._snapshot_page, max_entries=3, refresh=900.0, page_size=2)
    svc.cache.snapshots = snaps
    big, small1, small2 = [await env.new_list(senders=[f"n{i}@example.com"]) for i in range(3)]
    for i in range(5):
        await env.subscribe(big, f"b{i}@example.org")
    for lid in (small1, small2):
        for i in range(2):
            await env.subscribe(lid, f"s{i}@example.org")
    await asyncio.sleep(0.5)
    await svc.recipient_status(big, "b0@example.org")
    deadline = time.monotonic() + 5
    while snaps.stats["too_big"] == 0:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    assert not snaps.ready(big) and snaps.entries == 0
    calls = _counting_lookups(svc)
    assert await svc.recipient_status(big, "b4@example.org") == "confirmed" and calls[0] == 1
    assert snaps.stats["too_big"] == 1, "not retried before snapshot_refresh"
    await svc.recipient_status(small1, "s0@example.org")
    await _snapshot_ready(svc, small1)
    await svc.recipient_status(small2, "s0@example.org")
    await _snapshot_ready(svc, small2)
    assert not snaps.ready(small1) and snaps.stats["evictions"] == 1 and snaps.entries == 2

    # a failing load: retried after retry_after, the database answers meanwhile
    failing = ListSnapshots(svc._snapshot_page, max_entries=100, refresh=900.0, retry_after=0.2)
    svc.cache.snapshots = failing

    async def broken(*a):
        raise ConnectionError("database went away")

    failing.fetch_page = broken
    assert await svc.recipient_status(small1, "s1@example.org") == "confirmed"
    deadline = time.monotonic() + 5
    while failing.stats["load_failures"] == 0:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    failing.fetch_page = svc._snapshot_page
    assert await svc.recipient_status(small1, "s1@example.org") == "confirmed"
    assert not failing.ready(small1), "no new attempt before retry_after"
    await asyncio.sleep(0.25)
    await svc.recipient_status(small1, "s1@example.org")
    await _snapshot_ready(svc, small1)
    await snaps.stop()


async def test_snapshot_reloads_when_old(env: Env):
    svc = env.svc
    now = [1000.0]
    snaps = ListSnapshots(svc._snapshot_page, max_entries=100, refresh=60.0, clock=lambda: now[0])
    svc.cache.snapshots = snaps
    lid = await env.new_list()
    await env.subscribe(lid, "old@example.org")
    await svc.recipient_status(lid, "old@example.org")
    await _snapshot_ready(svc, lid)
    assert snaps.stats["loads"] == 1
    now[0] += 61
    for _ in range(1024):       # the age is looked at every 1024 lookups
        assert await svc.recipient_status(lid, "old@example.org") == "confirmed"
    deadline = time.monotonic() + 5
    while snaps.stats["loads"] < 2:
        assert time.monotonic() < deadline, "an old snapshot is reloaded"
        await asyncio.sleep(0.01)


async def test_database_unreachable_raises_not_accepts(env: Env):
    if env.url.startswith("sqlite"):
        bad = "sqlite+aiosqlite:////nonexistent-dir/for/sure/x.db"
    else:
        bad = "postgresql+asyncpg://postgres@127.0.0.1:1/none"
    engine = create_engine(bad)
    svc = RegistryService(engine, RegistrySettings(secret=SECRET, lookup_timeout=2.0), secret=SECRET.encode())
    await svc.start(connect_wait=0.2)
    try:
        assert not svc.channel_healthy
        with pytest.raises(RegistryUnavailable):
            await svc.recipient_status("0123456789abcdef", "bob@example.org")
        with pytest.raises(RegistryUnavailable):
            await svc.list_for_sender("acc", "news@example.com")
    finally:
        await svc.stop()
        await engine.dispose()


async def test_without_secret_the_registry_refuses_token_work(tmp_path):
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    await migrate(engine)
    svc = RegistryService(engine, RegistrySettings(), secret=None)
    await svc.start()
    try:
        with pytest.raises(RegistryUnavailable):
            await svc.recipient_status("0123456789abcdef", "bob@example.org")
        with pytest.raises(RegistryUnavailable):
            svc.unsubscribe_url("0123456789abcdef", "bob@example.org")
        assert await svc.list_for_sender("nobody", "news@example.com") is None
    finally:
        await svc.stop()
        await engine.dispose()


async def test_two_services_on_one_database_invalidate_each_other(env: Env):
    """Two gateways (separate engines, caches, channels) on one database: an
    opt-out through A reaches B's cache within 1 s. (SQLite: the change counter
    of local mode; PostgreSQL: LISTEN/NOTIFY.)"""
    svc_b, engine_b = await _make(env.url, None)
    try:
        lid = await env.new_list()
        await env.subscribe(lid, "fred@example.org")
        # these writes reach B first (else B's flush for them could discard the list load below)
        if svc_b.mode == "local":     # B has polled the change counter past them
            want, deadline = await env.svc.store.version(), time.monotonic() + 5
            while svc_b.channel._seen < want:
                assert time.monotonic() < deadline, "B did not read the change counter"
                await asyncio.sleep(0.02)
        else:                         # the NOTIFYs
            await asyncio.sleep(0.5)
        assert await svc_b.recipient_status(lid, "fred@example.org") == "confirmed"   # now cached in B
        await _snapshot_ready(svc_b, lid, traffic="fred@example.org")  # and the whole list held in B's memory
        hits = svc_b.cache.snapshots.stats["hits"]
        assert await svc_b.recipient_status(lid, "fred@example.org") == "confirmed"
        assert svc_b.cache.snapshots.stats["hits"] == hits + 1
        assert await svc_b.list_for_sender(env.account, "news@example.com") is not None
        t0 = time.monotonic()
        await env.svc.remove_subscriber(env.account, lid, "fred@example.org")
        while await svc_b.recipient_status(lid, "fred@example.org") == "confirmed":
            assert time.monotonic() - t0 < 1.5, "opt-out not seen by the other gateway within 1 s"
            await asyncio.sleep(0.02)
        await env.svc.delete_list(env.account, lid)
        t0 = time.monotonic()
        while await svc_b.list_for_sender(env.account, "news@example.com") is not None:
            assert time.monotonic() - t0 < 1.5
            await asyncio.sleep(0.02)
    finally:
        await svc_b.stop()
        await engine_b.dispose()


async def test_postgres_channel_reconnect_flushes(pg_url):
    """Kill B's LISTEN connection: B stops serving from its cache at once and
    flushes when it is back."""
    import asyncpg

    svc, engine = await _make(pg_url, None)
    try:
        assert svc.channel_healthy
        lid = "0123456789abcdef"
        await svc.recipient_status(lid, "gina@example.org")
        assert len(svc.cache) == 1
        before = svc.channel.connects
        dsn = pg_url.replace("+asyncpg", "")
        admin = await asyncpg.connect(dsn)
        try:
            await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                "WHERE query LIKE 'LISTEN%' AND datname = current_database() AND pid <> pg_backend_pid()")
        finally:
            await admin.close()
        t0 = time.monotonic()
        while svc.channel.connects == before:
            assert time.monotonic() - t0 < 5
            await asyncio.sleep(0.02)
        assert svc.channel_healthy and len(svc.cache) == 0
    finally:
        await svc.stop()
        await engine.dispose()


async def test_redis_invalidation(tmp_path, pg_url):
    """invalidation = "redis": two services on PostgreSQL, invalidated through Redis pub/sub."""
    need(tcp_reachable("127.0.0.1", 6379), "Redis at 127.0.0.1:6379 is not reachable")
    channel = f"gw_test_{secrets.token_hex(4)}"
    a, ea = await _make(pg_url, FakeRelay(), invalidation="redis", channel=channel)
    b, eb = await _make(pg_url, None, invalidation="redis", channel=channel)
    try:
        assert a.channel_healthy and b.channel_healthy
        accounts = AccountStore(ea, scrypt_n=16)
        acc = f"r-{uuid.uuid4().hex[:8]}"
        await accounts.add(acc, "pw")
        await accounts.add_domain(acc, "example.com", approved_by="test")
        lst = await a.create_list(acc, name="R", list_id="r.example.com", senders=["r@example.com"],
                                  confirm_from="r@example.com")
        await a.add_subscriber(acc, lst.id, "hank@example.org")
        token = a.relay.links("hank@example.org")[-1].rsplit("/", 1)[1]
        assert await b.recipient_status(lst.id, "hank@example.org") == "pending"
        await _snapshot_ready(b, lst.id)            # B holds the list in memory: the events must reach that
        await a.confirm(token)
        t0 = time.monotonic()
        while await b.recipient_status(lst.id, "hank@example.org") != "confirmed":
            assert time.monotonic() - t0 < 1.5
            await asyncio.sleep(0.02)
        await a.remove_subscriber(acc, lst.id, "hank@example.org")
        t0 = time.monotonic()
        while await b.recipient_status(lst.id, "hank@example.org") != "unsubscribed":
            assert time.monotonic() - t0 < 1.5, "opt-out not seen by the other gateway within 1 s"
            await asyncio.sleep(0.02)
    finally:
        for s, e in ((a, ea), (b, eb)):
            await s.stop()
            await e.dispose()


# ------------------------------------------------------------------ PostgreSQL read-only fast path (asyncpg pool)
def test_asyncpg_dsn_from_sqlalchemy_url():
    from gateway.storage.db import asyncpg_dsn

    assert asyncpg_dsn("postgresql+asyncpg://u:p%40ss@db.example:5433/gw?prepared_statement_cache_size=0"
                       "&ssl=require") == "postgresql://u:p%40ss@db.example:5433/gw?ssl=require"
    assert asyncpg_dsn("postgresql://root@127.0.0.1/x") == "postgresql://root@127.0.0.1/x"
    assert asyncpg_dsn("sqlite+aiosqlite:///x.db") is None


def test_fast_path_status_precedence():
    from gateway.registry.fastpath import pick_statuses

    rows = [("a", "unsubscribed"), ("a", "confirmed"), ("b", "unsubscribed"), ("b", "pending"), ("c", "unsubscribed")]
    assert pick_statuses(rows, ["a", "b", "c", "d"]) == {
        "a": "confirmed", "b": "pending", "c": "unsubscribed", "d": "unknown"}


async def test_fast_path_only_on_postgres_and_configurable(env: Env):
    if env.url.startswith("sqlite"):
        assert env.svc.store.fast is None
        return
    assert env.svc.store.fast is not None
    svc, engine = await _make(env.url, None, lookup_pool_size=0)
    try:
        assert svc.store.fast is None
    finally:
        await svc.stop()
        await engine.dispose()


async def test_fast_path_answers_like_the_engine_and_batches(pg_url):
    """Every state answered through the asyncpg pool equals the SQLAlchemy
    answer; concurrent misses for one list share one query; the sender map
    and the snapshot pages read through the pool equal the engine's."""
    svc, engine = await _make(pg_url, FakeRelay(), snapshot_max_entries=0)   # misses, not snapshots
    try:
        accounts = AccountStore(engine, scrypt_n=16)
        acc = f"f-{uuid.uuid4().hex[:8]}"
        await accounts.add(acc, "pw")
        await accounts.add_domain(acc, "example.com", approved_by="test")
        env = Env(svc, engine, svc.relay, acc, acc, pg_url)
        lid = await env.new_list(senders=["news@example.com", "b-*@example.com"])
        await env.subscribe(lid, "conf@example.org")
        await svc.add_subscriber(acc, lid, "pend@example.org")
        await env.subscribe(lid, "gone@example.org")
        await svc.remove_subscriber(acc, lid, "gone@example.org")
        # opted out, then a fresh opt-in started: pending wins over the suppression entry
        await env.subscribe(lid, "back2@example.org")
        await svc.remove_subscriber(acc, lid, "back2@example.org")
        await svc.add_subscriber(acc, lid, "back2@example.org", reoptin=True)
        addrs = {"conf@example.org": "confirmed", "pend@example.org": "pending",
                 "gone@example.org": "unsubscribed", "back2@example.org": "pending",
                 "nobody@example.org": "unknown"}
        fast = svc.store.fast
        assert fast is not None
        svc.cache.flush()
        q0 = fast.stats["queries"]
        got = await asyncio.gather(*(svc.recipient_status(lid, a) for a in addrs))
        assert dict(zip(addrs, got)) == addrs
        assert fast.stats["queries"] - q0 == 1, "misses of one loop turn share one query"
        # the same answers through the engine (one code path with SQLite)
        svc.store.fast = None
        try:
            svc.cache.flush()
            assert [await svc.recipient_status(lid, a) for a in addrs] == list(addrs.values())
            slow_lists = await svc.store.lists(account_name=acc)
            slow_pages = [await svc.store.subscription_page(lid, t, after, 2)
                          for t in ("subscribers", "suppressions") for after in ("", "7")]
        finally:
            svc.store.fast = fast
        fast_lists = await svc.store.lists(account_name=acc)
        assert fast_lists == slow_lists and fast_lists[0].senders == ("news@example.com", "b-*@example.com")
        # the snapshot pages too
        fast_pages = [await svc.store.subscription_page(lid, t, after, 2)
                      for t in ("subscribers", "suppressions") for after in ("", "7")]
        assert fast_pages == slow_pages and fast.stats["page_queries"] == 4
        everything = sorted(await svc.store.subscription_page(lid, "subscribers", "", 100)
                            + await svc.store.subscription_page(lid, "suppressions", "", 100), key=lambda r: r[1])
        assert [st for _, st in everything] == ["confirmed", "pending", "pending", "unsubscribed", "unsubscribed"]
        assert (await svc.list_for_sender(acc, "b-x@example.com")).id == lid
        # unbatched mode answers the same
        fast.batch = False
        svc.cache.flush()
        assert [await svc.recipient_status(lid, a) for a in addrs] == list(addrs.values())
    finally:
        await svc.stop()
        await engine.dispose()


async def test_fast_path_race_with_invalidation_keeps_nothing(pg_url):
    """A lookup that read before an invalidation arrived must not be cached."""
    svc, engine = await _make(pg_url, None, snapshot_max_entries=0)
    try:
        fast = svc.store.fast
        lid = "0123456789abcdef"
        real = fast._fetch_statuses
        gate = asyncio.Event()

        async def slow(list_id, hashes):
            found = await real(list_id, hashes)
            await gate.wait()
            return found

        fast._fetch_statuses = slow
        task = asyncio.ensure_future(svc.recipient_status(lid, "race@example.org"))
        await asyncio.sleep(0.2)
        h = svc.keys.address_hash(lid, "race@example.org")
        svc.cache.apply([("s", lid, h)])       # e.g. a NOTIFY of a concurrent write
        gate.set()
        assert await task == "unknown"
        assert len(svc.cache) == 0
        fast._fetch_statuses = real
        assert await svc.recipient_status(lid, "race@example.org") == "unknown"
        assert len(svc.cache) == 1
    finally:
        await svc.stop()
        await engine.dispose()


async def test_fast_path_unresponsive_database_defers(pg_url):
    """A server that accepts and never answers: RegistryUnavailable within
    lookup_timeout, for every waiter of the batch, never "accept"."""
    import asyncpg  # noqa: F401

    conns = []

    async def swallow(reader, writer):
        conns.append(writer)
        await reader.read()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    engine = create_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{port}/none")
    svc = RegistryService(engine, RegistrySettings(secret=SECRET, lookup_timeout=0.5), secret=SECRET.encode())
    try:
        t0 = time.monotonic()
        got = await asyncio.gather(*(svc.recipient_status("0123456789abcdef", f"u{i}@example.org")
                                     for i in range(5)), return_exceptions=True)
        assert all(isinstance(g, RegistryUnavailable) for g in got), got
        assert time.monotonic() - t0 < 2.0
    finally:
        await svc.stop()
        await engine.dispose()
        for w in conns:
            w.close()
        server.close()
