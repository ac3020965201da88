"""Upstream relay: a pool of reusable aiosmtplib connections with failover.

The gateway proxies the client's transaction to the upstream as it happens
(like Postfix's before-queue content filter): the upstream MAIL is sent once
the client's MAIL passed our checks, each RCPT once it passed ours, and the
client's DATA is answered with the upstream's own answer. So a recipient the
upstream refuses is refused to the client, and 250 after DATA means the
upstream has the message: nothing accepted is ever lost. The price is a
possible duplicate when the answer to the final dot never comes
(docs/architecture.md, "Duplicates by design").

Each upstream has a circuit breaker (relay/breaker.py): an upstream that
failed is skipped without being tried until its back-off ends and a
background probe reaches it again; when no upstream is left the one whose
back-off ends first is tried anyway.

The open connections of the pool, over all upstreams, in use and idle (and
being opened or quit), never exceed ``[relay] max_connections``: each holds
a slot, counted by ``RelayPool.open``. A transaction that needs a new
connection takes a free slot (an integer compare, no await), else closes the
least recently used idle connection to another upstream and takes its slot,
else waits, first come first served, up to ``connection_wait`` seconds. A
released connection goes straight to the first waiter (itself when the
waiter wants its upstream, else its slot), so a slot is never free while
someone waits. A waiter that times out gets ``451 4.4.5`` (UPSTREAM_BUSY);
one that is cancelled (its client left) leaves the queue, and a slot handed
to it in that same moment goes on to the next.
"""
from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque
from dataclasses import dataclass, field
from typing import cast

import aiosmtplib
from aiosmtplib.errors import SMTPException, SMTPResponseException, SMTPServerDisconnected
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

from ..config import RelaySettings, UpstreamSettings
from ..core import replies
from ..core.replies import Rendered, Reply
from .breaker import Breaker
from ..state.deadline import within

log = logging.getLogger("gateway.relay")

_CONNECTION_ERRORS = (SMTPException, OSError, asyncio.TimeoutError, ssl.SSLError, ValueError)


@dataclass(eq=False)
class _Connection:
    smtp: aiosmtplib.SMTP
    upstream: "Upstream"
    messages: int = 0
    last_used: float = field(default_factory=time.monotonic)
    slot: bool = True       # still counted in RelayPool.open (given back exactly once)

    @property
    def alive(self) -> bool:
        return self.smtp.is_connected

    def close(self) -> None:
        try:
            self.smtp.close()
        except Exception:  # pragma: no cover - closing a broken transport
            pass

    def say_quit_and_close(self) -> None:
        """QUIT without waiting for the answer: the transport sends what is
        buffered before it closes, so the upstream sees a polite end and the
        slot is free at once."""
        transport = cast("asyncio.WriteTransport | None", self.smtp.transport)
        if transport is not None and not transport.is_closing():
            try:
                transport.write(b"QUIT\r\n")
            except Exception:  # pragma: no cover - a transport breaking just now
                pass
        self.close()


@dataclass(eq=False)
class Upstream:
    settings: UpstreamSettings
    breaker: Breaker
    idle: deque[_Connection] = field(default_factory=deque)

    @property
    def name(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"

    @property
    def failures(self) -> int:
        return self.breaker.consecutive_failures


class UpstreamTransaction:
    """One open MAIL transaction at an upstream, driven by the client's commands."""

    def __init__(self, pool: "RelayPool", conn: _Connection, utf8: bool, skipped: tuple[str, ...] = ()):
        self._pool = pool
        self._conn = conn
        self._utf8 = utf8
        self._broken = False
        self._done = False
        self._closed = False
        self._failure: str | None = None  # why DATA failed, logged at close (after the client's reply)
        self.accepted_rcpts = 0
        # After the final dot, no answer: the upstream may hold the message the
        # client is told to send again ("upstream_timeout_after_data" |
        # "upstream_lost_after_data"; docs/architecture.md, "Duplicates by design").
        self.duplicate_risk: str | None = None
        self.dot_sent = False       # the message and its final dot were handed to the connection
        self.skipped = skipped      # upstreams not tried before this one: their breaker was open

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
        except BaseException:
            self._broken = True      # cancelled mid-command: the connection's state is unknown
            raise
        if resp.code in (250, 251):
            self.accepted_rcpts += 1
            return replies.RECIPIENT_OK
        return replies.from_upstream(resp.code, resp.message)

    async def data(self, message: bytes) -> Reply | Rendered:
        """Send the message; the returned reply is what the client must get.

        DATA and the message go in two steps (what aiosmtplib's ``data()``
        does in one) so that a failure is known to be before or after the
        final dot: after it the upstream may have taken the message although
        the client is deferred (``duplicate_risk``). Nothing is logged here:
        the client's reply comes first, :meth:`close` logs the failure."""
        st = self._conn.upstream.settings
        if self._broken:
            return replies.UPSTREAM_TEMP_FAILURE
        smtp = self._conn.smtp
        try:
            start = await smtp.execute_command(b"DATA", timeout=st.data_timeout)
            if start.code != 354:
                self._done = True
                if start.code == 421:
                    self._broken = True
                return replies.from_upstream(start.code, start.message)
            protocol = smtp.protocol
            if protocol is None:
                raise SMTPServerDisconnected("Connection lost")
            protocol.write(PERIOD_REGEX.sub(b"..", normalize_message_line_endings(message)) + b".\r\n")
            self.dot_sent = True
            resp = await protocol.read_response(timeout=st.data_timeout)
        except SMTPResponseException as exc:     # a malformed answer
            self._done = True
            self._broken = True
            self._conn.close()
            self._failure = f"{exc.code} {exc.message}"
            if self.dot_sent:
                self.duplicate_risk = "upstream_lost_after_data"
            return replies.UPSTREAM_TEMP_FAILURE
        except _CONNECTION_ERRORS as exc:
            # The upstream may or may not have the message: the client keeps its
            # copy and retries (a possible duplicate is better than a loss). The
            # connection is closed, never reused: its next answer may be this one.
            self._broken = True
            self._conn.close()
            self._failure = str(exc) or type(exc).__name__
            if self.dot_sent:
                self.duplicate_risk = ("upstream_timeout_after_data" if isinstance(exc, TimeoutError)
                                       else "upstream_lost_after_data")
            return replies.UPSTREAM_TEMP_FAILURE
        except BaseException:
            # Cancelled (the client left before the final dot went upstream):
            # the connection is mid-DATA, closed, never reused.
            self._broken = True
            self._conn.close()
            raise
        self._done = True
        if resp.code == 421:
            self._broken = True
        elif 200 <= resp.code < 300:
            self._conn.messages += 1
        return replies.from_upstream(resp.code, resp.message)

    def abandon(self) -> None:
        """End the transaction at once, without RSET (its client is gone in
        the middle of a command): the connection is closed, its slot freed."""
        if self._closed:
            return
        self._closed = True
        self._broken = True
        self._conn.say_quit_and_close()
        self._pool._free_slot(self._conn)

    async def close(self) -> None:
        """End the transaction: return the connection to the pool (after RSET
        when the transaction did not complete), or drop it if it is broken."""
        if self._closed:
            return
        self._closed = True
        conn = self._conn
        if self._failure is not None:
            log.warning("upstream %s failed during DATA%s: %s", self.upstream,
                        " after the final dot" if self.duplicate_risk else "", self._failure)
            self._failure = None
        try:
            if not self._broken and not self._done:
                self._broken = True          # until RSET is answered (cancelled meanwhile: dropped)
                resp = await conn.smtp.execute_command(b"RSET", timeout=conn.upstream.settings.command_timeout)
                self._broken = resp.code != 250
        except _CONNECTION_ERRORS:
            self._broken = True
        finally:
            self._pool._release(conn, reusable=not self._broken)


def _command(verb: bytes, prefix: bytes, address: str, options: list[str], utf8: bool) -> list[bytes]:
    addr = address.encode("utf-8" if utf8 else "ascii", "surrogateescape")
    args = [verb, prefix + b"<" + addr + b">"]
    args.extend(o.encode("ascii") for o in options)
    return args


class RelayPool:
    def __init__(self, settings: RelaySettings, helo_name: str, clock=time.monotonic):
        self.settings = settings
        self.helo_name = settings.helo_name or helo_name
        self._clock = clock
        self.upstreams = [self._upstream(u) for u in settings.upstreams]
        self._sweeper: asyncio.Task | None = None
        self._prober: asyncio.Task | None = None
        self._probe_wake = asyncio.Event()
        self.max_connections = settings.max_connections
        self.open = 0                                   # slots held: connections in use, idle, opening, quitting
        self._waiters: deque[tuple[asyncio.Future, Upstream]] = deque()
        self._busy_warned = -60.0
        # connection_waits: transactions that found every slot taken and waited;
        # connection_busy: of those, the ones deferred with 451 4.4.5 after connection_wait;
        # idle_evicted: idle connections closed to make room for another upstream's.
        self.stats = {"connections_opened": 0, "connections_reused": 0, "failovers": 0,
                      "connection_waits": 0, "connection_busy": 0, "idle_evicted": 0}

    def _upstream(self, settings: UpstreamSettings) -> Upstream:
        s = self.settings
        return Upstream(settings, Breaker(s.breaker_failures, s.breaker_backoff, s.breaker_backoff_max,
                                          s.breaker_open_on_timeout, self._clock))

    def set_upstreams(self, upstreams: list[UpstreamSettings]) -> None:
        for up in self.upstreams:
            while up.idle:
                self._drop(up.idle.popleft())
        self.upstreams = [self._upstream(u) for u in upstreams]

    @property
    def waiting(self) -> int:
        """Transactions waiting for a connection slot now."""
        return sum(1 for fut, _ in self._waiters if not fut.done())

    def connections(self) -> dict[str, int]:
        """The connection bound (for /readyz)."""
        return {"open": self.open, "max": self.max_connections, "waiting": self.waiting}

    def health(self) -> dict[str, dict]:
        """Each upstream's breaker (for /readyz), in failover order."""
        return {up.name: up.breaker.as_dict() for up in self.upstreams}

    @property
    def any_available(self) -> bool:
        """Is at least one upstream's breaker closed (or the probe of one running)?"""
        return any(up.breaker.state != "open" for up in self.upstreams)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._sweeper = loop.create_task(self._sweep())
        self._prober = loop.create_task(self._probe_loop())

    async def close(self) -> None:
        for task in (self._sweeper, self._prober):
            if task is not None:
                task.cancel()
        self._sweeper = self._prober = None
        for up in self.upstreams:
            while up.idle:
                conn = up.idle.popleft()
                try:
                    await within(conn.smtp.quit(), 2)
                except Exception:
                    conn.close()
                finally:
                    self._free_slot(conn)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(max(1.0, self.settings.idle_timeout / 2))
            now = time.monotonic()
            for up in self.upstreams:
                keep: deque[_Connection] = deque()
                while up.idle:
                    conn = up.idle.popleft()
                    if now - conn.last_used > self.settings.idle_timeout or not conn.alive:
                        self._drop(conn)
                    else:
                        keep.append(conn)
                up.idle = keep

    # ------------------------------------------------------------ breakers
    def _failed(self, up: Upstream, exc: BaseException, probe: bool = False) -> None:
        """A connection to ``up`` could not be opened or used for MAIL."""
        if up.breaker.failure(timeout=isinstance(exc, TimeoutError), probe=probe):
            log.warning("upstream %s circuit open for %g s after %d consecutive failure(s) (last: %s): "
                        "skipped until a probe reaches it", up.name, up.breaker.backoff,
                        up.breaker.consecutive_failures, str(exc) or type(exc).__name__)
            while up.idle:       # connections to a failing upstream are not worth keeping
                self._drop(up.idle.popleft())
            self._probe_wake.set()

    def _succeeded(self, up: Upstream) -> None:
        if up.breaker.state != "closed":
            log.warning("upstream %s circuit closed: reachable again", up.name)
        up.breaker.success()

    async def _probe_loop(self) -> None:
        """Probe every open upstream whose back-off has ended, one connection
        each (connect, greeting, EHLO, STARTTLS and login as configured)."""
        probes: set[asyncio.Task] = set()
        try:
            while True:
                for up in self.upstreams:
                    if up.breaker.probe_due():
                        up.breaker.start_probe()
                        task = asyncio.get_running_loop().create_task(self._probe(up))
                        probes.add(task)
                        task.add_done_callback(probes.discard)
                waits = [up.breaker.open_until - self._clock() for up in self.upstreams
                         if up.breaker.state == "open"]
                self._probe_wake.clear()
                try:
                    await within(self._probe_wake.wait(), max(0.01, min(waits, default=60.0)))
                except asyncio.TimeoutError:
                    pass
        finally:
            for task in list(probes):
                task.cancel()

    async def _probe(self, up: Upstream) -> None:
        got: bool | _Connection = self._reserve(up)
        if got is False:
            try:
                got = await self._wait(up, self.settings.connection_wait)
            except BaseException:
                up.breaker.state = "open"
                raise
            if got is False:
                # Every slot in use for the whole wait: the upstreams in use
                # carry the traffic; this one is probed again after its back-off.
                log.info("upstream %s probe postponed: every upstream connection slot is in use", up.name)
                up.breaker.postpone()
                self._probe_wake.set()
                return
        if isinstance(got, _Connection):       # handed a connection to this very upstream: it answers
            self._succeeded(up)
            self._release(got, reusable=True)
            return
        try:
            conn = await self._open(up)
        except _CONNECTION_ERRORS as exc:
            log.info("upstream %s probe failed: %s", up.name, str(exc) or type(exc).__name__)
            self._failed(up, exc, probe=True)
            return
        except BaseException:
            up.breaker.state = "open"      # cancelled (shutdown): probed again by the next loop
            raise
        self._succeeded(up)
        self._release(conn, reusable=True)

    async def _open(self, up: Upstream) -> _Connection:
        """Open a connection in the slot the caller holds (given back if the
        open fails or is cancelled)."""
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
        try:
            await smtp.connect()
            await smtp.ehlo()
            if st.username:
                await smtp.login(st.username, st.password)
        except BaseException:
            try:
                smtp.close()
            except Exception:  # pragma: no cover - closing a half-open transport
                pass
            self._free_slot(None)
            raise
        self.stats["connections_opened"] += 1
        return _Connection(smtp, up)

    # ------------------------------------------------------ the connection bound
    def _reserve(self, up: Upstream) -> bool:
        """A slot for a new connection to ``up`` without waiting: True (a free
        slot, now held), or an idle connection of another upstream closed to
        make room (True, its slot passes on); False when every slot is taken
        by a connection in use."""
        if self.open < self.max_connections:        # the fast path: one compare
            self.open += 1
            return True
        victim: _Connection | None = None
        for other in self.upstreams:
            if other.idle and (victim is None or other.idle[0].last_used < victim.last_used):
                victim = other.idle[0]
        if victim is None:
            return False
        victim.upstream.idle.popleft()
        victim.slot = False          # its slot is ours now
        victim.say_quit_and_close()
        self.stats["idle_evicted"] += 1
        log.debug("upstream %s: idle connection closed to make room for one to %s (relay.max_connections "
                  "= %d reached)", victim.upstream.name, up.name, self.max_connections)
        return True

    async def _wait(self, up: Upstream, seconds: float) -> "bool | _Connection":
        """Wait in line for a slot: True (a slot, held), a released connection
        to ``up`` (its slot with it), or False after ``seconds``."""
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        entry = (fut, up)
        self._waiters.append(entry)
        self.stats["connection_waits"] += 1
        try:
            got = await within(fut, seconds)
        except BaseException as exc:
            if fut.done() and not fut.cancelled():
                self._give_back(fut.result())    # handed over in the very turn we gave up
            else:
                fut.cancel()
                try:
                    self._waiters.remove(entry)
                except ValueError:
                    pass
            if isinstance(exc, TimeoutError):
                return False
            raise
        return True if got is None else got

    def _deferred(self) -> None:
        self.stats["connection_busy"] += 1
        now = time.monotonic()
        if now - self._busy_warned >= 60.0:      # one line a minute while it lasts; the metrics count all
            self._busy_warned = now
            log.warning("upstream connections busy: all relay.max_connections = %d in use for "
                        "relay.connection_wait = %g s, clients deferred with 451 4.4.5 (%d so far)",
                        self.max_connections, self.settings.connection_wait, self.stats["connection_busy"])

    def _give_back(self, got: "_Connection | None") -> None:
        if got is None:
            self._free_slot(None)
        else:
            self._release(got, reusable=True)

    def _next_waiter(self) -> tuple[asyncio.Future, Upstream] | None:
        waiters = self._waiters
        while waiters:
            entry = waiters.popleft()
            if not entry[0].done():
                return entry
        return None

    def _free_slot(self, conn: _Connection | None) -> None:
        """A connection is gone (or ``None``: an open failed): its slot goes
        to the first waiter, else back to the free ones."""
        if conn is not None:
            if not conn.slot:
                return
            conn.slot = False
        waiter = self._next_waiter() if self._waiters else None
        if waiter is not None:
            waiter[0].set_result(None)
        else:
            self.open -= 1

    def _drop(self, conn: _Connection) -> None:
        """Close a connection at once (idle and expired, broken, or its
        transaction cancelled) and give its slot back."""
        conn.close()
        self._free_slot(conn)

    def _take_idle(self, up: Upstream) -> _Connection | None:
        now = time.monotonic()
        while up.idle:
            conn = up.idle.pop()  # most recently used first: least likely to be stale
            if conn.alive and now - conn.last_used <= self.settings.idle_timeout:
                self.stats["connections_reused"] += 1
                return conn
            self._drop(conn)
        return None

    def _release(self, conn: _Connection, reusable: bool) -> None:
        up = conn.upstream
        if (reusable and conn.alive and conn.messages < self.settings.max_messages_per_connection
                and up in self.upstreams):
            waiter = self._next_waiter() if self._waiters else None
            if waiter is not None:
                fut, wanted = waiter
                if wanted is up:
                    conn.last_used = time.monotonic()
                    self.stats["connections_reused"] += 1
                    fut.set_result(conn)             # the connection and its slot
                else:
                    conn.slot = False                # its slot goes to the waiter
                    conn.say_quit_and_close()
                    fut.set_result(None)
                return
            if len(up.idle) < self.settings.pool_size:
                conn.last_used = time.monotonic()
                up.idle.append(conn)
                return
        if conn.alive:
            asyncio.get_running_loop().create_task(self._quit(conn))
        else:
            self._free_slot(conn)

    async def _quit(self, conn: _Connection) -> None:
        try:
            await within(conn.smtp.quit(), conn.upstream.settings.command_timeout)
        except Exception:
            conn.close()
        finally:
            self._free_slot(conn)

    async def begin(self, mail_from: str, options: list[str], utf8: bool, eight_bit: bool,
                    size: int | None) -> tuple[UpstreamTransaction | None, Reply | Rendered]:
        """Open a transaction at the first upstream that takes MAIL FROM.

        Returns the transaction and SENDER_OK, or None and the reply for the
        client: the upstream's own 5xx, its last 4xx, or 451 4.4.1 when no
        upstream could be reached.
        """
        last: Reply | Rendered = replies.UPSTREAM_UNAVAILABLE
        skipped: list[Upstream] = []
        tried = 0
        for up in self.upstreams:
            if not up.breaker.available:
                up.breaker.skipped += 1
                skipped.append(up)
                continue
            if tried:
                self.stats["failovers"] += 1
            tried += 1
            result = await self._try(up, mail_from, options, utf8, eight_bit, size, skipped)
            if isinstance(result, tuple):
                return result
            last = result
        if skipped:
            # Never refuse because of a breaker: the skipped upstream whose
            # back-off ends first gets this transaction's attempt anyway.
            up = min(skipped, key=lambda u: u.breaker.open_until)
            skipped.remove(up)
            if tried:
                self.stats["failovers"] += 1
            log.info("upstream %s tried although its circuit is %s: no other upstream took the transaction",
                     up.name, up.breaker.state)
            result = await self._try(up, mail_from, options, utf8, eight_bit, size, skipped)
            if isinstance(result, tuple):
                return result
            last = result
        return None, last

    async def _try(self, up: Upstream, mail_from: str, options: list[str], utf8: bool, eight_bit: bool,
                   size: int | None, skipped: list[Upstream]
                   ) -> tuple[UpstreamTransaction | None, Reply | Rendered] | Reply | Rendered:
        """MAIL FROM at one upstream: a (transaction or None, reply) tuple ends
        the failover (accepted, or refused with 5xx); a bare reply goes on to
        the next upstream."""
        last: Reply | Rendered = replies.UPSTREAM_UNAVAILABLE
        for attempt in range(2):
            conn = self._take_idle(up) if attempt == 0 else None
            fresh = conn is None
            if conn is None:
                got: bool | _Connection = self._reserve(up)
                if got is False:
                    got = await self._wait(up, self.settings.connection_wait)
                    if got is False:
                        self._deferred()
                        return None, replies.UPSTREAM_BUSY
                if isinstance(got, _Connection):
                    conn, fresh = got, False
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
                    self._drop(conn)
                if fresh:
                    log.warning("upstream %s unreachable: %s", up.name, str(exc) or type(exc).__name__)
                    self._failed(up, exc)
                    break  # next upstream
                continue  # a stale pooled connection: retry once with a fresh one
            except BaseException:
                if conn is not None:     # cancelled (the client left) mid-MAIL: not reusable
                    self._drop(conn)
                raise
            reply = replies.from_upstream(resp.code, resp.message)
            if resp.code == 421:       # closing the channel: as good as unreachable
                self._failed(up, SMTPResponseException(resp.code, resp.message))
                self._release(conn, reusable=False)
                return reply
            self._succeeded(up)        # it answered MAIL: alive, whatever it thinks of the sender
            if resp.code == 250:
                return UpstreamTransaction(self, conn, utf8, tuple(u.name for u in skipped)), replies.SENDER_OK
            if resp.code >= 500:
                # The upstream judged the sender: tell the client, no failover.
                await UpstreamTransaction(self, conn, utf8).close()
                return None, reply
            self._release(conn, reusable=True)
            return reply
        return last

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
