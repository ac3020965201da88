"""Hostile bytes from a client (issue 11, points 1 and 5), over real SMTP.

- a non-UTF-8 byte in EHLO or in a refused RCPT: the transaction log still
  writes its line (the byte shown as ``\\xNN``), the client gets 250 once and
  the upstream holds exactly one copy (before: the log raised between the
  upstream's 250 and the client's reply, the client got 451 and retried);
- aborted transactions in such a session give their upstream connections
  back (before: 20 aborts held 20 connections);
- the client's reply goes out before the bookkeeping of its transaction;
- an AUTH continuation line over the line limit: one 500 5.5.6, and the
  session goes on (before: 451 and a second reply to the same line);
- a non-ASCII initial response to AUTH PLAIN / LOGIN: 501 5.5.2 (before:
  451, a ValueError);
- a bare CR inside a command line: 500 5.5.2, nothing of the line is kept
  (before: ``EHLO x<CR>AUTH PLAIN ...`` was stored as the HELO name).
"""
from __future__ import annotations

import asyncio
import base64
import socket

from conftest import MESSAGE, eventually
from gateway.core.events import TransactionEnded
from smtp_client import AUTH, cmd, raw_session, reply, session


async def send_data(reader, writer, message: bytes = MESSAGE) -> bytes:
    assert (await cmd(reader, writer, b"DATA")).startswith(b"354")
    writer.write(message + b".\r\n")
    await writer.drain()
    return await reply(reader)


async def one_copy_and_its_line(sink, h) -> dict:
    """Exactly one copy at the upstream (a late second one would show within 0.2 s), and the transaction line."""
    await sink.wait_for(1)
    await asyncio.sleep(0.2)
    assert len(sink.messages) == 1
    await eventually(lambda: any(r["event"] == "transaction" for r in h.log_records()), "the transaction line")
    return next(r for r in h.log_records() if r["event"] == "transaction")


async def test_non_utf8_helo_relays_once_and_is_logged(sink, gateway_factory):
    h = await gateway_factory(sink)
    await h.add_account()
    reader, writer, _ = await raw_session(h.port())
    try:
        assert (await cmd(reader, writer, b"EHLO bad\xff\xfehost.test")).startswith(b"250")
        assert (await cmd(reader, writer, AUTH)).startswith(b"235")
        assert (await cmd(reader, writer, b"MAIL FROM:<alice@example.com>")).startswith(b"250")
        assert (await cmd(reader, writer, b"RCPT TO:<bob@example.org>")).startswith(b"250")
        final = await send_data(reader, writer)
        assert final.startswith(b"250 "), final
        assert (await cmd(reader, writer, b"QUIT")).startswith(b"221")
    finally:
        writer.close()
    line = await one_copy_and_its_line(sink, h)
    assert line["decision"] == "relayed"
    assert line["helo"] == "bad\\xff\\xfehost.test"


async def test_refused_8bit_rcpt_is_logged_and_the_message_relayed_once(sink, gateway_factory):
    h = await gateway_factory(sink)
    await h.add_account()
    reader, writer = await session(h.port())
    try:
        assert (await cmd(reader, writer, b"MAIL FROM:<alice@example.com>")).startswith(b"250")
        refused = await cmd(reader, writer, b"RCPT TO:<b\xe9b@example.org>")     # Latin-1, no SMTPUTF8
        assert refused[:1] == b"5", refused
        assert (await cmd(reader, writer, b"RCPT TO:<bob@example.org>")).startswith(b"250")
        assert (await send_data(reader, writer)).startswith(b"250 ")
    finally:
        writer.close()
    assert (await one_copy_and_its_line(sink, h))["decision"] == "relayed"
    raw = h.log_path.read_bytes()
    raw.decode("utf-8")                         # the whole file is valid UTF-8
    assert b"b\\\\xe9b@example.org" in raw      # the client's byte, as text


async def test_aborted_transactions_with_hostile_bytes_give_back_their_upstream_connections(sink, gateway_factory):
    h = await gateway_factory(sink)
    await h.add_account()
    for i in range(20):
        reader, writer, _ = await raw_session(h.port())
        assert (await cmd(reader, writer, b"EHLO h\xff%d.test" % i)).startswith(b"250")
        assert (await cmd(reader, writer, AUTH)).startswith(b"235")
        assert (await cmd(reader, writer, b"MAIL FROM:<alice@example.com>")).startswith(b"250")
        assert (await cmd(reader, writer, b"RCPT TO:<bob@example.org>")).startswith(b"250")
        writer.close()                          # gone mid-transaction: aborted
        await writer.wait_closed()
        await eventually(lambda: not h.gw.sessions, "the session to end")
    # Each abort gave its connection back, reset, to the pool: the next session reused it.
    idle = sum(len(up.idle) for up in h.gw.relay.upstreams)
    assert sink.connections <= 2 and idle >= 1, (sink.connections, idle)
    await eventually(lambda: sum(r["event"] == "transaction" and r["decision"] == "aborted"
                                 for r in h.log_records()) == 20, "20 aborted transaction lines")
    assert sink.messages == []


async def test_the_client_hears_the_reply_before_the_bookkeeping(sink, gateway_factory):
    h = await gateway_factory(sink)
    await h.add_account()
    loop = asyncio.get_running_loop()
    sock = socket.create_connection(("127.0.0.1", h.port()), timeout=5)
    sock.setblocking(False)
    seen_at_end: list[bytes] = []

    def on_ended(event: TransactionEnded) -> None:
        # What the client's socket holds when the transaction's bookkeeping runs.
        try:
            seen_at_end.append(sock.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except BlockingIOError:
            seen_at_end.append(b"")

    h.gw.events.subscribe(TransactionEnded, on_ended)

    async def exchange(data: bytes, expect: bytes) -> bytes:
        await loop.sock_sendall(sock, data)
        got = b""
        for _ in range(100):                     # bounded: a reply is a few segments at most
            if got.endswith(b"\r\n") and got.splitlines()[-1][3:4] == b" ":
                break                            # the last line of a complete reply
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), 10)
            assert chunk, got
            got += chunk
        assert got.startswith(expect), got
        return got

    try:
        await exchange(b"", b"220")
        await exchange(b"EHLO client.test\r\n", b"250")
        await exchange(AUTH + b"\r\n", b"235")
        await exchange(b"MAIL FROM:<alice@example.com>\r\n", b"250")
        await exchange(b"RCPT TO:<bob@example.org>\r\n", b"250")
        await exchange(b"DATA\r\n", b"354")
        await exchange(MESSAGE + b".\r\n", b"250 ")
    finally:
        sock.close()
    assert len(seen_at_end) == 1 and seen_at_end[0].startswith(b"250 "), seen_at_end


async def test_auth_continuation_line_over_the_limit_gets_one_reply(sink, gateway_factory):
    h = await gateway_factory(sink)
    await h.add_account()
    reader, writer, _ = await raw_session(h.port())
    try:
        await cmd(reader, writer, b"EHLO client.test")
        assert (await cmd(reader, writer, b"AUTH LOGIN")).startswith(b"334 ")
        answer = await cmd(reader, writer, b"A" * 5000)
        assert answer.startswith(b"500 5.5.6 "), answer
        # exactly one reply for the line: the next command gets its own answer
        assert (await cmd(reader, writer, b"NOOP")).startswith(b"250 ")
        assert (await cmd(reader, writer, AUTH)).startswith(b"235")
    finally:
        writer.close()


async def test_non_ascii_auth_initial_responses_get_501(sink, gateway_factory):
    h = await gateway_factory(sink)
    await h.add_account()
    reader, writer, _ = await raw_session(h.port())
    try:
        await cmd(reader, writer, b"EHLO client.test")
        for line in ("AUTH PLAIN AGFsaWNl\u00e9".encode(), b"AUTH LOGIN \xff\xfe\xfd",
                     "AUTH PLAIN \u00e4\u00f6\u00fc=".encode()):
            answer = await cmd(reader, writer, line)
            assert answer.startswith(b"501 5.5.2 "), (line, answer)
        assert (await cmd(reader, writer, b"AUTH PLAIN " + base64.b64encode(b"\0alice\0s3cret"))).startswith(b"235")
    finally:
        writer.close()
    records = h.log_records()
    assert not any(b"Temporary internal error" in str(r).encode() for r in records)


async def test_bare_cr_inside_a_command_line_is_refused(sink, gateway_factory):
    h = await gateway_factory(sink)
    await h.add_account()
    reader, writer, _ = await raw_session(h.port())
    try:
        answer = await cmd(reader, writer, b"EHLO x\r" + AUTH)
        assert answer.startswith(b"500 5.5.2 ") and b"Bare CR" in answer, answer
        # nothing of the line was kept: no HELO, no AUTH
        assert (await cmd(reader, writer, b"MAIL FROM:<alice@example.com>")).startswith(b"503 5.5.1")
        assert (await cmd(reader, writer, b"NOOP\rNOOP")).startswith(b"500 5.5.2 ")
        assert (await cmd(reader, writer, b"EHLO client.test")).startswith(b"250")
        assert (await cmd(reader, writer, AUTH)).startswith(b"235")    # not 503 "already authenticated"
    finally:
        writer.close()
