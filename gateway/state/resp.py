"""A lean Redis client for the counters' hot path (issue 12): one pipelined
connection, replies matched to commands in order, parsed by hiredis.

Why not redis-py here. Every RCPT and every message makes a few Redis calls
(the rate limiter's script, the harvest guard's MGET, the bulk counter's
script). redis.asyncio spends about 41 us of CPU per command on this
machine (its connection pool, locks, retry wrapper and command packing),
against about 6 us for a write and a parsed reply on a bare asyncio
protocol (bench/README.md, "Enforcement"). With four calls per message that
was a third of the gateway's CPU per message. The counters' calls, their
outage probe and the scripts of the limiter and the distinct counter go
through this client; redis-py stays for the rest (the resolver's shared DNS
cache, tests): this client only knows how to send commands and read replies.

**Pipelined, in order.** Commands from any number of tasks go out on one
TCP (or TLS, or Unix socket) connection as they come, each with a future;
Redis answers in order, so the n-th reply is the n-th future's.
``execute_many`` writes several commands at once (a MULTI ... EXEC block)
and waits for all their replies.

**A broken connection is never reused.** The caller's deadline
(``RedisCounters._call``) cancels a command waiting for its reply; its reply
may still come, or may never come (a black-holed link), and every later
reply would then be matched to the wrong command. So a command cancelled
before its reply, a lost connection or a reply that cannot be parsed
closes the connection and fails every command still waiting on it with
``ConnectionError``; the next command opens a new connection. Nothing is
retried here: the counters decide (fallback, probe).

Errors Redis answers (``-ERR ...``, ``-NOSCRIPT ...``) raise
:class:`RespError` for that command alone; the connection stays.
"""
from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import Any, Sequence
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis


class RespError(Exception):
    """An error reply of Redis (the connection is fine)."""

    @property
    def noscript(self) -> bool:
        return str(self).startswith("NOSCRIPT")


class _Protocol(asyncio.Protocol):
    def __init__(self, client: "RespClient") -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader()
        self.waiting: deque[asyncio.Future] = deque()
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.reader.feed(data)
            while True:
                reply = self.reader.gets()
                if reply is False:
                    return
                if not self.waiting:     # a reply nobody asked for: the stream is not ours to trust
                    raise ConnectionError("a reply without a command")
                fut = self.waiting.popleft()
                if fut.done():           # its caller gave up: broken() was already called
                    continue
                if isinstance(reply, hiredis.ReplyError):
                    fut.set_exception(RespError(str(reply)))
                else:
                    fut.set_result(reply)
        except Exception as exc:          # hiredis.ProtocolError or the above
            self.broken(ConnectionError(f"Redis reply unreadable: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.broken(ConnectionError(f"Redis connection lost: {exc or 'closed by the server'}"))

    def broken(self, exc: Exception) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()
        while self.waiting:
            fut = self.waiting.popleft()
            if not fut.done():
                fut.set_exception(exc)
        if self.client._protocol is self:
            self.client._protocol = None


def _retrieved(futures: list[asyncio.Future]) -> None:
    """Mark the failures of commands nobody awaits any more as seen (no "exception was
    never retrieved" for the rest of a block whose first command failed)."""
    for f in futures:
        if f.done() and not f.cancelled():
            f.exception()


class RespClient:
    """``await client.execute("GET", "k")`` -> the reply (bytes, int, list, None)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        self._scheme = parts.scheme
        if self._scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"redis_url: scheme {parts.scheme!r} is not redis://, rediss:// or unix://")
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 6379
        self._path = unquote(parts.path) if self._scheme == "unix" else ""
        db = query.get("db", [""])[0] or (parts.path.strip("/") if self._scheme != "unix" else "")
        self._db = int(db or 0)
        self._username = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else None
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None
        self.connects = 0                 # connections opened (the tests count them)

    async def _connection(self) -> _Protocol:
        p = self._protocol
        if p is not None and not p.closed:
            return p
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            p = self._protocol
            if p is not None and not p.closed:
                return p
            loop = asyncio.get_running_loop()
            if self._scheme == "unix":
                _, p = await loop.create_unix_connection(lambda: _Protocol(self), self._path)
            else:
                tls = ssl.create_default_context() if self._scheme == "rediss" else None
                _, p = await loop.create_connection(lambda: _Protocol(self), self._host, self._port, ssl=tls)
            self.connects += 1
            hello: list[tuple[Any, ...]] = []
            if self._password is not None:
                hello.append(("AUTH", self._password) if self._username is None
                             else ("AUTH", self._username, self._password))
            if self._db:
                hello.append(("SELECT", self._db))
            if hello:
                try:
                    await self._send(p, hello)
                except BaseException:
                    p.broken(ConnectionError("Redis AUTH/SELECT failed"))
                    raise
            self._protocol = p
            return p

    @staticmethod
    async def _send(p: _Protocol, commands: Sequence[Sequence[Any]]) -> list[Any]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]
        assert p.transport is not None
        p.transport.write(b"".join(hiredis.pack_command(tuple(c)) for c in commands))
        p.waiting.extend(futures)
        out: list[Any] = []
        error: RespError | None = None
        try:
            for f in futures:
                try:
                    out.append(await f)
                except RespError as exc:
                    error = error or exc
                    out.append(None)
        except asyncio.CancelledError:
            # the awaited future was cancelled with the task: a reply still to come, so this
            # stream is lost (a future that got its reply cannot be cancelled)
            if any(f.cancelled() or not f.done() for f in futures):
                p.broken(ConnectionError("a command was cancelled before its reply"))
            _retrieved(futures)
            raise
        except ConnectionError:
            _retrieved(futures)
            raise
        if error is not None:
            raise error
        return out

    async def execute(self, *args: Any) -> Any:
        return (await self.execute_many([args]))[0]

    async def execute_many(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Several commands in one write, their replies in order. An error reply
        raises :class:`RespError` (after all the replies were read)."""
        p = await self._connection()
        return await self._send(p, commands)

    async def close(self) -> None:
        p = self._protocol
        if p is not None:
            p.broken(ConnectionError("client closed"))
            self._protocol = None
