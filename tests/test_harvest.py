"""The harvest guard (P-HARVEST, checks/rcpt_harvest.py) and the connection
limits of issue 12 (P-LOAD: checks/connect_rate.py,
checks/mail_account_connections.py), over real SMTP with a clock the test
controls. VRFY 252 / EXPN 502 are tested in test_smtp_core.py
(test_vrfy_expn...: still answered without information)."""
from __future__ import annotations

import asyncio
import base64

from gateway.core.events import OutcomeRecorded, Violation
from gateway.core.transaction import Phase

from smtp_client import AUTH, cmd, proxied_session, reply, session
from conftest import WindowClock
from test_blocklist import proxy_listener

WINDOW = 60.0


def violations(h) -> list[Violation]:
    seen: list[Violation] = []
    h.gw.events.subscribe(Violation, seen.append)
    return seen


def outcomes(h, check: str) -> list:
    seen: list = []
    h.gw.events.subscribe(OutcomeRecorded, lambda e: seen.append(e.outcome) if e.outcome.check == check else None)
    return seen


async def closed(reader: asyncio.StreamReader) -> bool:
    """True once the gateway has closed the connection (EOF within 5 s)."""
    return await asyncio.wait_for(reader.read(1), 5.0) == b""


# rcpt_harvest defaults to warn (docs/checks.md "Modes"): these tests enforce it
ENFORCE = {"modes": {"rcpt_harvest": "enforce"}}
NO_CROSS = {"max_refused_per_ip": 0, "max_refused_per_account": 0, "max_refused_per_identity": 0}


async def test_session_tarpit_then_421_and_one_violation(sink, gateway_factory):
    """Refusals by the upstream (550 user unknown) and by the gateway (a 501
    bad address) both count: after tarpit_after the RCPT replies wait,
    doubling, then 421 and closed."""
    h = await gateway_factory(sink, checks=ENFORCE, harvest={"max_refused_per_session": 4, "tarpit_after": 2,
                                             "tarpit_delay": 0.01, "tarpit_max": 0.02, **NO_CROSS})
    await h.add_account()
    seen = violations(h)
    harvest = outcomes(h, "rcpt_harvest")
    for i in range(5):
        sink.refuse_rcpt[f"nobody{i}@example.org"] = "550 5.1.1 No such user"
    reader, writer = await session(h.port())
    try:
        assert (await cmd(reader, writer, b"MAIL FROM:<alice@example.com>")).startswith(b"250")
        assert (await cmd(reader, writer, b"RCPT TO:<bob@example.org>")).startswith(b"250")   # a good one
        # ours (501: refused by the server before the checks run, counted all the same)
        got = [await cmd(reader, writer, b"RCPT TO:<bad@@example.org>")]
        got += [await cmd(reader, writer, f"RCPT TO:<nobody{i}@example.org>".encode()) for i in range(4)]
        assert [g[:1] for g in got] == [b"5"] * 5, got
        assert (await cmd(reader, writer, b"RCPT TO:<carol@example.org>")).startswith(
            b"421 4.7.0 P-HARVEST Too many refused recipients in this session"), got
        assert await closed(reader)
    finally:
        writer.close()
    waits = [o.detail for o in harvest if o.detail.startswith("tarpit")]
    # RCPT after 3 refusals waits 0.01 s, after 4: 0.02 s (doubling, at most tarpit_max)
    assert waits == ["tarpit 0.01 s after 3 refused recipients", "tarpit 0.02 s after 4 refused recipients"], waits
    assert len(seen) == 1, seen
    v = seen[0]
    assert (v.rule, v.kind, v.account, v.identity) == ("P-HARVEST", "harvest", "alice", None)
    assert "5 refused recipients in this session > 4" in v.detail
    assert len(sink.messages) == 0


async def test_cross_session_per_ip_deferred_for_the_window_then_released(sink, gateway_factory):
    clock = WindowClock(WINDOW)
    h = await gateway_factory(sink, checks=ENFORCE, clock=clock, listeners=proxy_listener(),
                              harvest={"max_refused_per_session": 0, "tarpit_delay": 0, "window": WINDOW,
                                       "max_refused_per_ip": 3, "max_refused_per_account": 0,
                                       "max_refused_per_identity": 0})
    seen = violations(h)

    async def probe(ip: str, n: int) -> list[bytes]:
        """An unauthenticated prober: n RCPTs (each refused: relay denied), then QUIT."""
        reader, writer = await proxied_session(h.port(), ip)
        try:
            assert (await reply(reader)).startswith(b"220")
            assert (await cmd(reader, writer, b"EHLO prober.test")).startswith(b"250")
            assert (await cmd(reader, writer, b"MAIL FROM:<x@attacker.example>")).startswith(b"250")
            got = [await cmd(reader, writer, f"RCPT TO:<u{i}@example.org>".encode()) for i in range(n)]
            await cmd(reader, writer, b"QUIT")
            return got
        finally:
            writer.close()

    first = await probe("192.0.2.7", 4)
    assert all(g.startswith(b"554 5.7.1 P-RELAY") for g in first), first
    second = await probe("192.0.2.7", 2)
    assert all(g.startswith(b"451 4.7.1 P-HARVEST Too many refused recipients recently") for g in second), second
    assert (await probe("198.51.100.9", 1))[0].startswith(b"554 5.7.1 P-RELAY")   # another IP: not deferred
    assert len(seen) == 1 and seen[0].kind == "harvest"
    assert "harvest:ip:192.0.2.7" in seen[0].detail and seen[0].account is None
    clock.next_window()
    assert (await probe("192.0.2.7", 1))[0].startswith(b"554 5.7.1 P-RELAY")      # released
    assert len(seen) == 1


async def test_cross_session_per_account(sink, gateway_factory):
    """The account's count crosses sessions and client IPs; another account is not deferred."""
    clock = WindowClock(WINDOW)
    h = await gateway_factory(sink, checks=ENFORCE, clock=clock, listeners=proxy_listener(),
                              harvest={"max_refused_per_session": 0, "tarpit_delay": 0, "window": WINDOW,
                                       "max_refused_per_ip": 0, "max_refused_per_account": 2,
                                       "max_refused_per_identity": 0})
    await h.add_account()
    await h.add_account("bob", "b0bpass", domains=("example.net",))
    seen = violations(h)
    for i in range(3):
        sink.refuse_rcpt[f"nobody{i}@example.org"] = "550 5.1.1 No such user"

    async def rcpts(ip: str, auth: bytes, sender: str, rcpt: list[str]) -> list[bytes]:
        reader, writer = await proxied_session(h.port(), ip)
        try:
            assert (await reply(reader)).startswith(b"220")
            assert (await cmd(reader, writer, b"EHLO c.test")).startswith(b"250")
            assert (await cmd(reader, writer, auth)).startswith(b"235")
            assert (await cmd(reader, writer, f"MAIL FROM:<{sender}>".encode())).startswith(b"250")
            got = [await cmd(reader, writer, f"RCPT TO:<{r}>".encode()) for r in rcpt]
            await cmd(reader, writer, b"QUIT")
            return got
        finally:
            writer.close()

    bob = b"AUTH PLAIN " + base64.b64encode(b"\0bob\0b0bpass")
    got = await rcpts("192.0.2.1", AUTH, "alice@example.com", [f"nobody{i}@example.org" for i in range(3)])
    assert all(g.startswith(b"550") for g in got), got
    got = await rcpts("192.0.2.2", AUTH, "alice@example.com", ["carol@example.org"])
    assert got[0].startswith(b"451 4.7.1 P-HARVEST"), got
    got = await rcpts("192.0.2.2", bob, "bob@example.net", ["carol@example.org"])
    assert got[0].startswith(b"250"), got
    assert [(v.kind, v.account) for v in seen] == [("harvest", "alice")]
    clock.next_window()
    got = await rcpts("192.0.2.2", AUTH, "alice@example.com", ["carol@example.org"])
    assert got[0].startswith(b"250"), got


async def test_connection_rate_per_ip_over_proxy_headers(sink, gateway_factory):
    clock = WindowClock(WINDOW)
    h = await gateway_factory(sink, clock=clock, listeners=proxy_listener(),
                              smtp={"connection_rate_per_ip": 2, "connection_rate_burst": 2})

    async def greet(ip: str) -> bytes:
        reader, writer = await proxied_session(h.port(), ip)
        try:
            return await reply(reader)
        finally:
            writer.close()

    a = [await greet("192.0.2.7") for _ in range(3)]
    assert [g[:4] for g in a] == [b"220 ", b"220 ", b"421 "], a
    assert a[2].startswith(b"421 4.7.0 P-LOAD Too many connections from your address per minute (connection rate)")
    assert (await greet("192.0.2.8")).startswith(b"220 ")          # another client IP has its own rate
    assert (await greet("2001:db8::7")).startswith(b"220 ")
    assert (await greet("192.0.2.7")).startswith(b"421 4.7.0")
    clock.offset += 60.0                                             # a minute later: released
    assert (await greet("192.0.2.7")).startswith(b"220 ")
    refused = [r for r in h.log_records() if r["event"] == "session_refused"]
    assert refused and all(r["client_ip"] == "192.0.2.7" for r in refused)


async def test_concurrent_sessions_per_account(sink, gateway_factory):
    h = await gateway_factory(sink, smtp={"max_connections_per_account": 1})
    await h.add_account()
    r1, w1 = await session(h.port())
    r2, w2 = await session(h.port())
    try:
        assert (await cmd(r1, w1, b"MAIL FROM:<alice@example.com>")).startswith(b"250")
        got = await cmd(r2, w2, b"MAIL FROM:<alice@example.com>")
        assert got.startswith(b"421 4.7.0 P-LOAD Too many concurrent connections for this account"), got
        assert await closed(r2)
        # the first session keeps its place through RSET and a second transaction
        assert (await cmd(r1, w1, b"RSET")).startswith(b"250")
        assert (await cmd(r1, w1, b"MAIL FROM:<alice@example.com>")).startswith(b"250")
        assert (await cmd(r1, w1, b"QUIT")).startswith(b"221")
    finally:
        w1.close()
        w2.close()
    # released once the first session ended (its SessionEnded)
    check = next(c for c in h.gw.pipeline.checks(Phase.MAIL) if c.name == "mail_account_connections")
    for _ in range(250):
        if check.sessions.count("alice") == 0:
            break
        await asyncio.sleep(0.02)
    r3, w3 = await session(h.port())
    try:
        assert (await cmd(r3, w3, b"MAIL FROM:<alice@example.com>")).startswith(b"250")
    finally:
        w3.close()


async def test_auth_lockout_backs_off(sink, gateway_factory):
    """Reaching the failure limit locks the IP out for failure_window from
    then (past the fixed window's end); the next lockout lasts twice as long."""
    clock = WindowClock(86400.0)                    # 1 s after a day boundary: lockout_memory's windows too
    h = await gateway_factory(sink, clock=clock, auth={"max_failures_per_ip": 2, "max_failures_per_account": 100,
                                                        "failure_window": WINDOW, "lockout_max": 4 * WINDOW,
                                                        "lockout_memory": 86400.0})
    await h.add_account()
    bad = b"AUTH PLAIN " + base64.b64encode(b"\0alice\0guess")

    async def auth(line: bytes) -> bytes:
        reader, writer = await session(h.port(), auth=False)
        try:
            return await cmd(reader, writer, line)
        finally:
            writer.close()

    async def lock_out() -> None:
        assert [(await auth(bad))[:3] for _ in range(2)] == [b"535", b"535"]
        assert (await auth(AUTH)).startswith(b"454 4.7.0")

    await lock_out()                                 # at t = 1 s: locked until about 61 s
    clock.offset += WINDOW - 0.5                     # t = 60.5 s: the fixed window has ended, the lockout has not
    assert (await auth(AUTH)).startswith(b"454 4.7.0")
    clock.offset += WINDOW                           # failure_window after the lockout: released
    assert (await auth(AUTH)).startswith(b"235")
    await lock_out()                                 # the second lockout: 2 x failure_window
    clock.offset += WINDOW + 5.0
    assert (await auth(AUTH)).startswith(b"454 4.7.0")
    clock.offset += WINDOW
    assert (await auth(AUTH)).startswith(b"235")


async def test_harvest_guard_defaults_to_warn(sink, gateway_factory):
    """Unmeasured on real traffic, the guard only records by default: no wait, no 421, no Violation."""
    h = await gateway_factory(sink, harvest={"max_refused_per_session": 2, "tarpit_after": 1,
                                             "tarpit_delay": 0.01, "tarpit_max": 0.02, **NO_CROSS})
    assert h.gw.config.checks.mode("rcpt_harvest") == "warn"
    await h.add_account()
    seen = violations(h)
    for i in range(4):
        sink.refuse_rcpt[f"nobody{i}@example.org"] = "550 5.1.1 No such user"
    reader, writer = await session(h.port())
    try:
        assert (await cmd(reader, writer, b"MAIL FROM:<alice@example.com>")).startswith(b"250")
        for i in range(4):
            assert (await cmd(reader, writer, f"RCPT TO:<nobody{i}@example.org>".encode())).startswith(b"550")
        assert (await cmd(reader, writer, b"RCPT TO:<bob@example.org>")).startswith(b"250")
    finally:
        writer.close()
    assert seen == []
