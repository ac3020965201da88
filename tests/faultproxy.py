"""A TCP proxy on loopback that a test can break on purpose, in front of any
TCP service (Redis, PostgreSQL, an SMTP upstream).

Modes (``set_mode``):

- ``pass``: new connections are forwarded to the target, both ways.
- ``cut``: every open connection is closed (both sides) and the port stops
  listening, so new connections are refused, as when the service is down.
  ``pass`` listens again on the same port.
- ``blackhole``: connections are accepted and never answered: nothing is
  forwarded either way on new or open connections (a hung service, a
  dropped route). Connections held this way stay silent until their client
  closes them or the proxy stops.

``accepted`` counts the connections the proxy accepted (in every mode), so a
test can count how often a client tried. Every wait has a deadline.

    proxy = await FaultProxy("127.0.0.1", 6379).start()
    ... connect to 127.0.0.1:proxy.port ...
    await proxy.set_mode("cut")
    await proxy.stop()
"""
from __future__ import annotations

import asyncio
import socket
from typing import Literal

Mode = Literal["pass", "cut", "blackhole"]
CONNECT_TIMEOUT = 5.0


class _Link:
    """One client connection and, in pass mode, its connection to the target."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.client_reader, self.client_writer = reader, writer
        self.target_writer: asyncio.StreamWriter | None = None
        self.held = False           # black-holed: never forwards again
        self.tasks: list[asyncio.Task] = []

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for w in (self.client_writer, self.target_writer):
            if w is not None:
                try:
                    w.close()
                except Exception:   # pragma: no cover - transport already gone
                    pass


class FaultProxy:
    def __init__(self, target_host: str, target_port: int, host: str = "127.0.0.1", port: int = 0):
        if host not in ("127.0.0.1", "::1") or target_host not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError("FaultProxy runs on loopback only")
        self.target = (target_host, target_port)
        self.host = host
        self.port = port
        self.mode: Mode = "pass"
        self.accepted = 0
        self._server: asyncio.base_events.Server | None = None
        self._links: set[_Link] = set()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> "FaultProxy":
        await self._listen()
        return self

    async def _listen(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(128)
        sock.setblocking(False)
        self._server = await asyncio.start_server(self._accept, sock=sock)
        self.port = sock.getsockname()[1]

    async def _stop_listening(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            try:
                await asyncio.wait_for(server.wait_closed(), 2)
            except asyncio.TimeoutError:   # links still open: closed by the caller
                pass

    async def set_mode(self, mode: Mode) -> None:
        if mode not in ("pass", "cut", "blackhole"):
            raise ValueError(f"unknown mode {mode!r}")
        previous, self.mode = self.mode, mode
        if mode == "cut":
            await self._stop_listening()
            self._close_links()
        elif mode == "blackhole":
            for link in self._links:
                link.held = True
        if mode != "cut" and previous == "cut":
            await self._listen()

    def _close_links(self) -> None:
        for link in list(self._links):
            link.close()
        self._links.clear()

    async def stop(self) -> None:
        self._close_links()
        await self._stop_listening()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        link = _Link(reader, writer)
        self._links.add(link)
        try:
            if self.mode != "pass":
                link.held = True
                await self._swallow(reader)
                return
            try:
                t_reader, t_writer = await asyncio.wait_for(asyncio.open_connection(*self.target), CONNECT_TIMEOUT)
            except (OSError, asyncio.TimeoutError):
                return
            link.target_writer = t_writer
            loop = asyncio.get_running_loop()
            link.tasks = [loop.create_task(self._pump(link, reader, t_writer, from_client=True)),
                          loop.create_task(self._pump(link, t_reader, writer, from_client=False))]
            await asyncio.wait(link.tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            link.close()
            self._links.discard(link)

    @staticmethod
    async def _swallow(reader: asyncio.StreamReader) -> None:
        while await reader.read(65536):
            pass

    @staticmethod
    async def _pump(link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    from_client: bool) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    if link.held and not from_client:
                        # black-holed and the target went away: the client still
                        # hears nothing, until it closes (or the proxy stops)
                        await asyncio.Event().wait()
                    return
                if link.held:
                    continue
                writer.write(data)
                await writer.drain()
        except (OSError, ConnectionError):
            return
