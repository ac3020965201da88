"""The total bound on upstream connections ([relay] max_connections,
relay/pool.py) over real sockets (issue 11, point 2): clients holding open
transactions never make the pool open more than the bound; a transaction
past it waits, first come first served, and gets its RCPT answer once a
connection is released, or 451 4.4.5 after [relay] connection_wait; a
waiting client that leaves takes no slot; an idle connection to another
upstream is closed to make room; and one session never holds more than one
upstream connection, whatever its recipients.

Every wait has a deadline (smtp_client.TIMEOUT, eventually()); nothing is
timed."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import httpx
import pytest
from aiosmtpd.smtp import SMTP as AioSMTP

from conftest import MESSAGE, Sink, eventually
from smtp_client import TIMEOUT, cmd, dot_stuff, reply, session


@dataclass
class CountingSink(Sink):
    """The conftest sink that also counts the connections open at once
    (``live``) and the most there ever were (``peak``); with ``mail_reply``
    set it answers MAIL with it (an upstream that defers every sender)."""
    live: int = 0
    peak: int = 0
    mail_reply: str | None = None
    rcpt_gate: asyncio.Event | None = None     # set: RCPT is answered once the event is set
    rcpt_waiting: int = 0

    async def handle_MAIL(self, server, session, envelope, address, options):
        if self.mail_reply:
            return self.mail_reply
        return await super().handle_MAIL(server, session, envelope, address, options)

    async def handle_RCPT(self, server, session, envelope, address, options):
        gate = self.rcpt_gate
        if gate is not None:
            self.rcpt_waiting += 1
            await asyncio.wait_for(gate.wait(), TIMEOUT)
        return await super().handle_RCPT(server, session, envelope, address, options)

    async def start(self) -> "CountingSink":
        loop = asyncio.get_running_loop()
        outer = self

        class Counted(AioSMTP):
            def connection_made(self, transport):
                outer.live += 1
                outer.peak = max(outer.peak, outer.live)
                super().connection_made(transport)

            def connection_lost(self, exc):
                outer.live -= 1
                super().connection_lost(exc)

        def factory():
            self.connections += 1
            return Counted(self, hostname="sink.test", enable_SMTPUTF8=True, data_size_limit=None, loop=loop)

        self.server = await loop.create_server(factory, self.host, self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self


@pytest.fixture
async def counting_sink():
    s = await CountingSink().start()
    yield s
    await s.stop()


@pytest.fixture
async def second_sink():
    s = await CountingSink().start()
    yield s
    await s.stop()


def message(i: int) -> bytes:
    return MESSAGE.replace(b"<test-1@example.com>", f"<limit-{i}@example.com>".encode())


class Client:
    """One raw SMTP session, authenticated as alice."""

    def __init__(self, reader, writer, i: int):
        self.reader, self.writer, self.i = reader, writer, i

    @classmethod
    async def open(cls, port: int, i: int) -> "Client":
        reader, writer = await session(port)
        return cls(reader, writer, i)

    async def mail(self) -> None:
        assert (await cmd(self.reader, self.writer, b"MAIL FROM:<alice@example.com>")).startswith(b"250")

    def rcpt_later(self, rcpt: str = "bob@example.org") -> asyncio.Task:
        """Send RCPT; the task that reads its reply (the test decides when it must be done)."""
        self.writer.write(f"RCPT TO:<{rcpt}>\r\n".encode())
        return asyncio.get_running_loop().create_task(reply(self.reader))

    async def rcpt(self, rcpt: str = "bob@example.org") -> bytes:
        return await self.rcpt_later(rcpt)

    async def data(self) -> bytes:
        assert (await cmd(self.reader, self.writer, b"DATA")).startswith(b"354")
        self.writer.write(dot_stuff(message(self.i)) + b".\r\n")
        await self.writer.drain()
        return await reply(self.reader)

    async def quit(self) -> None:
        await cmd(self.reader, self.writer, b"QUIT")
        self.writer.close()


async def _gateway(gateway_factory, sinks, http: bool = False, **relay):
    upstreams = [{"host": "127.0.0.1", "port": s.port, "connect_timeout": 2.0, "command_timeout": 5.0}
                 for s in sinks]
    h = await gateway_factory(sinks[0], relay={"upstreams": upstreams, **relay},
                              smtp={"max_recipients": 10}, http={"enabled": http, "port": 0})
    await h.add_account()
    return h


def _msgids(sink) -> list[bytes]:
    out = []
    for m in sink.messages:
        for line in m.data.split(b"\r\n"):
            if line.lower().startswith(b"message-id:"):
                out.append(line.split(b":", 1)[1].strip())
    return out


async def test_five_clients_share_three_connections_waiters_served_in_order(counting_sink, gateway_factory):
    """max_connections = 3, five clients each holding MAIL+RCPT: the sink
    never sees more than 3 connections; the 4th and 5th RCPT wait and are
    answered, in their order, when a connection is released (one client's
    DATA ends, another QUITs mid-transaction); every message that got 250
    arrives exactly once."""
    sink = counting_sink
    h = await _gateway(gateway_factory, [sink], max_connections=3, connection_wait=30.0)
    relay = h.gw.relay
    clients = [await Client.open(h.port(), i) for i in range(5)]
    try:
        for c in clients:
            await c.mail()
        for c in clients[:3]:
            assert (await c.rcpt()).startswith(b"250"), c.i
        assert relay.open == 3 and sink.live == 3
        fourth = clients[3].rcpt_later()
        await eventually(lambda: relay.waiting == 1, "the 4th RCPT waits for a connection")
        fifth = clients[4].rcpt_later()
        await eventually(lambda: relay.waiting == 2, "the 5th RCPT waits behind it")
        assert not fourth.done() and not fifth.done()
        assert sink.live == 3 and relay.open == 3

        # client 0 finishes: its connection goes to the first waiter (client 3), not to client 4
        assert (await clients[0].data()).startswith(b"250 2.0.0 OK: relayed")
        assert (await asyncio.wait_for(fourth, TIMEOUT)).startswith(b"250"), "the 4th got the released connection"
        assert relay.waiting == 1 and not fifth.done()
        # client 1 leaves mid-transaction: RSET upstream, its connection goes to client 4
        await clients[1].quit()
        assert (await asyncio.wait_for(fifth, TIMEOUT)).startswith(b"250"), "the 5th got the next one"
        assert relay.waiting == 0

        for c in clients[2:]:
            assert (await c.data()).startswith(b"250 2.0.0 OK: relayed"), c.i
        for c in (clients[0], *clients[2:]):
            await c.quit()
    finally:
        for c in clients:
            c.writer.close()
    await sink.wait_for(4)
    ids = _msgids(sink)
    assert sorted(ids) == sorted(f"<limit-{i}@example.com>".encode() for i in (0, 2, 3, 4)), ids
    assert sink.peak <= 3, f"the sink saw {sink.peak} upstream connections at once"
    assert sink.connections == 3, "the waiters were given the released connections, none was opened anew"
    assert relay.stats["connection_waits"] == 2 and relay.stats["connection_busy"] == 0
    assert relay.open <= 3


async def test_nobody_releases_the_waiter_gets_451_4_4_5(counting_sink, gateway_factory):
    """max_connections = 1 held by one client: another client's RCPT gets
    451 4.4.5 (P-LOAD) after connection_wait, its transaction stays open,
    and once the connection is free the same client's next RCPT is taken."""
    sink = counting_sink
    h = await _gateway(gateway_factory, [sink], http=True, max_connections=1, connection_wait=0.3)
    relay = h.gw.relay
    holder, late = await Client.open(h.port(), 0), await Client.open(h.port(), 1)
    try:
        await holder.mail()
        assert (await holder.rcpt()).startswith(b"250")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{h.gw.http_port}", timeout=TIMEOUT) as web:
            r = await web.get("/readyz")
        assert r.status_code == 200, r.text        # a full pool defers; the gateway is not unready
        assert r.json()["upstream_connections"] == {"open": 1, "max": 1, "waiting": 0}, r.json()
        await late.mail()
        answer = await late.rcpt()
        assert answer == b"451 4.4.5 P-LOAD Upstream connections busy, try again later\r\n", answer
        assert relay.stats["connection_busy"] == 1 and relay.waiting == 0
        assert sink.peak == 1

        assert (await holder.data()).startswith(b"250 2.0.0 OK: relayed")
        assert (await late.rcpt()).startswith(b"250"), "the freed connection serves the deferred client"
        assert (await late.data()).startswith(b"250 2.0.0 OK: relayed")
        await holder.quit()
        await late.quit()
    finally:
        holder.writer.close()
        late.writer.close()
    await sink.wait_for(2)
    assert sorted(_msgids(sink)) == [b"<limit-0@example.com>", b"<limit-1@example.com>"]
    assert sink.peak == 1

    metrics = h.gw.metrics.render().decode()
    assert 'gateway_upstream_connections_total{event="connection_busy"} 1.0' in metrics, metrics
    assert 'gateway_upstream_connections_total{event="connection_waits"} 1.0' in metrics
    assert "gateway_upstream_connections_max 1.0" in metrics
    await eventually(lambda: any(r.get("decision") == "relayed" for r in h.log_records()), "the log line")
    busy = [o for r in h.log_records() for o in r.get("ledger", []) if o["check"] == "upstream_busy"]
    assert len(busy) == 1 and busy[0]["result"] == "error", busy


async def test_a_waiting_client_that_leaves_takes_no_slot(counting_sink, gateway_factory):
    """A client waiting for a connection disconnects: it leaves the queue,
    and the connection released later goes to the client waiting behind it."""
    sink = counting_sink
    h = await _gateway(gateway_factory, [sink], max_connections=1, connection_wait=30.0)
    relay = h.gw.relay
    holder, gone, next_ = [await Client.open(h.port(), i) for i in range(3)]
    try:
        for c in (holder, gone, next_):
            await c.mail()
        assert (await holder.rcpt()).startswith(b"250")
        waiting = gone.rcpt_later()
        await eventually(lambda: relay.waiting == 1, "the second client waits")
        gone.writer.close()
        await eventually(lambda: relay.waiting == 0, "the client that left is out of the queue")
        waiting.cancel()       # its reader: the connection is closed, no reply will come
        third = next_.rcpt_later()
        await eventually(lambda: relay.waiting == 1, "the third client waits")
        await holder.quit()
        assert (await asyncio.wait_for(third, TIMEOUT)).startswith(b"250"), "the slot went to the client still there"
        assert (await next_.data()).startswith(b"250 2.0.0 OK: relayed")
        await next_.quit()
    finally:
        for c in (holder, gone, next_):
            c.writer.close()
    await sink.wait_for(1)
    assert _msgids(sink) == [b"<limit-2@example.com>"]
    assert sink.peak == 1 and relay.open <= 1


async def test_idle_connection_to_another_upstream_makes_room(counting_sink, second_sink, gateway_factory):
    """max_connections = 1 and two upstreams: a connection needed for one
    closes the idle connection to the other instead of waiting."""
    first, second = counting_sink, second_sink
    first.mail_reply = "451 4.3.0 Try the other one"
    h = await _gateway(gateway_factory, [first, second], max_connections=1, connection_wait=30.0)
    relay = h.gw.relay
    c = await Client.open(h.port(), 0)
    try:
        # the first upstream defers the sender: its connection goes idle, and the
        # second upstream's connection takes its slot
        await c.mail()
        assert (await c.rcpt()).startswith(b"250")
        assert relay.stats["idle_evicted"] == 1 and relay.open == 1
        assert (await c.data()).startswith(b"250 2.0.0 OK: relayed")
        await second.wait_for(1)
        await eventually(lambda: first.live == 0, "the first upstream's idle connection was closed")

        # now the first upstream takes mail again: the idle connection to the second makes room
        first.mail_reply = None
        c.i = 1
        await c.mail()
        assert (await c.rcpt()).startswith(b"250")
        assert relay.stats["idle_evicted"] == 2 and relay.open == 1
        assert relay.stats["connection_waits"] == 0, "nobody waited: an idle connection made room"
        assert (await c.data()).startswith(b"250 2.0.0 OK: relayed")
        await first.wait_for(1)
        await eventually(lambda: second.live == 0, "the second upstream's idle connection was closed")
        await c.quit()
    finally:
        c.writer.close()
    assert _msgids(second) == [b"<limit-0@example.com>"] and _msgids(first) == [b"<limit-1@example.com>"]


async def test_one_session_holds_at_most_one_upstream_connection(counting_sink, gateway_factory):
    """The per-session bound, by construction (delivery/handover.py): a
    session has one transaction at a time; a client transaction opens one
    upstream transaction at its first relayed RCPT and shares it with every
    later recipient (an SRS bounce's decoded RCPT goes into the same one:
    the SRS test below), and list mail takes one list recipient per
    transaction (test_listmail_smtp's one-recipient test; a cancelled one is
    given back: the mid-RCPT test above). So: at most one upstream
    connection per session. With max_connections = 1 and no
    wait, a second connection for the session would be deferred at once:
    none is, through recipients, RSET, a new MAIL and a finished DATA."""
    sink = counting_sink
    h = await _gateway(gateway_factory, [sink], max_connections=1, connection_wait=0.0)
    relay = h.gw.relay
    c = await Client.open(h.port(), 0)
    try:
        await c.mail()
        for i in range(6):
            assert (await c.rcpt(f"bob{i}@example.org")).startswith(b"250"), i
        assert relay.open == 1
        assert (await cmd(c.reader, c.writer, b"RSET")).startswith(b"250")
        await c.mail()
        assert (await c.rcpt("carol@example.org")).startswith(b"250")
        assert (await c.data()).startswith(b"250 2.0.0 OK: relayed")
        for i in (1, 2):
            c.i = i
            await c.mail()
            for r in ("dave@example.org", "erin@example.org", "frank@example.org"):
                assert (await c.rcpt(r)).startswith(b"250"), r
            assert (await c.data()).startswith(b"250 2.0.0 OK: relayed")
        await c.quit()
    finally:
        c.writer.close()
    await sink.wait_for(3)
    assert relay.stats["connection_busy"] == 0 and relay.stats["connection_waits"] == 0
    assert sink.peak == 1 and sink.connections == 1
    assert [len(m.rcpt_tos) for m in sink.messages] == [1, 3, 3]


async def test_config_refuses_bad_bounds(tmp_path):
    from gateway.config import ConfigError, from_mapping

    from conftest import base_config

    for relay, key, words in (({"max_connections": 0}, "relay.max_connections", "1..100000"),
                              ({"connection_wait": -1.0}, "relay.connection_wait", "0..60"),
                              ({"connection_wait": 61.0}, "relay.connection_wait", "0..60")):
        with pytest.raises(ConfigError) as err:
            from_mapping(base_config(tmp_path, None, relay=relay), "gw.toml")
        assert err.value.source == "gw.toml" and err.value.key == key and words in err.value.problem, err.value
    with pytest.raises(ConfigError) as err:
        from_mapping(base_config(tmp_path, None, relay={"connection_wait": 10.0}, smtp={"command_timeout": 10.0}),
                     "gw.toml")
    assert err.value.key == "relay.connection_wait" and "smtp.command_timeout" in err.value.problem, err.value


async def test_a_slot_handed_to_a_waiter_cancelled_that_turn_goes_on(counting_sink, gateway_factory):
    """The race the queue must survive: a released connection is handed to
    the first waiter, and that waiter is cancelled (its client gone) in the
    same loop turn, before it runs. The connection goes on to the next
    waiter; no slot is lost."""
    sink = counting_sink
    h = await _gateway(gateway_factory, [sink], max_connections=1, connection_wait=30.0)
    relay = h.gw.relay

    def begin():
        return asyncio.get_running_loop().create_task(
            relay.begin("alice@example.com", [], utf8=False, eight_bit=False, size=None))

    holder, reply_ = await relay.begin("alice@example.com", [], utf8=False, eight_bit=False, size=None)
    assert holder is not None and reply_.is_positive
    first = begin()
    await eventually(lambda: relay.waiting == 1, "the first waiter is in line")
    second = begin()
    await eventually(lambda: relay.waiting == 2, "the second waiter is behind it")

    conn = holder._conn
    assert (await conn.smtp.execute_command(b"RSET")).code == 250   # what holder.close() does first
    holder._closed = True                       # then released here by hand, in this very turn:
    relay._release(conn, reusable=True)         # handed to the first waiter ...
    first.cancel()                              # ... which is cancelled before it runs
    utx, answer = await asyncio.wait_for(second, TIMEOUT)
    assert utx is not None and answer.is_positive, answer
    with pytest.raises(asyncio.CancelledError):
        await first
    assert relay.open == 1 and relay.waiting == 0 and sink.peak == 1
    await utx.close()
    assert relay.open == 1 and len(relay.upstreams[0].idle) == 1


async def test_list_recipient_whose_client_leaves_mid_rcpt_gives_its_connection_back(counting_sink,
                                                                                       gateway_factory):
    """List mail: the client leaves while its list recipient's RCPT is at the
    upstream. That upstream transaction is released with the session (it
    was held nowhere before and its connection leaked), so with
    max_connections = 1 the next list transaction gets its connection."""
    from test_listmail_smtp import _confirmed, _list_message, _start

    sink = counting_sink
    h, _base = await _start(gateway_factory, sink, relay={"max_connections": 1, "connection_wait": 2.0})
    relay = h.gw.relay
    lst = await h.gw.registry.create_list("alice", name="News", list_id="news.example.com",
                                          senders=["news@example.com"], confirm_from="confirm@example.com")
    await _confirmed(h, sink, lst.id, ["reader0@example.org", "reader1@example.org"])
    start = len(sink.messages)

    sink.rcpt_gate = gate = asyncio.Event()
    reader, writer = await session(h.port())
    try:
        assert (await cmd(reader, writer, b"MAIL FROM:<news@example.com>")).startswith(b"250")
        writer.write(b"RCPT TO:<reader0@example.org>\r\n")
        await writer.drain()
        await eventually(lambda: sink.rcpt_waiting == 1, "the list recipient's RCPT is at the upstream")
    finally:
        writer.close()
    await eventually(lambda: not h.gw.sessions, "the gateway saw the client leave")
    sink.rcpt_gate = None
    gate.set()

    reader, writer = await session(h.port())
    try:
        assert (await cmd(reader, writer, b"MAIL FROM:<news@example.com>")).startswith(b"250")
        answer = await cmd(reader, writer, b"RCPT TO:<reader1@example.org>")
        assert answer.startswith(b"250"), answer
        assert (await cmd(reader, writer, b"DATA")).startswith(b"354")
        writer.write(_list_message() + b".\r\n")
        await writer.drain()
        assert (await reply(reader)).startswith(b"250 2.0.0 OK: relayed")
        await cmd(reader, writer, b"QUIT")
    finally:
        writer.close()
    await sink.wait_for(start + 1)
    assert [m.rcpt_tos for m in sink.messages[start:]] == [["reader1@example.org"]]
    assert relay.stats["connection_busy"] == 0 and relay.open <= 1


async def test_srs_bounce_recipients_share_the_one_upstream_transaction(counting_sink, gateway_factory):
    """Forwarded mail (SRS0 envelope sender) and a bounce to two SRS
    addresses in one transaction: each RCPT is decoded to its original
    sender and goes into the transaction's one upstream transaction, so
    max_connections = 1 without any wait serves it."""
    from smtp_client import send
    from test_forwarding import bounce, dsn_message, forwarding_gateway, third_party_message

    sink = counting_sink
    h = await forwarding_gateway(gateway_factory, sink, relay={"max_connections": 1, "connection_wait": 0.0})
    for sender in ("news@example.org", "info@example.net"):
        r = await send(h.port(), third_party_message(), mail_from=sender, rcpt="someone@gmail.example",
                       auth=True)
        assert r.startswith(b"250"), r
    await sink.wait_for(2)
    srs_addrs = [m.mail_from for m in sink.messages]
    assert all("SRS0=" in a for a in srs_addrs), srs_addrs
    answers = await bounce(h.port(), srs_addrs, data=dsn_message())
    assert all(a.startswith(b"250") for a in answers[:3]), answers
    assert answers[3].startswith(b"250 2.0.0 OK: relayed"), answers
    await sink.wait_for(3)
    assert sorted(sink.messages[2].rcpt_tos) == ["info@example.net", "news@example.org"]
    assert h.gw.relay.stats["connection_busy"] == 0 and sink.peak == 1
