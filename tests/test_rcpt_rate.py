"""rcpt_rate (issue 12, P-LOAD): recipients and messages per account and per
identity, per minute/hour/day, over real SMTP with a clock the test moves
(the gateway's clock, which the in-memory limiter reads); refunds of what was
not relayed; retry storms (tarpit, then 550 and one Violation); two gateways
sharing Redis; Redis cut mid-run.

The identity: nothing sets ``SessionInfo.identity`` yet (SASL sub-logins come
later), so :func:`as_identity` sets it on the gateway's own session object of
this client connection (found in ``gw.sessions`` by the client's port) right
after AUTH, where a sub-login would set it."""
from __future__ import annotations

import secrets
import time

import aiosmtplib
import pytest

from conftest import MESSAGE, eventually
from faultproxy import FaultProxy
from gateway.checks.rcpt_rate import RcptRate
from gateway.config import from_mapping
from gateway.configload import ConfigError
from gateway.core.events import Violation
from gateway.core.transaction import Phase

REDIS_URL = "redis://127.0.0.1:6379/0"


class FrozenClock:
    """Wall time frozen at the start; moves only when the test says so."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def limits(**values) -> dict:
    """[limits] with only the given keys set (all others 0 = no limit)."""
    base = {k: 0 for k in ("recipients_per_minute", "recipients_per_hour", "recipients_per_day",
                           "identity_recipients_per_minute", "identity_recipients_per_hour",
                           "identity_recipients_per_day", "messages_per_hour", "messages_per_day",
                           "identity_messages_per_hour", "identity_messages_per_day")}
    storm = {k: values.pop(k) for k in list(values) if k.startswith(("storm_", "tarpit_"))}
    base.update(values)
    return {"classes": {"standard": base}, "storm_refusals": 0, **storm}


def check_of(h) -> RcptRate:
    return next(c for c in h.gw.pipeline.checks(Phase.RCPT) if c.name == "rcpt_rate")


async def login(h, identity: str | None = None) -> aiosmtplib.SMTP:
    c = aiosmtplib.SMTP(hostname="127.0.0.1", port=h.port(), timeout=10)
    await c.connect()
    await c.login("alice", "s3cret")
    if identity is not None:
        as_identity(h, c, identity)
    return c


def as_identity(h, c: aiosmtplib.SMTP, identity: str) -> None:
    port = c.transport.get_extra_info("sockname")[1]
    mine = [p.gsession for p in h.gw.sessions if p.gsession is not None and p.gsession.peer_port == port]
    assert len(mine) == 1, "the gateway's session of this connection"
    mine[0].identity = identity


async def rcpt(c: aiosmtplib.SMTP, address: str) -> tuple[int, str]:
    """RCPT without aiosmtplib's exception on a refusal."""
    r = await c.execute_command(b"RCPT", f"TO:<{address}>".encode())
    return r.code, r.message


async def data(c: aiosmtplib.SMTP) -> int:
    try:
        return (await c.data(MESSAGE))[0]
    except (aiosmtplib.SMTPDataError, aiosmtplib.SMTPResponseException) as exc:
        return exc.code


async def rcpts(c: aiosmtplib.SMTP, n: int, tag: str = "r") -> list[int]:
    """MAIL, n RCPTs (bob0.. at example.org); the RCPT codes. Leaves the transaction open."""
    code, _ = await c.mail("alice@example.com")
    assert code == 250
    out = []
    for i in range(n):
        code, msg = await rcpt(c, f"{tag}{i}@example.org")
        out.append(code)
    return out


async def one_message(c: aiosmtplib.SMTP, n: int = 1, tag: str = "r") -> tuple[list[int], int | None]:
    codes = await rcpts(c, n, tag)
    if 250 not in codes:
        await c.rset()
        return codes, None
    return codes, await data(c)


@pytest.fixture
async def gw(gateway_factory, sink):
    async def make(clock=None, **lim):
        h = await gateway_factory(sink, clock=clock or FrozenClock(), limits=limits(**lim),
                                  smtp={"max_recipients": 100})
        await h.add_account()
        return h
    return make


@pytest.mark.parametrize("window,seconds", [("minute", 60), ("hour", 3600), ("day", 86400)])
async def test_each_recipient_window_trips_and_releases(gw, sink, window, seconds):
    clock = FrozenClock()
    h = await gw(clock, **{f"recipients_per_{window}": 3})
    c = await login(h)
    codes, code = await one_message(c, 4)
    assert codes == [250, 250, 250, 451] and code == 250
    code, msg = await c.mail("alice@example.com")
    code, msg = await rcpt(c, "late@example.org")
    assert code == 451 and msg == f"4.7.1 P-LOAD recipients_per_{window} exceeded, try again later"
    clock.advance(seconds / 3)          # one recipient's worth of the window
    assert (await rcpt(c, "next@example.org"))[0] == 250
    assert (await rcpt(c, "again@example.org"))[0] == 451
    clock.advance(seconds)              # the whole window: rested
    assert [(await rcpt(c, f"x{i}@example.org"))[0] for i in range(4)] == [250, 250, 250, 451]
    assert await data(c) == 250
    await c.quit()
    assert [len(m.rcpt_tos) for m in sink.messages] == [3, 1 + 3]


async def test_message_window_charged_once_per_transaction(gw, sink):
    clock = FrozenClock()
    h = await gw(clock, messages_per_hour=2)
    c = await login(h)
    for _ in range(2):
        codes, data = await one_message(c, 3)     # three recipients, one message
        assert codes == [250, 250, 250] and data == 250
    codes, data = await one_message(c, 1)
    assert codes == [451] and data is None
    clock.advance(1800)
    assert (await one_message(c, 2))[0] == [250, 250]
    await c.quit()
    assert len(sink.messages) == 3


async def test_one_identity_stopped_another_keeps_sending(gw, sink):
    h = await gw(identity_recipients_per_hour=2, recipients_per_hour=10)
    site7 = await login(h, "site7")
    site8 = await login(h, "site8")
    codes, data = await one_message(site7, 3, "a")
    assert codes == [250, 250, 451] and data == 250
    codes, data = await one_message(site7, 1, "b")
    assert codes == [451]
    codes, data = await one_message(site8, 2, "c")
    assert codes == [250, 250] and data == 250
    plain = await login(h)          # the account as a whole: 4 of its 10 used
    assert (await one_message(plain, 7, "d"))[0] == [250] * 6 + [451]
    for c in (site7, site8, plain):
        await c.quit()
    records = [r for r in h.log_records() if r.get("decision") == "refused" or r.get("decision") == "relayed"]
    assert records


async def test_upstream_refused_recipients_are_not_charged(gw, sink):
    h = await gw(recipients_per_day=3)
    sink.refuse_rcpt["r0@example.org"] = "550 5.1.1 no such user"
    sink.refuse_rcpt["r1@example.org"] = "550 5.1.1 no such user"
    c = await login(h)
    codes, data = await one_message(c, 3)
    assert codes == [550, 550, 250] and data == 250
    await check_of(h).settled()
    sink.refuse_rcpt.clear()
    codes, data = await one_message(c, 3, "s")       # 1 of 3 used: two more, not three
    assert codes == [250, 250, 451] and data == 250
    await c.quit()


async def test_aborted_deferred_and_data_refused_transactions_are_not_charged(gw, sink):
    h = await gw(recipients_per_day=3)
    c = await login(h)
    assert await rcpts(c, 3) == [250, 250, 250]
    await c.rset()                                    # aborted: nothing relayed
    await check_of(h).settled()
    sink.data_reply = "451 4.3.0 try later"
    codes, data = await one_message(c, 3, "d")        # deferred by the upstream at DATA
    assert codes == [250, 250, 250] and data == 451
    await check_of(h).settled()
    sink.data_reply = None
    assert await rcpts(c, 3, "q") == [250, 250, 250]
    await c.quit()                                    # QUIT mid-transaction: aborted
    await eventually(lambda: not check_of(h)._open, "the transaction ended")
    await check_of(h).settled()
    c = await login(h)
    codes, data = await one_message(c, 4, "z")
    assert codes == [250, 250, 250, 451] and data == 250
    await c.quit()
    assert len(sink.messages) == 1 and len(sink.messages[0].rcpt_tos) == 3


async def test_retry_storm_tarpit_then_550_and_one_violation(gw, sink):
    h = await gw(recipients_per_hour=1, storm_refusals=2, storm_window=600.0, tarpit_min=0.01, tarpit_max=0.05)
    seen: list[Violation] = []
    h.gw.events.subscribe(Violation, seen.append)
    c = await login(h)
    codes = await rcpts(c, 1 + 9)
    # 1 accepted, refusals 1-2 plain, 3-6 tarpitted 451, 7.. 550
    assert codes == [250] + [451] * 6 + [550] * 3
    await c.quit()
    assert len(seen) == 1
    v = seen[0]
    assert (v.rule, v.kind, v.account, v.identity) == ("P-LOAD", "rate_storm", "alice", None)
    await eventually(lambda: any(r.get("decision") for r in h.log_records()), "the transaction's log line")
    details = [o.get("detail", "") for r in h.log_records() for o in r.get("checks", r.get("ledger", []))
               if isinstance(o, dict) and o.get("check") == "rcpt_rate"]
    assert sum("tarpit" in d for d in details) == 4, details


async def test_a_storms_550s_are_not_refused_recipients_to_the_harvest_guard(gateway_factory, sink):
    """RATE_STORM's 550 says nothing about whether an address exists: the
    harvest guard (enforced, cut-off after 2 refused recipients) does not count
    it, so the storm is the rate limiter's alone, not a harvest cut-off too."""
    h = await gateway_factory(sink, clock=FrozenClock(), smtp={"max_recipients": 100},
                              limits=limits(recipients_per_hour=1, storm_refusals=1, tarpit_min=0.01,
                                            tarpit_max=0.02),
                              checks={"modes": {"rcpt_harvest": "enforce"}},
                              harvest={"max_refused_per_session": 2, "tarpit_after": 10})
    await h.add_account()
    c = await login(h)
    codes = await rcpts(c, 1 + 6)
    assert codes == [250, 451, 451, 451, 550, 550, 550], "the storm's own replies, no 421 of the harvest guard"
    guard = next(ch for ch in h.gw.pipeline.checks(Phase.RCPT) if ch.name == "rcpt_harvest").guard
    assert sum(guard.session_refused.values()) == 0
    await c.quit()


def test_limit_settings_are_validated(tmp_path):
    from conftest import base_config
    def cfg(**lim):
        return from_mapping(base_config(tmp_path, None, limits=lim), "gw.toml")
    with pytest.raises(ConfigError) as e:
        cfg(classes={"bulk": {"recipients_per_hour": -1}})
    assert e.value.source == "gw.toml" and e.value.key == "limits.classes.bulk.recipients_per_hour"
    with pytest.raises(ConfigError) as e:
        cfg(classes={"bulk": {"recipients_per_week": 5}})
    assert e.value.key == "limits.classes.bulk.recipients_per_week" and "unknown key" in e.value.problem
    with pytest.raises(ConfigError) as e:
        cfg(accounts={"shop": "gold"})
    assert e.value.key == "limits.accounts" and "gold" in e.value.problem
    with pytest.raises(ConfigError) as e:
        cfg(default_class="gold")
    assert e.value.key == "limits.default_class"
    with pytest.raises(ConfigError) as e:
        cfg(tarpit_max=11.0)
    assert e.value.key == "limits.tarpit_max"
    with pytest.raises(ConfigError) as e:
        cfg(tarpit_min=3.0, tarpit_max=2.0)
    assert e.value.key == "limits.tarpit_min"
    ok = cfg(default_class="small", classes={"small": {"recipients_per_hour": 100}, "bulk": {"recipients_per_day": 0}},
             accounts={"shop": "bulk"}, overrides={"shop": {"recipients_per_hour": 9000}})
    small = ok.limits.for_account("alice")
    shop = ok.limits.for_account("shop")
    assert small["recipients_per_hour"] == 100 and small["recipients_per_day"] == 20000
    assert shop["recipients_per_day"] == 0 and shop["recipients_per_hour"] == 9000


# ---------------------------------------------------------------- Redis
async def _delete(client, prefix: str) -> None:
    async for k in client.scan_iter(match=f"{prefix}*"):
        await client.delete(k)


async def test_two_gateways_sharing_redis_stay_within_the_limit(gateway_factory, sink, redis_client):
    prefix = f"gwtest:{secrets.token_hex(4)}:"
    common = dict(counters={"backend": "redis", "redis_url": REDIS_URL, "key_prefix": prefix},
                  limits=limits(recipients_per_day=17), smtp={"max_recipients": 100})
    try:
        a = await gateway_factory(sink, **common)
        await a.add_account()
        b = await gateway_factory(sink, **common, storage={"url": a.gw.config.storage.url})
        ca, cb = await login(a), await login(b)
        await ca.mail("alice@example.com")
        await cb.mail("alice@example.com")
        accepted = 0
        for i in range(15):
            accepted += (await rcpt(ca, f"a{i}@example.org"))[0] == 250
            accepted += (await rcpt(cb, f"b{i}@example.org"))[0] == 250
        assert accepted == 17
        assert await data(ca) == 250 and await data(cb) == 250
        await ca.quit()
        await cb.quit()
        assert sum(len(m.rcpt_tos) for m in sink.messages) == 17
    finally:
        await _delete(redis_client, prefix)


async def test_redis_cut_mid_run_keeps_enforcing_locally(gateway_factory, sink, redis_client):
    prefix = f"gwtest:{secrets.token_hex(4)}:"
    proxy = await FaultProxy("127.0.0.1", 6379).start()
    try:
        h = await gateway_factory(sink, counters={"backend": "redis", "redis_url": f"redis://{proxy.address}/0",
                                                  "key_prefix": prefix, "timeout": 0.3, "expected_nodes": 2},
                                  limits=limits(recipients_per_day=8), smtp={"max_recipients": 100})
        await h.add_account()
        c = await login(h)
        assert await one_message(c, 3) == ([250] * 3, 250)      # 3 of 8 charged in Redis
        await proxy.set_mode("cut")
        # Redis away: the local limiter, 8 // 2 = 4 for this node (a fresh local state per outage)
        codes, code = await one_message(c, 6, "l")
        assert codes == [250] * 4 + [451] * 2 and code == 250
        assert h.gw.counters.fallback
        await proxy.set_mode("pass")
        await eventually(lambda: not h.gw.counters.fallback, "the counters back on Redis", timeout=20)
        codes, code = await one_message(c, 6, "b")            # Redis again: its 3, so 5 more
        assert codes == [250] * 5 + [451] and code == 250
        await c.quit()
        assert [len(m.rcpt_tos) for m in sink.messages] == [3, 4, 5]
    finally:
        await proxy.stop()
        await _delete(redis_client, prefix)


async def test_storm_of_one_identity_leaves_the_other_alone(gw, sink):
    h = await gw(identity_recipients_per_hour=1, storm_refusals=1, tarpit_min=0.01, tarpit_max=0.02)
    seen: list[Violation] = []
    h.gw.events.subscribe(Violation, seen.append)
    bad, good = await login(h, "site7"), await login(h, "site8")
    assert await rcpts(bad, 6) == [250, 451, 451, 451, 550, 550]
    assert await rcpts(good, 2, "g") == [250, 451]      # its own first refusal: a plain 451, no storm
    for c in (bad, good):
        await c.quit()
    assert [(v.kind, v.account, v.identity) for v in seen] == [("rate_storm", "alice", "site7")]
