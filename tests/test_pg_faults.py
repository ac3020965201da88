"""PostgreSQL cut off or black-holed (issue 11, point 3): every SMTP command
is answered within its deadline, and plain relay by an authenticated session
needs no database once the account is loaded.

The database sits behind tests/faultproxy.py (the machine's own PostgreSQL is
never stopped): ``blackhole`` accepts TCP and never answers, as a hung
server or a dropped route does; ``cut`` refuses connections."""
from __future__ import annotations

import asyncio
import time

import pytest
from sqlalchemy.engine import make_url

from conftest import MESSAGE, PG_HOST, PG_PORT
from faultproxy import FaultProxy
from smtp_client import cmd, dot_stuff, reply, session

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def pg_proxy(pg_url):
    proxy = await FaultProxy(PG_HOST if PG_HOST != "localhost" else "127.0.0.1", PG_PORT).start()
    url = make_url(pg_url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    yield proxy, url
    await proxy.stop()


async def timed(coro) -> tuple[bytes, float]:
    t = time.monotonic()
    r = await asyncio.wait_for(coro, 60)
    return r, time.monotonic() - t


async def test_probe(gateway_factory, sink, pg_proxy):
    proxy, url = pg_proxy
    h = await gateway_factory(sink, storage={"url": url})
    await h.add_account()
    reader, writer = await session(h.port())
    await proxy.set_mode("blackhole")
    for line in (b"MAIL FROM:<alice@example.com>", b"RCPT TO:<bob@example.org>", b"DATA"):
        r, dt = await timed(cmd(reader, writer, line))
        print(line, r, round(dt, 2))
    writer.write(dot_stuff(MESSAGE) + b".\r\n")
    r, dt = await timed(reply(reader))
    print("end of data", r, round(dt, 2))
    t = time.monotonic()
    try:
        r2, w2 = await asyncio.wait_for(session(h.port()), 90)
        print("new session with AUTH ok", round(time.monotonic() - t, 2))
    except Exception as exc:
        print("new session AUTH", repr(exc), round(time.monotonic() - t, 2))
