"""gateway/state/resp.py, the counters' pipelined Redis client, against the
machine's Redis (127.0.0.1:6379; skipped visibly without it, except under
CI=true) and through tests/faultproxy.py for a cut connection: replies
matched to their commands under concurrency, error replies, a command given
up by its caller while its reply is still to come (the connection must not
be reused), a lost connection, URL parts (db, password, scheme)."""
from __future__ import annotations

import asyncio
import secrets

import pytest

from conftest import need, tcp_reachable
from gateway.state.resp import RespClient, RespError

URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
async def prefix():
    need(tcp_reachable("127.0.0.1", 6379), "Redis is not reachable at 127.0.0.1:6379")
    p = f"gwtest:resp:{secrets.token_hex(4)}:"
    yield p
    c = RespClient(URL)
    keys = await c.execute("KEYS", f"{p}*")
    if keys:
        await c.execute("DEL", *keys)
    await c.close()


async def test_concurrent_commands_get_their_own_replies_on_one_connection(prefix):
    c = RespClient(URL)
    try:
        async with asyncio.timeout(20):
            await asyncio.gather(*(c.execute("SET", f"{prefix}{i}", i * 7) for i in range(300)))
            got = await asyncio.gather(*(c.execute("GET", f"{prefix}{i}") for i in reversed(range(300))))
        assert got == [str(i * 7).encode() for i in reversed(range(300))]
        assert c.connects == 1, "all of it pipelined on one connection"
        out = await c.execute_many([("MULTI",), ("INCRBY", f"{prefix}n", 5), ("EXPIRE", f"{prefix}n", 60),
                                    ("EXEC",)])
        assert out == [b"OK", b"QUEUED", b"QUEUED", [5, 1]]
        assert await c.execute("MGET", f"{prefix}1", f"{prefix}none", f"{prefix}n") == [b"7", None, b"5"]
    finally:
        await c.close()


async def test_an_error_reply_fails_that_command_only(prefix):
    c = RespClient(URL)
    try:
        await c.execute("SET", f"{prefix}s", "text")
        with pytest.raises(RespError, match="not an integer"):
            await c.execute("INCR", f"{prefix}s")
        with pytest.raises(RespError) as info:
            await c.execute("EVALSHA", "0" * 40, 0)
        assert info.value.noscript
        with pytest.raises(RespError):
            await c.execute_many([("GET", f"{prefix}s"), ("INCR", f"{prefix}s"), ("PING",)])
        assert await c.execute("GET", f"{prefix}s") == b"text"
        assert c.connects == 1, "an error reply leaves the connection as it is"
    finally:
        await c.close()


async def test_a_command_given_up_before_its_reply_never_hands_that_reply_to_another(prefix):
    """BLPOP on an empty list answers nil after 0.5 s; its caller gives up at
    0.1 s. Were the connection reused, the next GET would read BLPOP's nil."""
    c = RespClient(URL)
    try:
        await c.execute("SET", f"{prefix}k", "value")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await c.execute("BLPOP", f"{prefix}empty", 0.5)
        async with asyncio.timeout(5):
            assert await c.execute("GET", f"{prefix}k") == b"value"
        assert c.connects == 2, "the connection with a reply still to come was dropped"
        await asyncio.sleep(0.6)           # BLPOP's reply, had it come on a live connection
        assert await c.execute("GET", f"{prefix}k") == b"value"
    finally:
        await c.close()


async def test_a_cut_connection_fails_what_waits_and_the_next_command_connects_again(prefix, redis_proxy):
    c = RespClient(f"redis://127.0.0.1:{redis_proxy.port}/0")
    try:
        assert await c.execute("PING") == b"PONG"
        waiting = asyncio.ensure_future(c.execute("BLPOP", f"{prefix}empty", 5))
        await asyncio.sleep(0.1)
        await redis_proxy.set_mode("cut")
        with pytest.raises(ConnectionError):
            async with asyncio.timeout(5):
                await waiting
        with pytest.raises(OSError):       # the port is closed: connection refused
            async with asyncio.timeout(5):
                await c.execute("PING")
        await redis_proxy.set_mode("pass")
        async with asyncio.timeout(5):
            assert await c.execute("PING") == b"PONG"
        assert c.connects == 2
    finally:
        await c.close()


async def test_url_db_password_and_scheme(prefix):
    c = RespClient("redis://127.0.0.1:6379/3")
    plain = RespClient("redis://127.0.0.1:6379?db=3")
    zero = RespClient(URL)
    try:
        await c.execute("SET", f"{prefix}db", "three")
        assert await plain.execute("GET", f"{prefix}db") == b"three", "?db=3 is /3"
        assert await zero.execute("GET", f"{prefix}db") is None, "another database"
        await c.execute("DEL", f"{prefix}db")
    finally:
        for client in (c, plain, zero):
            await client.close()
    wrong = RespClient("redis://:not-the-password@127.0.0.1:6379/0")
    try:
        with pytest.raises(RespError, match="AUTH|password"):   # this Redis has no password
            await wrong.execute("PING")
        assert wrong._protocol is None, "a connection that failed AUTH is not kept"
    finally:
        await wrong.close()
    with pytest.raises(ValueError, match="scheme"):
        RespClient("http://127.0.0.1:6379")
