"""Raw SMTP over asyncio streams, for tests that need byte-level control
(smuggling, PROXY headers, pipelining) rather than a client library."""
from __future__ import annotations

import asyncio
import base64

TIMEOUT = 10.0
# AUTH PLAIN for conftest's default account (GatewayHandle.add_account: alice / s3cret)
AUTH = b"AUTH PLAIN " + base64.b64encode(b"\0alice\0s3cret")


async def reply(reader: asyncio.StreamReader) -> bytes:
    """One complete (possibly multi-line) reply."""
    out = b""
    while True:
        line = await asyncio.wait_for(reader.readline(), TIMEOUT)
        out += line
        if len(line) < 4 or line[3:4] != b"-":
            return out


async def cmd(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes) -> bytes:
    writer.write(line + b"\r\n")
    await writer.drain()
    return await reply(reader)


async def _connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)


async def raw_session(port: int):
    """Connect; returns (reader, writer, greeting reply)."""
    reader, writer = await _connect(port)
    greeting = await reply(reader)
    return reader, writer, greeting


async def proxied_session(port: int, client_ip: str):
    """Connect and send a PROXY v1 header claiming ``client_ip``; returns (reader, writer)."""
    reader, writer = await _connect(port)
    fam = "TCP6" if ":" in client_ip else "TCP4"
    dst = "::1" if ":" in client_ip else "127.0.0.1"
    writer.write(f"PROXY {fam} {client_ip} {dst} 40000 25\r\n".encode())
    await writer.drain()
    return reader, writer


async def session(port: int, auth: bool = True):
    """Connect, greeting 220, EHLO client.test (250) and, with ``auth``, AUTH
    PLAIN as alice (235); returns (reader, writer)."""
    reader, writer, greeting = await raw_session(port)
    try:
        assert greeting.startswith(b"220"), greeting
        assert (await cmd(reader, writer, b"EHLO client.test")).startswith(b"250")
        if auth:
            assert (await cmd(reader, writer, AUTH)).startswith(b"235")
    except BaseException:
        writer.close()
        raise
    return reader, writer


def dot_stuff(data: bytes) -> bytes:
    """The message as sent after DATA (RFC 5321 4.5.2), without the final ``.\\r\\n``."""
    stuffed = data.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed


async def send(port: int, data: bytes, mail_from: str = "alice@example.com", rcpt: str = "bob@example.org",
               params: str = "", auth: bool = True) -> bytes:
    """One transaction, authenticated as alice unless ``auth`` is false
    (``params`` follow MAIL FROM:<...>): the first refusal of MAIL or RCPT,
    else the reply to the end of DATA, stripped."""
    reader, writer = await session(port, auth=auth)
    try:
        for line in (f"MAIL FROM:<{mail_from}>{params}", f"RCPT TO:<{rcpt}>"):
            r = await cmd(reader, writer, line.encode())
            if not r.startswith(b"250"):
                return r.strip()
        assert (await cmd(reader, writer, b"DATA")).startswith(b"354")
        writer.write(dot_stuff(data) + b".\r\n")
        await writer.drain()
        r = (await reply(reader)).strip()
        await cmd(reader, writer, b"QUIT")
        return r
    finally:
        writer.close()
