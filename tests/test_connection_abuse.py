"""Connection-level abuse (P-LOAD): a short timeout before authentication
(smtp.preauth_timeout) and, near the connection cap, idle unauthenticated
sessions evicted for newcomers (smtp/evict.py, smtp.evict_unauthenticated_at).

Everything over real sockets, several client addresses through PROXY
headers. No durations are asserted: replies, who is still open, counters."""
from __future__ import annotations

import asyncio
import logging

import pytest

from conftest import MESSAGE, base_config, eventually
from smtp_client import AUTH, cmd, dot_stuff, proxied_session, raw_session, reply, session
from gateway.config import ConfigError, from_mapping
from gateway.smtp import evict

WAIT = 5.0          # every read that ends a session has this deadline
PREAUTH_421 = b"421 4.4.2 P-LOAD Timeout before authentication, closing"
EVICTED_421 = b"421 4.7.0 P-LOAD Too many connections: closing an idle unauthenticated session"


def proxy_listener() -> list[dict]:
    return [{"name": "plain", "address": "127.0.0.1", "port": 0, "tls": "none", "auth_without_tls": True,
             "proxy_protocol": True}]


async def greeted(port: int, ip: str, ehlo: bool = True):
    """A session from ``ip`` (PROXY header), greeted (220) and, with ``ehlo``, after EHLO."""
    reader, writer = await proxied_session(port, ip)
    greeting = await reply(reader)
    assert greeting.startswith(b"220 "), greeting
    if ehlo:
        assert (await cmd(reader, writer, b"EHLO client.test")).startswith(b"250")
    return reader, writer


async def closed_with(reader: asyncio.StreamReader) -> bytes:
    """Everything the gateway still sends, up to its close (bounded)."""
    return await asyncio.wait_for(reader.read(), WAIT)


async def still_open(reader, writer) -> bool:
    return (await cmd(reader, writer, b"NOOP")).startswith(b"250 ")


def closed_count(h, reason: str) -> float:
    return h.gw.metrics.sessions_closed.labels(reason)._value.get()


async def relay_one(reader, writer) -> bytes:
    """AUTH as alice and relay MESSAGE; the reply to the end of DATA."""
    assert (await cmd(reader, writer, AUTH)).startswith(b"235")
    assert (await cmd(reader, writer, b"MAIL FROM:<alice@example.com>")).startswith(b"250")
    assert (await cmd(reader, writer, b"RCPT TO:<bob@example.org>")).startswith(b"250")
    assert (await cmd(reader, writer, b"DATA")).startswith(b"354")
    writer.write(dot_stuff(MESSAGE) + b".\r\n")
    await writer.drain()
    return await reply(reader)


# ====================================================================== pure: the policy
class _S:
    def __init__(self, name: str, opened_at: float, idle: bool = True):
        self.name, self.opened_at, self.idle, self.session_info, self.evicted = name, opened_at, idle, None, False

    def evictable(self) -> bool:
        return self.idle

    def evict(self) -> None:
        self.evicted = True


def test_threshold_is_a_fraction_of_the_cap_and_zero_is_off():
    assert evict.threshold(10, 0.8) == 8
    assert evict.threshold(10, 0.7) == 7        # not 7.000000000000001 -> 7 by accident
    assert evict.threshold(1000, 0.9) == 900
    assert evict.threshold(1000, 0.0) is None


def test_victims_are_the_oldest_idle_and_only_as_many_as_over():
    busy, b, c, a = _S("busy", 0.5, idle=False), _S("b", 1.0), _S("c", 2.0), _S("a", 3.0)
    sessions: evict.ConnectOrder[_S] = evict.ConnectOrder()
    for s in (busy, b, c, a):                  # connect order
        sessions.add(s)
    assert evict.victims(sessions, open_now=8, limit=8) == []
    assert evict.victims(sessions, open_now=9, limit=8) == [b]
    assert evict.victims(sessions, open_now=10, limit=8) == [b, c]
    assert evict.victims(sessions, open_now=20, limit=8) == [b, c, a]    # never the busy one
    assert evict.victims(sessions, open_now=20, limit=None) == []
    assert evict.make_room(sessions, 10, 8, now=5.0) == 2
    assert [s.evicted for s in (busy, b, c, a)] == [False, True, True, False]
    sessions.discard(b)
    sessions.discard(b)                        # twice: a no-op
    assert list(sessions) == [busy, c, a] and len(sessions) == 3 and b not in sessions


def test_config_validates_the_new_keys(tmp_path):
    for key, value, problem in (("evict_unauthenticated_at", 1.0, "below 1"),
                                ("evict_unauthenticated_at", -0.1, "at least 0"),
                                ("preauth_timeout", 0, "greater than 0")):
        with pytest.raises(ConfigError) as err:
            from_mapping(base_config(tmp_path, None, smtp={key: value}), "gw.toml")
        assert err.value.key == f"smtp.{key}" and problem in str(err.value) and "gw.toml" in str(err.value)
    cfg = from_mapping({k: v for k, v in base_config(tmp_path, None).items() if k != "smtp"}, "gw.toml").smtp
    assert cfg.preauth_timeout < cfg.idle_timeout and cfg.evict_unauthenticated_at == 0.9


# ====================================================================== preauth_timeout
async def test_unauthenticated_idle_session_gets_the_preauth_421_authenticated_stays(sink, gateway_factory):
    h = await gateway_factory(sink, smtp={"preauth_timeout": 0.5, "idle_timeout": 60})
    await h.add_account()
    auth_r, auth_w = await session(h.port())                 # EHLO + AUTH: idle_timeout from now on
    greeted_r, greeted_w, g = await raw_session(h.port())    # greeted, never says a word
    assert g.startswith(b"220 ")
    ehlo_r, ehlo_w = await session(h.port(), auth=False)     # EHLO, then idle before AUTH
    try:
        for reader in (greeted_r, ehlo_r):
            data = await closed_with(reader)
            assert data.startswith(PREAUTH_421), data
            assert data.count(b"\r\n") == 1, data              # that one line, then the close
        assert await still_open(auth_r, auth_w)
        await eventually(lambda: closed_count(h, "preauth_timeout") == 2, "two preauth timeouts counted")
        ended = sorted(r["ended"] for r in h.log_records() if r["event"] == "session")
        assert ended == ["preauth timeout", "preauth timeout"]
        assert closed_count(h, "evicted") == 0
    finally:
        for w in (auth_w, greeted_w, ehlo_w):
            w.close()


async def test_client_network_session_is_authenticated_at_connect_not_preauth(sink, gateway_factory):
    h = await gateway_factory(sink, listeners=proxy_listener(), smtp={"preauth_timeout": 0.5, "idle_timeout": 60})
    await h.add_account("webhost", domains=("shop.example",), networks=("192.0.2.0/24",))
    net_r, net_w = await greeted(h.port(), "192.0.2.10")
    other_r, other_w = await greeted(h.port(), "198.51.100.7")
    try:
        assert (await closed_with(other_r)).startswith(PREAUTH_421)
        assert await still_open(net_r, net_w)
    finally:
        net_w.close()
        other_w.close()


async def test_preauth_timeout_never_lengthens_a_shorter_idle_timeout(sink, gateway_factory):
    # preauth_timeout 30 s (the default) over idle_timeout 0.5 s: the idle timeout applies, with its own reply.
    h = await gateway_factory(sink, smtp={"idle_timeout": 0.5})
    reader, writer, _ = await raw_session(h.port())
    try:
        data = await closed_with(reader)
        assert data.startswith(b"421 4.4.2 P-LOAD Idle timeout, closing"), data
    finally:
        writer.close()


# ====================================================================== eviction near the cap
async def test_idle_unauthenticated_sessions_make_room_oldest_first(sink, gateway_factory, caplog):
    caplog.set_level(logging.INFO, logger="gateway.smtp.evict")
    h = await gateway_factory(sink, listeners=proxy_listener(),
                              smtp={"max_connections": 10, "evict_unauthenticated_at": 0.8,
                                    "max_connections_per_ip": 10, "preauth_timeout": 60,
                                    "service_mailboxes": ["postmaster@gw.test"]})
    await h.add_account()
    port = h.port()
    writers = []
    try:
        # 8 idle unauthenticated sessions from three addresses (some after
        # EHLO, some greeted only): 8 open, the threshold.
        idle = []
        for i in range(8):
            r, w = await greeted(port, f"203.0.113.{i % 3 + 1}", ehlo=i % 2 == 0)
            idle.append((r, w))
            writers.append(w)
        assert h.gw.connections.total == 8
        # Each of these evicts the oldest idle one, then becomes exempt:
        # authenticated and idle; unauthenticated inside a transaction;
        # unauthenticated inside a command (AUTH LOGIN waiting for the user name).
        auth_r, auth_w = await greeted(port, "198.51.100.1")
        writers.append(auth_w)
        assert (await cmd(auth_r, auth_w, AUTH)).startswith(b"235")
        tx_r, tx_w = await greeted(port, "198.51.100.2")
        writers.append(tx_w)
        assert (await cmd(tx_r, tx_w, b"MAIL FROM:<someone@example.net>")).startswith(b"250")
        busy_r, busy_w = await greeted(port, "198.51.100.3")
        writers.append(busy_w)
        assert (await cmd(busy_r, busy_w, b"AUTH LOGIN")).startswith(b"334")
        for r, _ in idle[:3]:
            data = await closed_with(r)
            assert data.startswith(EVICTED_421) and data.count(b"\r\n") == 1, data
        assert h.gw.connections.total == 8
        # Newcomers are greeted (each evicting the oldest idle one), AUTH and
        # relay; the exempt sessions are older than every idle one left.
        new = []
        for i in range(2):
            new.append(await greeted(port, f"192.0.2.{i + 1}"))
            writers.append(new[-1][1])
        for r, _ in idle[3:5]:
            assert (await closed_with(r)).startswith(EVICTED_421)
        for r, w in new:
            assert (await relay_one(r, w)).startswith(b"250 ")
        await sink.wait_for(2)
        # The younger idle sessions and every exempt one are still there.
        for r, w in idle[5:]:
            assert await still_open(r, w)
        assert await still_open(auth_r, auth_w)
        assert (await cmd(tx_r, tx_w, b"RCPT TO:<postmaster@gw.test>")).startswith(b"250")
        assert (await cmd(tx_r, tx_w, b"RSET")).startswith(b"250")
        assert (await cmd(busy_r, busy_w, b"YWxpY2U=")).startswith(b"334")     # "alice"
        assert (await cmd(busy_r, busy_w, b"czNjcmV0")).startswith(b"235")     # "s3cret"
        assert closed_count(h, "evicted") == 5 and closed_count(h, "preauth_timeout") == 0
        lines = [r.getMessage() for r in caplog.records if r.name == "gateway.smtp.evict"]
        assert len(lines) == 5 and all("idle unauthenticated" in m and "listener plain" in m for m in lines)
        assert [m.split("client ")[1].split(",")[0] for m in lines] == [f"203.0.113.{i % 3 + 1}" for i in range(5)]
        ended = [r for r in h.log_records() if r["event"] == "session" and r["ended"] == "evicted"]
        assert len(ended) == 5
    finally:
        for w in writers:
            w.close()


async def test_authenticated_sessions_are_never_evicted_the_cap_still_refuses(sink, gateway_factory):
    h = await gateway_factory(sink, listeners=proxy_listener(),
                              smtp={"max_connections": 4, "evict_unauthenticated_at": 0.5,
                                    "max_connections_per_ip": 10, "preauth_timeout": 60})
    await h.add_account()
    port = h.port()
    writers = []
    try:
        sessions = []
        for i in range(4):
            r, w = await greeted(port, f"198.51.100.{i + 1}")
            writers.append(w)
            assert (await cmd(r, w, AUTH)).startswith(b"235")
            sessions.append((r, w))
        reader, writer = await proxied_session(port, "192.0.2.1")
        writers.append(writer)
        refused = await closed_with(reader)
        assert refused.startswith(b"421 4.7.0 P-LOAD Too many connections, try again later"), refused
        for r, w in sessions:
            assert await still_open(r, w)
        assert closed_count(h, "evicted") == 0
    finally:
        for w in writers:
            w.close()


async def test_eviction_off_at_zero(sink, gateway_factory):
    h = await gateway_factory(sink, listeners=proxy_listener(),
                              smtp={"max_connections": 3, "evict_unauthenticated_at": 0,
                                    "max_connections_per_ip": 10, "preauth_timeout": 60})
    port = h.port()
    writers = []
    try:
        idle = []
        for i in range(3):
            r, w = await greeted(port, f"203.0.113.{i + 1}")
            writers.append(w)
            idle.append((r, w))
        reader, writer = await proxied_session(port, "192.0.2.1")
        writers.append(writer)
        assert (await closed_with(reader)).startswith(b"421 4.7.0 P-LOAD Too many connections, try again later")
        for r, w in idle:
            assert await still_open(r, w)
    finally:
        for w in writers:
            w.close()
