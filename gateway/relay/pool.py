"""Upstream relay: a pool of reusable aiosmtplib connections with failover.

The gateway proxies the client's transaction to the upstream as it happens
(like Postfix's before-queue content filter): the upstream MAIL is sent once
the client's MAIL passed our checks, each RCPT once it passed ours, and the
client's DATA is answered with the upstream's own answer. So a recipient the
upstream refuses is refused to the client, and 250 after DATA means the
upstream has the message: nothing accepted is ever lost.
"""
from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque
from dataclasses import dataclass, field

import aiosmtplib
from aiosmtplib.errors import SMTPException, SMTPResponseException

from ..config import RelaySettings, UpstreamSettings
from ..core import replies
from ..core.replies import Rendered, Reply

log = logging.getLogger("gateway.relay")

_CONNECTION_ERRORS = (SMTPException, OSError, asyncio.TimeoutError, ssl.SSLError, ValueError)


@dataclass(eq=False)
class _Connection:
    smtp: aiosmtplib.SMTP
    upstream: "Upstream"
    messages: int = 0
    last_used: float = field(default_factory=time.monotonic)

    @property
    def alive(self) -> bool:
        return self.smtp.is_connected

    def close(self) -> None:
        try:
            self.smtp.close()
        except Exception:  # pragma: no cover - closing a broken transport
            pass


@dataclass(eq=False)
class Upstream:
    settings: UpstreamSettings
    idle: deque[_Connection] = field(default_factory=deque)
    failures: int = 0

    @property
    def name(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"


class UpstreamTransaction:
    """One open MAIL transaction at an upstream, driven by the client's commands."""

    def __init__(self, pool: "RelayPool", conn: _Connection, utf8: bool):
        self._pool = pool
        self._conn = conn
        self._utf8 = utf8
        self._broken = False
        self._done = False
        self.accepted_rcpts = 0

    @property
    def upstream(self) -> str:
        return self._conn.upstream.name

    async def rcpt(self, address: str, options: list[str]) -> Reply | Rendered:
        st = self._conn.upstream.settings
        try:
            resp = await self._conn.smtp.execute_command(
                *_command(b"RCPT", b"TO:", address, options, self._utf8), timeout=st.command_timeout)
        except _CONNECTION_ERRORS as exc:
            log.warning("upstream %s failed during RCPT: %s", self.upstream, exc)
            self._broken = True
            return replies.UPSTREAM_TEMP_FAILURE
        if resp.code in (250, 251):
            self.accepted_rcpts += 1
            return replies.RECIPIENT_OK
        return replies.from_upstream(resp.code, resp.message)

    async def data(self, message: bytes) -> Reply | Rendered:
        """Send the message; the returned reply is what the client must get."""
        st = self._conn.upstream.settings
        if self._broken:
            return replies.UPSTREAM_TEMP_FAILURE
        try:
            resp = await self._conn.smtp.data(message, timeout=st.data_timeout)
        except SMTPResponseException as exc:
            self._done = True
            if exc.code == 421:
                self._broken = True
            return replies.from_upstream(exc.code, exc.message)
        except _CONNECTION_ERRORS as exc:
            # The upstream may or may not have the message: the client keeps its
            # copy and retries (a possible duplicate is better than a loss).
            log.warning("upstream %s failed during DATA: %s", self.upstream, exc)
            self._broken = True
            return replies.UPSTREAM_TEMP_FAILURE
        self._done = True
        self._conn.messages += 1
        return replies.from_upstream(resp.code, resp.message)

    async def close(self) -> None:
        """End the transaction: return the connection to the pool (after RSET
        when the transaction did not complete), or drop it if it is broken."""
        conn = self._conn
        if not self._broken and not self._done:
            try:
                resp = await conn.smtp.execute_command(b"RSET", timeout=conn.upstream.settings.command_timeout)
                self._broken = resp.code != 250
            except _CONNECTION_ERRORS:
                self._broken = True
        self._pool._release(conn, reusable=not self._broken)


def _command(verb: bytes, prefix: bytes, address: str, options: list[str], utf8: bool) -> list[bytes]:
    addr = address.encode("utf-8" if utf8 else "ascii", "surrogateescape")
    args = [verb, prefix + b"<" + addr + b">"]
    args.extend(o.encode("ascii") for o in options)
    return args


class RelayPool:
    def __init__(self, settings: RelaySettings, helo_name: str):
        self.settings = settings
        self.helo_name = settings.helo_name or helo_name
        self.upstreams = [Upstream(u) for u in settings.upstreams]
        self._sweeper: asyncio.Task | None = None
        self.stats = {"connections_opened": 0, "connections_reused": 0, "failovers": 0}

    def set_upstreams(self, upstreams: list[UpstreamSettings]) -> None:
        self.upstreams = [Upstream(u) for u in upstreams]

    async def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for up in self.upstreams:
            while up.idle:
                conn = up.idle.popleft()
                try:
                    await asyncio.wait_for(conn.smtp.quit(), 2)
                except Exception:
                    conn.close()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(max(1.0, self.settings.idle_timeout / 2))
            now = time.monotonic()
            for up in self.upstreams:
                keep: deque[_Connection] = deque()
                while up.idle:
                    conn = up.idle.popleft()
                    if now - conn.last_used > self.settings.idle_timeout or not conn.alive:
                        conn.close()
                    else:
                        keep.append(conn)
                up.idle = keep

    async def _open(self, up: Upstream) -> _Connection:
        st = up.settings
        ctx = None
        if st.tls != "none":
            ctx = ssl.create_default_context()
            if not st.verify_tls:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
        smtp = aiosmtplib.SMTP(hostname=st.host, port=st.port, local_hostname=self.helo_name,
                               use_tls=st.tls == "implicit", start_tls=st.tls == "starttls",
                               tls_context=ctx, timeout=st.connect_timeout)
        await smtp.connect()
        await smtp.ehlo()
        if st.username:
            await smtp.login(st.username, st.password)
        self.stats["connections_opened"] += 1
        return _Connection(smtp, up)

    def _take_idle(self, up: Upstream) -> _Connection | None:
        now = time.monotonic()
        while up.idle:
            conn = up.idle.pop()  # most recently used first: least likely to be stale
            if conn.alive and now - conn.last_used <= self.settings.idle_timeout:
                self.stats["connections_reused"] += 1
                return conn
            conn.close()
        return None

    def _release(self, conn: _Connection, reusable: bool) -> None:
        up = conn.upstream
        if (reusable and conn.alive and conn.messages < self.settings.max_messages_per_connection
                and len(up.idle) < self.settings.pool_size and up in self.upstreams):
            conn.last_used = time.monotonic()
            up.idle.append(conn)
        else:
            if conn.alive:
                asyncio.get_running_loop().create_task(self._quit(conn))

    async def _quit(self, conn: _Connection) -> None:
        try:
            await asyncio.wait_for(conn.smtp.quit(), conn.upstream.settings.command_timeout)
        except Exception:
            conn.close()

    async def begin(self, mail_from: str, options: list[str], utf8: bool, eight_bit: bool,
                    size: int | None) -> tuple[UpstreamTransaction | None, Reply | Rendered]:
        """Open a transaction at the first upstream that takes MAIL FROM.

        Returns the transaction and SENDER_OK, or None and the reply for the
        client: the upstream's own 5xx, its last 4xx, or 451 4.4.1 when no
        upstream could be reached.
        """
        last: Reply | Rendered = replies.UPSTREAM_UNAVAILABLE
        for index, up in enumerate(self.upstreams):
            if index:
                self.stats["failovers"] += 1
            for attempt in range(2):
                conn = self._take_idle(up) if attempt == 0 else None
                fresh = conn is None
                try:
                    if conn is None:
                        conn = await self._open(up)
                    opts = self._options(conn, options, utf8, eight_bit, size)
                    if opts is None:
                        last = replies.UPSTREAM_NO_SMTPUTF8
                        self._release(conn, reusable=True)
                        break
                    resp = await conn.smtp.execute_command(*_command(b"MAIL", b"FROM:", mail_from, opts, utf8),
                                                           timeout=up.settings.command_timeout)
                except _CONNECTION_ERRORS as exc:
                    if conn is not None:
                        conn.close()
                    if fresh:
                        log.warning("upstream %s unreachable: %s", up.name, exc)
                        up.failures += 1
                        break  # next upstream
                    continue  # a stale pooled connection: retry once with a fresh one
                if resp.code == 250:
                    up.failures = 0
                    return UpstreamTransaction(self, conn, utf8), replies.SENDER_OK
                reply = replies.from_upstream(resp.code, resp.message)
                if resp.code >= 500:
                    # The upstream judged the sender: tell the client, no failover.
                    await UpstreamTransaction(self, conn, utf8).close()
                    return None, reply
                last = reply
                self._release(conn, reusable=resp.code != 421)
                break
        return None, last

    @staticmethod
    def _options(conn: _Connection, options: list[str], utf8: bool, eight_bit: bool,
                 size: int | None) -> list[str] | None:
        smtp = conn.smtp
        opts: list[str] = []
        if utf8:
            if not smtp.supports_extension("smtputf8"):
                return None
            opts.append("SMTPUTF8")
        if eight_bit and smtp.supports_extension("8bitmime"):
            opts.append("BODY=8BITMIME")
        if size is not None and smtp.supports_extension("size"):
            opts.append(f"SIZE={size}")
        return opts
