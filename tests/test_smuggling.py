"""SMTP smuggling (CVE-2023-51764/-51765/-51766 and relatives) over raw sockets.

A client ends its message with a malformed end-of-data (``<LF>.<LF>``,
``<CR>.<CR>``, ...) and goes on, inside the same DATA, with a second
"smuggled" transaction. A receiver that takes the malformed sequence for the
end sees two messages; the gateway must see one, refuse it (bare CR / bare
LF / NUL, 550 5.6.0 P-HDR), give exactly one reply once the real
``<CRLF>.<CRLF>`` arrives, stay in sync for the next command, and let
nothing reach the upstream. With ``data_wire`` switched off the message is
relayed, but still as one message: aiosmtplib turns every bare CR/LF into
CRLF and then dot-stuffs, so the upstream cannot see an end-of-data inside it.
"""
from __future__ import annotations

import asyncio
import email.utils
import time

import pytest

from gateway.config import DEFAULT_CHECKS
from smtp_client import cmd, reply, session

# name -> (bytes sent after the first message's text, the finding, its offset in
# the message the gateway reads: after dot-unstuffing, which drops the dot of
# "<CRLF>." but never touches a dot after a bare CR or LF)
VARIANTS = {
    "LF.LF": (b"\n.\n", "LF", 0),
    "LF.CRLF": (b"\n.\r\n", "LF", 0),
    "CR.CR": (b"\r.\r", "CR", 0),
    "CRLF.CR": (b"\r\n.\r", "CR", 2),
    "CR.LF": (b"\r.\n", "LF", 2),
    "CRLF.LF": (b"\r\n.\n", "LF", 2),
    "LF.CR": (b"\n.\r", "LF", 0),
    "CR.CRLF": (b"\r.\r\n", "CR", 0),
    "CRLF.CRCRLF": (b"\r\n.\r\r\n", "CR", 2),
    "LFLF.LFLF": (b"\n\n.\n\n", "LF", 0),
    "CRCR.CRCR": (b"\r\r.\r\r", "CR", 0),
    "LF.SP.LF": (b"\n. \n", "LF", 0),
    "CRLF.NUL.CRLF": (b"\r\n.\x00\r\n", "NUL", 2),
    "CRLF.NUL.LF": (b"\r\n.\x00\n", "LF", 3),
    "LFCRLF.LF": (b"\n\r\n.\n", "LF", 0),
}
REPLIES = {
    "LF": "550 5.6.0 P-HDR Bare LF in message data (SMTP smuggling): bare LF at line {line} (offset {offset}) "
          "[wire.bare_lf]",
    "CR": "550 5.6.0 P-HDR Bare CR in message data (SMTP smuggling): bare CR at line {line} (offset {offset}) "
          "[wire.bare_cr]",
    "NUL": "550 5.6.0 P-HDR NUL byte in message data: NUL byte at line {line} (offset {offset}) [wire.nul]",
}


def first_message() -> bytes:
    """Headers and a body that does not end with a line break: the variant ends the line."""
    return (b"From: Alice <alice@example.com>\r\n"
            b"To: Bob <bob@example.org>\r\n"
            b"Subject: the first message\r\n"
            b"Date: " + email.utils.formatdate(time.time()).encode() + b"\r\n"
            b"Message-ID: <first@example.com>\r\n"
            b"\r\n"
            b"The first message.")


SMUGGLED = (b"MAIL FROM:<alice@example.com>\r\n"
            b"RCPT TO:<victim@example.org>\r\n"
            b"DATA\r\n"
            b"From: Bank <security@example.com>\r\n"
            b"To: victim@example.org\r\n"
            b"Subject: smuggled\r\n"
            b"Date: " + email.utils.formatdate(time.time()).encode() + b"\r\n"
            b"Message-ID: <smuggled@example.com>\r\n"
            b"\r\n"
            b"This must never be a message of its own.")


async def open_transaction(port: int):
    """An authenticated session (smtp_client.session) inside DATA."""
    reader, writer = await session(port)
    assert (await cmd(reader, writer, b"MAIL FROM:<alice@example.com>")).startswith(b"250")
    assert (await cmd(reader, writer, b"RCPT TO:<bob@example.org>")).startswith(b"250")
    assert (await cmd(reader, writer, b"DATA")).startswith(b"354")
    return reader, writer


async def smuggle(port: int, variant: bytes) -> tuple[bytes, bytes, asyncio.StreamReader, asyncio.StreamWriter]:
    """Send first message + variant + smuggled transaction + the real end, with NOOP
    pipelined behind it in the same write; return the two replies."""
    reader, writer = await open_transaction(port)
    writer.write(first_message() + variant + SMUGGLED + b"\r\n.\r\nNOOP\r\n")
    await writer.drain()
    end_reply = await reply(reader)
    noop_reply = await reply(reader)
    return end_reply, noop_reply, reader, writer


async def control_message(reader, writer) -> bytes:
    """A well-formed transaction on the same connection: proves it is still in sync."""
    assert (await cmd(reader, writer, b"MAIL FROM:<alice@example.com>")).startswith(b"250")
    assert (await cmd(reader, writer, b"RCPT TO:<carol@example.org>")).startswith(b"250")
    assert (await cmd(reader, writer, b"DATA")).startswith(b"354")
    body = first_message().replace(b"the first message", b"control") + b"\r\n"
    writer.write(body + b".\r\n")
    await writer.drain()
    return await reply(reader)


@pytest.mark.parametrize("name", list(VARIANTS))
async def test_malformed_end_of_data_is_refused_and_nothing_is_smuggled(sink, gateway_factory, name):
    variant, kind, at = VARIANTS[name]
    h = await gateway_factory(sink)
    await h.add_account()
    end_reply, noop_reply, reader, writer = await smuggle(h.port(), variant)
    # exactly one reply to the whole DATA stream: the refusal of the first message
    assert end_reply.rstrip(b"\r\n") == _expected(kind, variant, at), end_reply
    # ... and the next reply is the pipelined NOOP's: no smuggled command ran
    assert noop_reply == b"250 2.0.0 OK\r\n", noop_reply
    r = await control_message(reader, writer)
    assert r.startswith(b"250 2.0.0 OK: relayed"), r
    assert (await cmd(reader, writer, b"QUIT")).startswith(b"221")
    writer.close()
    await sink.wait_for(1)
    await asyncio.sleep(0.1)  # give a (wrong) second message the chance to arrive
    assert len(sink.messages) == 1
    assert sink.messages[0].rcpt_tos == ["carol@example.org"]
    assert b"smuggled" not in sink.messages[0].data and b"victim" not in sink.messages[0].data
    refused = [r for r in h.log_records() if r.get("decision") == "refused"]
    assert len(refused) == 1


def _expected(kind: str, variant: bytes, at: int) -> bytes:
    base = first_message()
    # the gateway's view: "<CRLF>." loses its dot (dot-unstuffing)
    seen = (base + variant).replace(b"\r\n.", b"\r\n")
    offset = len(base) + at
    line = seen[:offset].count(b"\n") + 1
    return REPLIES[kind].format(line=line, offset=offset).encode()


def test_variant_offsets_point_at_the_bad_byte():
    # guards the table above: the offset names a bare CR, a bare LF or a NUL in the gateway's view
    base = first_message()
    for name, (variant, kind, at) in VARIANTS.items():
        seen = (base + variant + b"M").replace(b"\r\n.", b"\r\n")
        pos = len(base) + at
        byte = seen[pos:pos + 1]
        if kind == "LF":
            assert byte == b"\n" and seen[pos - 1:pos] != b"\r", name
        elif kind == "CR":
            assert byte == b"\r" and seen[pos + 1:pos + 2] != b"\n", name
        else:
            assert byte == b"\x00", name


@pytest.mark.parametrize("name", list(VARIANTS))
async def test_without_wire_checks_the_upstream_still_sees_one_message(sink, gateway_factory, name):
    variant, _, _ = VARIANTS[name]
    data_checks = [c for c in DEFAULT_CHECKS["data"] if c != "data_wire"]
    h = await gateway_factory(sink, checks={"data": data_checks})
    await h.add_account()
    end_reply, noop_reply, reader, writer = await smuggle(h.port(), variant)
    assert end_reply.startswith(b"250 2.0.0 OK: relayed"), end_reply
    assert noop_reply == b"250 2.0.0 OK\r\n", noop_reply
    assert (await cmd(reader, writer, b"QUIT")).startswith(b"221")
    writer.close()
    await sink.wait_for(1)
    await asyncio.sleep(0.1)
    assert len(sink.messages) == 1, [m.rcpt_tos for m in sink.messages]
    got = sink.messages[0]
    assert got.rcpt_tos == ["bob@example.org"]
    # the smuggled transaction is text inside the one message, on CRLF lines
    assert b"\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n" in got.data
    assert b"This must never be a message of its own." in got.data
    # aiosmtplib normalized every bare CR and LF before dot-stuffing
    body = got.data.replace(b"\r\n", b"")
    assert b"\r" not in body and b"\n" not in body
