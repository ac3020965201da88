"""Raw SMTP over asyncio streams, for tests that need byte-level control
(smuggling, PROXY headers, pipelining) rather than a client library."""
from __future__ import annotations

import asyncio


async def reply(reader: asyncio.StreamReader) -> bytes:
    """One complete (possibly multi-line) reply."""
    out = b""
    while True:
        line = await asyncio.wait_for(reader.readline(), 10)
        out += line
        if len(line) < 4 or line[3:4] != b"-":
            return out


async def cmd(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes) -> bytes:
    writer.write(line + b"\r\n")
    await writer.drain()
    return await reply(reader)


async def raw_session(port: int):
    """Connect; returns (reader, writer, greeting line)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    greeting = await reader.readline()
    return reader, writer, greeting


async def proxied_session(port: int, client_ip: str):
    """Connect and send a PROXY v1 header claiming ``client_ip``; returns (reader, writer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    fam = "TCP6" if ":" in client_ip else "TCP4"
    dst = "::1" if ":" in client_ip else "127.0.0.1"
    writer.write(f"PROXY {fam} {client_ip} {dst} 40000 25\r\n".encode())
    await writer.drain()
    return reader, writer
