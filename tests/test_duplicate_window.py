"""The duplicate windows of before-queue relaying (docs/architecture.md,
"Duplicates by design"), each made to happen on purpose over real sockets:
the gateway counts it (gateway_duplicate_risk_total{cause}, read over HTTP
/metrics) and marks the transaction's log line ("duplicate_risk").

- client_gone: the upstream took the message, the client left before our
  250 (it will send the message again);
- upstream_timeout_after_data: the upstream never answered the final dot
  within the relay's data_timeout (the client gets 451 and retries; the
  upstream may still have taken it);
- upstream_lost_after_data: the upstream dropped the connection after the
  final dot, before its answer;
- local_kept_relay_deferred: a service mailbox kept its copy, then the
  upstream deferred the message.
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

import httpx

from conftest import MESSAGE, Sink, eventually
from smtp_client import cmd, dot_stuff, reply, session

DEADLINE = 10.0


def _counter(text: str, cause: str) -> float | None:
    prefix = f'gateway_duplicate_risk_total{{cause="{cause}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    return None


async def _metrics(h) -> str:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{h.gw.http_port}", timeout=DEADLINE) as http:
        return (await http.get("/metrics")).text


async def _send_body(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A transaction up to and including the final dot (its reply not read)."""
    reader, writer = await session(port)
    assert (await cmd(reader, writer, b"MAIL FROM:<alice@example.com>")).startswith(b"250")
    assert (await cmd(reader, writer, b"RCPT TO:<bob@example.org>")).startswith(b"250")
    assert (await cmd(reader, writer, b"DATA")).startswith(b"354")
    writer.write(dot_stuff(MESSAGE) + b".\r\n")
    await writer.drain()
    return reader, writer


class HeldSink(Sink):
    """A sink that takes the message and holds its 250 until the test says."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def handle_DATA(self, server, session, envelope):
        self.entered.set()
        await asyncio.wait_for(self.release.wait(), DEADLINE)
        return await super().handle_DATA(server, session, envelope)


async def test_client_gone_before_the_upstreams_250_is_counted(gateway_factory):
    sink = await HeldSink().start()
    try:
        h = await gateway_factory(sink, http={"enabled": True, "port": 0})
        await h.add_account()
        reader, writer = await _send_body(h.port())
        await asyncio.wait_for(sink.entered.wait(), DEADLINE)   # the upstream has the whole message
        writer.close()                                           # ... and the client leaves
        await asyncio.wait_for(writer.wait_closed(), DEADLINE)
        await eventually(lambda: h.gw.connections.total == 0, "the gateway saw the client go")
        sink.release.set()                                       # now the upstream says 250
        await sink.wait_for(1, DEADLINE)
        await eventually(lambda: any(r.get("event") == "transaction" for r in h.log_records()),
                         "the transaction's log line")
        (record,) = [r for r in h.log_records() if r.get("event") == "transaction"]
        assert record["duplicate_risk"] == "client_gone"
        assert record["decision"] == "relayed" and record["reply"].startswith("250 ")
        assert {"check": "relay", "result": "pass"}.items() <= next(
            o for o in record["ledger"] if o["check"] == "relay").items()
        assert _counter(await _metrics(h), "client_gone") == 1.0
        assert _counter(await _metrics(h), "upstream_timeout_after_data") == 0.0
        assert len(sink.messages) == 1
        relay = h.gw.relay
        await eventually(lambda: relay.open == 1 and len(relay.upstreams[0].idle) == 1,
                         "the connection is back in the pool, in its one slot")
    finally:
        await sink.stop()


class FakeUpstream:
    """Just enough SMTP server on loopback for the gateway's relay: it takes
    MAIL, RCPT and the message, then does ``after_dot`` instead of answering."""

    def __init__(self, after_dot: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
                 release_354: asyncio.Event | None = None):
        self.after_dot = after_dot
        self.release_354 = release_354     # set: DATA waits for it before its 354
        self.data_commands = asyncio.Event()
        self.hung_up = asyncio.Event()
        self.bodies: list[bytes] = []
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> "FakeUpstream":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        for w in self._writers:
            w.close()
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        writer.write(b"220 fake.test ESMTP\r\n")
        for _ in range(50):                       # bounded: a relay needs a handful of commands
            line = await asyncio.wait_for(reader.readline(), DEADLINE)
            if not line:
                self.hung_up.set()
                return
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-fake.test\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n")
            elif verb == b"DATA":
                self.data_commands.set()
                if self.release_354 is not None:
                    await asyncio.wait_for(self.release_354.wait(), DEADLINE)
                    if reader.at_eof():
                        self.hung_up.set()
                        return
                writer.write(b"354 go ahead\r\n")
                await writer.drain()
                self.bodies.append(await asyncio.wait_for(reader.readuntil(b"\r\n.\r\n"), DEADLINE))
                await self.after_dot(reader, writer)
                return
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                writer.close()
                return
            else:                                 # MAIL, RCPT, RSET, NOOP
                writer.write(b"250 ok\r\n")
            await writer.drain()


async def _silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await asyncio.wait_for(reader.read(), DEADLINE)   # never answers the final dot; ends when the gateway hangs up


async def _drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


async def _after_dot_case(gateway_factory, after_dot, cause: str) -> dict:
    up = await FakeUpstream(after_dot).start()
    try:
        h = await gateway_factory(None, http={"enabled": True, "port": 0},
                                  relay={"upstreams": [{"host": "127.0.0.1", "port": up.port,
                                                        "connect_timeout": 2.0, "command_timeout": 2.0,
                                                        "data_timeout": 0.5}]})
        await h.add_account()
        reader, writer = await _send_body(h.port())
        try:
            answer = await reply(reader)
        finally:
            writer.close()
        assert answer.startswith(b"451 4.4.1 "), answer          # deferred: the client keeps the message
        assert len(up.bodies) == 1                               # ... which the upstream may have taken
        await eventually(lambda: any(r.get("event") == "transaction" for r in h.log_records()),
                         "the transaction's log line")
        (record,) = [r for r in h.log_records() if r.get("event") == "transaction"]
        assert record["duplicate_risk"] == cause
        assert record["decision"] == "deferred"
        text = await _metrics(h)
        assert _counter(text, cause) == 1.0
        assert _counter(text, "client_gone") == 0.0
        await eventually(lambda: h.gw.relay.open == 0, "the broken connection's slot is given back")
        return record
    finally:
        await up.stop()


async def test_an_upstream_silent_after_the_final_dot_is_counted(gateway_factory):
    await _after_dot_case(gateway_factory, _silent, "upstream_timeout_after_data")


async def test_an_upstream_lost_after_the_final_dot_is_counted(gateway_factory):
    await _after_dot_case(gateway_factory, _drop, "upstream_lost_after_data")


async def test_a_relay_deferral_after_a_local_copy_is_counted(sink, gateway_factory, tmp_path):
    """A service mailbox kept its copy, then the upstream deferred the message:
    the client's retry reaches the mailbox again (the only mixed outcome of
    one transaction: list mail takes one recipient per transaction)."""
    box = tmp_path / "svc"
    h = await gateway_factory(sink, http={"enabled": True, "port": 0},
                              smtp={"service_mailboxes": ["postmaster@gw.test"], "service_maildir": str(box)})
    await h.add_account()
    sink.data_reply = "451 4.3.0 try again later"
    reader, writer = await session(h.port())
    try:
        assert (await cmd(reader, writer, b"MAIL FROM:<alice@example.com>")).startswith(b"250")
        assert (await cmd(reader, writer, b"RCPT TO:<postmaster@gw.test>")).startswith(b"250")
        assert (await cmd(reader, writer, b"RCPT TO:<bob@example.org>")).startswith(b"250")
        assert (await cmd(reader, writer, b"DATA")).startswith(b"354")
        writer.write(dot_stuff(MESSAGE) + b".\r\n")
        await writer.drain()
        assert (await reply(reader)).startswith(b"451 4.3.0 ")
    finally:
        writer.close()
    from gateway.relay.maildir import MaildirWriter
    assert len(MaildirWriter(box).keys()) == 1
    await eventually(lambda: any(r.get("event") == "transaction" for r in h.log_records()),
                     "the transaction's log line")
    (record,) = [r for r in h.log_records() if r.get("event") == "transaction"]
    assert record["duplicate_risk"] == "local_kept_relay_deferred"
    assert _counter(await _metrics(h), "local_kept_relay_deferred") == 1.0


async def test_a_client_gone_before_the_final_dot_went_upstream_stops_the_handover(gateway_factory):
    """The other side of running a handover to its end: while no final dot
    went upstream, a client that leaves stops it as before (nothing relayed,
    no window, "aborted")."""
    release = asyncio.Event()
    up = await FakeUpstream(_drop, release_354=release).start()
    try:
        h = await gateway_factory(None, http={"enabled": True, "port": 0},
                                  relay={"upstreams": [{"host": "127.0.0.1", "port": up.port,
                                                        "connect_timeout": 2.0, "command_timeout": 2.0}]})
        await h.add_account()
        reader, writer = await _send_body(h.port())
        await asyncio.wait_for(up.data_commands.wait(), DEADLINE)   # the upstream has DATA, not the message
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), DEADLINE)
        await eventually(lambda: any(r.get("event") == "transaction" for r in h.log_records()),
                         "the transaction's log line")
        release.set()
        await asyncio.wait_for(up.hung_up.wait(), DEADLINE)          # the gateway gave the upstream up
        (record,) = [r for r in h.log_records() if r.get("event") == "transaction"]
        assert record["decision"] == "aborted" and "duplicate_risk" not in record
        assert up.bodies == []
        text = await _metrics(h)
        assert all(_counter(text, cause) == 0.0 for cause in ("client_gone", "upstream_timeout_after_data",
                                                            "upstream_lost_after_data"))
        await eventually(lambda: h.gw.relay.open == 0, "the mid-DATA connection's slot is given back")
    finally:
        await up.stop()
