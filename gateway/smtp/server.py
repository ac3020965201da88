"""The SMTP front end: aiosmtpd's protocol with the gateway's session model.

aiosmtpd gives us connection handling, PROXY protocol parsing and the
command mechanics; this subclass owns the command loop (connection caps and
connect-phase checks before the greeting, enhanced status codes on every
reply, command and bogus-command budgets, 451 4.3.0 instead of 500 on our own
bugs, quiet client disconnects), STARTTLS through ``StreamWriter.start_tls``
(works the same under uvloop), AUTH with async password checks and failure
limits, and MAIL/RCPT/DATA driven through the check pipeline. Where an
accepted recipient and message go is delivery's business (gateway/delivery/:
the server opens a Handover at MAIL and drives it). What happens is
published on the event bus (gateway/core/events.py); the server writes no
log line and counts nothing but AUTH attempts itself. It sees only its
SmtpContext (smtp/context.py), never the Gateway.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import logging
import re
import ssl
import time

from typing import TYPE_CHECKING, Any

from aiosmtpd.proxy_protocol import get_proxy
from aiosmtpd.smtp import SMTP as AioSMTP

from ..accounts.identity import IdentityError, split_login
from ..core import replies
from ..core.address import AddressError, EnvelopeAddress, parse_params, parse_path
from ..core.events import Authenticated, Refusal, SessionEnded, TransactionEnded
from ..core.logsafe import text_safe
from ..core.replies import Rendered, Reply
from ..core.transaction import Outcome, Phase, Result, SessionInfo, TlsInfo, Transaction, Verdict, session_id
from ..state.deadline import within
from . import evict
from .context import SmtpContext

if TYPE_CHECKING:  # pragma: no cover
    from ..config import ListenerSettings
    from ..delivery import Handover

log = logging.getLogger("gateway.smtp")

_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")
# Replies aiosmtpd writes itself (QUIT, NOOP, HELP, ...): the enhanced code to add.
_DEFAULT_ENHANCED = {200: "2.0.0", 211: "2.0.0", 214: "2.0.0", 221: "2.0.0", 250: "2.0.0", 252: "2.5.0",
                     421: "4.3.0", 451: "4.3.0", 454: "4.7.0", 500: "5.5.2", 501: "5.5.4", 502: "5.5.1",
                     503: "5.5.1", 504: "5.5.4", 530: "5.7.0", 535: "5.7.8", 550: "5.0.0", 552: "5.3.4",
                     554: "5.3.0", 555: "5.5.4"}
_NO_ENHANCED = (220, 334, 354)

_AUTH_MECHANISMS = ("LOGIN", "PLAIN")


class _NoHooks:
    """aiosmtpd wants a handler object; the gateway overrides the commands instead."""


class GatewaySMTP(AioSMTP):
    def __init__(self, ctx: SmtpContext, listener: "ListenerSettings", tls_context: ssl.SSLContext | None):
        cfg = ctx.config
        self.ctx = ctx
        self.listener = listener
        self._starttls_context = tls_context if listener.tls == "starttls" else None
        super().__init__(
            _NoHooks(),
            data_size_limit=cfg.smtp.max_message_size,
            enable_SMTPUTF8=True,
            hostname=cfg.smtp.hostname,
            ident=cfg.smtp.banner,
            tls_context=self._starttls_context,
            timeout=cfg.smtp.idle_timeout,
            auth_require_tls=not listener.auth_without_tls,
            loop=asyncio.get_running_loop(),
        )
        self.gsession: SessionInfo | None = None
        self.tx: Transaction | None = None
        self.handover: Handover | None = None   # the open transaction's way out (delivery/)
        self._busy = False
        self._counted_ip: str | None = None
        self._closing = False
        self._greeted = False          # the 220 was sent: from here on the session may be idle
        self._preauth_timer = False    # the armed timer is preauth_timeout's (its own 421 on expiry)
        self.opened_at = 0.0           # monotonic time at connect (eviction closes the oldest first)
        self._lost = False

    # ------------------------------------------------------------------ plumbing
    @property
    def tls_active(self) -> bool:
        return self.gsession is not None and self.gsession.tls is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername") or ("", 0)
        sock = transport.get_extra_info("sockname") or ("", 0)
        self.gsession = SessionInfo(id=session_id(), listener=self.listener.name, peer_ip=_plain_ip(peer[0]),
                                    peer_port=peer[1], local_ip=_plain_ip(sock[0]), local_port=sock[1])
        ssl_obj = transport.get_extra_info("ssl_object")
        if ssl_obj is not None:  # implicit TLS listener
            self.gsession.tls = _tls_info(ssl_obj)
        self.opened_at = time.monotonic()   # not loop.time(): uvloop's is per loop turn, ms resolution
        self.ctx.sessions.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        # What the session holds is given back first (the upstream connections,
        # the connection count); the bookkeeping comes after and cannot raise.
        if self._lost:      # once: a failed STARTTLS handshake calls it itself
            return
        self._lost = True
        try:
            handover, self.handover = self.handover, None
            if handover is not None:
                # Nothing is relayed: the upstream transactions are reset and
                # their connections go back to the pool.
                handover.release_soon()
        finally:
            self.ctx.sessions.discard(self)
            if self._counted_ip is not None:
                self.ctx.connections.closed(self._counted_ip)
                self._counted_ip = None
            tx, self.tx = self.tx, None
            try:
                if tx is not None and tx.decision == "open":
                    tx.decision = "aborted"
                    self._record(tx.ledger, Outcome("session", Result.ERROR, "client disconnected"))
                    self._ended(tx)
                if self.gsession is not None:
                    self.ctx.events.publish(SessionEnded(self.gsession))
            except Exception:   # publish already shields every subscriber; this is the last net
                log.exception("session %s: bookkeeping at disconnect failed",
                              self.gsession.id if self.gsession else "?")
            super().connection_lost(error)

    def eof_received(self) -> bool | None:
        # aiosmtpd logs disconnects loudly; a client closing is normal.
        return super().eof_received()

    def _reset_timeout(self, duration: float | None = None) -> None:
        # Inside a transaction the client holds an upstream transaction open:
        # it gets the command timeout; between transactions the idle timeout.
        # Until it is authenticated no wait is longer than preauth_timeout.
        self._preauth_timer = False
        if duration is None:
            cfg = self.ctx.config.smtp
            duration = cfg.command_timeout if self.tx is not None else cfg.idle_timeout
            if cfg.preauth_timeout < duration and (self.gsession is None or self.gsession.account is None):
                duration = cfg.preauth_timeout
                self._preauth_timer = True
        super()._reset_timeout(duration)

    def _timeout_cb(self) -> None:
        preauth = self._preauth_timer
        if self.gsession is not None:
            self.gsession.ended = "preauth timeout" if preauth else "timeout"
        if self.transport is not None and not self.transport.is_closing():
            try:
                reply = replies.PREAUTH_TIMEOUT if preauth else replies.IDLE_TIMEOUT
                self._writer.write((reply.render() + "\r\n").encode())
            except Exception:  # pragma: no cover - transport already gone
                pass
        super()._timeout_cb()

    async def push(self, status: Any) -> None:
        if isinstance(status, (Reply, Rendered)):
            status = status.render()
        elif isinstance(status, str) and not _HAS_ENHANCED.match(status):
            status = _add_enhanced(status)
        await super().push(status)

    async def reply(self, reply: Reply | Rendered, detail: str | None = None) -> None:
        await self.push(reply.render(detail))

    async def handle_exception(self, error: Exception) -> str:
        # A bug on our side must never bounce a customer's mail: defer it.
        log.exception("session %s: unexpected error", self.gsession.id if self.gsession else "?")
        if self.tx is not None:
            self._record(self.tx.ledger, Outcome("session", Result.ERROR, f"internal error: {type(error).__name__}"))
        return replies.INTERNAL_ERROR.render()

    async def close_with(self, reply: Reply | Rendered) -> None:
        self._closing = True
        if self.gsession is not None and self.gsession.ended == "disconnect":
            self.gsession.ended = "quit" if reply is replies.BYE else f"closed with {reply.code} {reply.enhanced}"
        try:
            await self.push(reply)
        except Exception:
            pass
        if self.transport is not None:
            self.transport.close()

    # --------------------------------------------------------------- command loop
    async def _handle_client(self) -> None:  # noqa: C901 - the loop is the protocol
        sess = self.gsession
        assert sess is not None
        try:
            if self.listener.proxy_protocol:
                if not await self._read_proxy_header():
                    if self.transport is not None:
                        self.transport.close()
                    return
            self.ctx.connections.opened(sess.peer_ip)
            self._counted_ip = sess.peer_ip
            if self.ctx.draining():
                await self.close_with(replies.SHUTTING_DOWN)
                return
            sess.account = None
            net_account = self.ctx.accounts.account_for_ip(sess.peer_ip)
            if net_account is not None:
                sess.account = net_account
                sess.auth_method = "client-network"
            verdict = await self.ctx.pipeline.run(Phase.CONNECT, sess, sess.ledger)
            if not verdict.accepted:
                refusal, refusal_reply = _refusal(verdict)
                self.ctx.events.publish(Refusal(sess, refusal))
                await self.close_with(refusal_reply)
                return
            cfg = self.ctx.config.smtp
            evict.make_room(self.ctx.sessions, self.ctx.connections.total,
                            evict.threshold(cfg.max_connections, cfg.evict_unauthenticated_at), time.monotonic())
            await self.push(f"220 {self.hostname} {self.__ident__}")
            self._greeted = True
            self._reset_timeout()   # the first wait for a command (a client-network session: not preauth)
            await self._command_loop()
        except asyncio.CancelledError:
            # The client went away (or we are closing it): not an error.
            self._writer.close()
            raise
        except ConnectionError:
            # Not raised on: nobody awaits this task, and asyncio would log the
            # exception of a reset client ("Task exception was never retrieved").
            self._writer.close()
        finally:
            # However the loop ended, the session is over: a transport left
            # open (half-closed after the client's EOF) would hold the
            # session, its connection count and its socket for ever.
            # aiosmtpd cancels this task at EOF, but on Python 3.11 a
            # cancellation that lands in the loop turn an upstream reply
            # completes aiosmtplib's asyncio.wait_for is lost, and the loop
            # then meets the EOF itself.
            if self.transport is not None and not self.transport.is_closing():
                self.transport.close()

    async def _read_proxy_header(self) -> bool:
        sess = self.gsession
        assert sess is not None
        trusted = self.ctx.proxy_networks.get(self.listener.name, ())
        peer = ipaddress.ip_address(sess.peer_ip or "0.0.0.0")
        if not any(peer in net for net in trusted if net.version == peer.version):
            log.warning("PROXY header expected from untrusted peer %s: closing", sess.peer_ip)
            return False
        try:
            data = await within(get_proxy(self._reader), self.listener.proxy_timeout)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError):
            return False
        if not data.valid:
            log.warning("invalid PROXY header from %s: %s", sess.peer_ip, data.error)
            return False
        if data.src_addr is not None:  # None for PROXY UNKNOWN / LOCAL (health checks)
            sess.peer_ip = _plain_ip(str(data.src_addr))
            sess.peer_port = int(data.src_port or 0)
            sess.proxied = True
        return True

    async def _command_loop(self) -> None:
        cfg = self.ctx.config.smtp
        commands = 0
        bogus = 0
        reader = self._reader
        while self.transport is not None and not self._closing:
            if self.tx is None and self.ctx.draining():
                await self.close_with(replies.SHUTTING_DOWN)
                return
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.LimitOverrunError as exc:
                await self._discard_long_line(exc.consumed)
                await self.reply(replies.LINE_TOO_LONG)
                continue
            except asyncio.IncompleteReadError:
                return
            self._busy = True
            try:
                commands += 1
                if commands > cfg.max_commands:
                    await self.close_with(replies.TOO_MANY_COMMANDS)
                    return
                line = line.rstrip(b"\r\n")
                if b"\r" in line:
                    # "EHLO x<CR>AUTH PLAIN ...": one line to us, two to a client
                    # or MTA that ends lines at CR. Refused, as bare CR is in DATA.
                    await self.reply(replies.COMMAND_BARE_CR)
                    continue
                verb_bytes, _, arg_bytes = line.partition(b" ")
                try:
                    verb = verb_bytes.upper().decode("ascii")
                except UnicodeDecodeError:
                    verb = ""
                method = self._smtp_methods.get(verb) if verb.isalpha() else None
                if method is None:
                    bogus += 1
                    if bogus >= cfg.max_bogus_commands:
                        await self.close_with(replies.TOO_MANY_BOGUS)
                        return
                    await self.reply(replies.SYNTAX_ERROR)
                    continue
                arg: str | None
                arg_bytes = arg_bytes.strip()
                if not arg_bytes:
                    arg = None
                else:
                    arg = arg_bytes.decode("utf-8", "surrogateescape")
                self._reset_timeout()
                if (self.listener.require_tls and not self.tls_active
                        and verb in ("MAIL", "RCPT", "DATA", "AUTH")):
                    await self.reply(replies.TLS_REQUIRED)
                    continue
                await method(arg)
                self._reset_timeout()  # the wait for the next command starts now
            except (asyncio.CancelledError, ConnectionError):
                raise
            except asyncio.IncompleteReadError:
                return      # the client closed mid-command (mid-DATA, mid-AUTH): not our bug
            except Exception as error:  # our bug: defer, never bounce
                status = await self.handle_exception(error)
                await self.push(status)
            finally:
                self._busy = False

    async def _discard_long_line(self, consumed: int) -> None:
        reader = self._reader
        await reader.readexactly(consumed)
        while True:
            try:
                await reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as exc:
                await reader.readexactly(exc.consumed)

    # ------------------------------------------------------------ HELO / EHLO
    async def _greet(self, hostname: str | None, esmtp: bool) -> bool:
        if not hostname:
            await self.reply(replies.ARG_SYNTAX, "EHLO/HELO needs a host name")
            return False
        await self._reset_transaction()
        sess, aio = self.gsession, self.session
        assert sess is not None and aio is not None
        sess.helo = hostname[:255]
        sess.esmtp = esmtp
        aio.host_name = sess.helo
        aio.extended_smtp = esmtp
        verdict = await self.ctx.pipeline.run(Phase.HELO, sess, sess.ledger)
        if not verdict.accepted:
            refusal, refusal_reply = _refusal(verdict)
            self.ctx.events.publish(Refusal(sess, refusal))
            # A refused greeting is no greeting: MAIL must still answer 503 "send EHLO/HELO first".
            sess.helo = None
            aio.host_name = None
            await self.reply(refusal_reply, _client_detail(refusal))
            return False
        return True

    async def smtp_HELO(self, hostname: str | None) -> None:
        if await self._greet(hostname, esmtp=False):
            await self.push(f"250 {self.hostname}")

    async def smtp_EHLO(self, hostname: str | None) -> None:
        if not await self._greet(hostname, esmtp=True):
            return
        lines = [self.hostname, f"SIZE {self.ctx.config.smtp.max_message_size}", "8BITMIME", "SMTPUTF8",
                 "PIPELINING", "ENHANCEDSTATUSCODES"]
        if self._starttls_context is not None and not self.tls_active:
            lines.append("STARTTLS")
        if self._auth_offered():
            lines.append("AUTH " + " ".join(_AUTH_MECHANISMS))
        out = [f"250-{x}" for x in lines[:-1]] + [f"250 {lines[-1]}"]
        self._writer.write(("\r\n".join(out) + "\r\n").encode("ascii"))
        await self._writer.drain()

    def _auth_offered(self) -> bool:
        return self.tls_active or self.listener.auth_without_tls

    # ----------------------------------------------------------------- STARTTLS
    async def smtp_STARTTLS(self, arg: str | None) -> None:
        sess, aio = self.gsession, self.session
        assert sess is not None and aio is not None
        if arg:
            await self.reply(replies.ARG_SYNTAX, "STARTTLS takes no argument")
            return
        if self.tls_active:
            await self.reply(replies.TLS_ALREADY)
            return
        if self._starttls_context is None:
            await self.reply(replies.TLS_NOT_AVAILABLE)
            return
        if not sess.helo:
            await self.reply(replies.NEED_HELO)
            return
        # RFC 3207 4.2 / CVE-2011-0411: anything the client pipelined after
        # STARTTLS was sent in clear text and must not be executed.
        self._reader._buffer.clear()  # type: ignore[attr-defined]
        await self.push(replies.START_TLS)
        try:
            await self._writer.start_tls(self._starttls_context,
                                         ssl_handshake_timeout=self.ctx.config.tls.handshake_timeout)
        except (ssl.SSLError, OSError, asyncio.TimeoutError, ConnectionError) as exc:
            log.info("session %s: TLS handshake failed: %s", sess.id, exc)
            if self.transport is not None:
                self.transport.close()
            # The TLS layer tells this protocol connection_lost only after a
            # completed handshake: here the session ends by itself, or it would
            # hold its connection count and its place among the sessions for ever.
            self.connection_lost(None)
            raise ConnectionResetError("TLS handshake failed") from None
        self.transport = transport = self._writer.transport
        ssl_obj = transport.get_extra_info("ssl_object")
        sess.tls = _tls_info(ssl_obj)
        aio.ssl = {"ssl_object": ssl_obj}
        # RFC 3207 4.2: the client must greet again; forget what was said before.
        sess.helo = None
        aio.host_name = None
        await self._reset_transaction()

    # --------------------------------------------------------------------- AUTH
    async def smtp_AUTH(self, arg: str | None) -> None:
        sess, aio = self.gsession, self.session
        assert sess is not None and aio is not None
        if not sess.esmtp:
            await self.reply(replies.BAD_SEQUENCE, "send EHLO first")
            return
        if not self._auth_offered():
            await self.reply(replies.AUTH_NEEDS_TLS)
            return
        if sess.auth_method == "smtp-auth":
            await self.reply(replies.AUTH_ALREADY)
            return
        if self.tx is not None:
            await self.reply(replies.BAD_SEQUENCE, "AUTH not allowed during a mail transaction")
            return
        if not arg:
            await self.reply(replies.ARG_SYNTAX, "AUTH needs a mechanism")
            return
        args = arg.split()
        mechanism = args[0].upper()
        if mechanism not in _AUTH_MECHANISMS or len(args) > 2:
            await self.reply(replies.AUTH_MECHANISM)
            return
        limiter = self.ctx.auth_limiter
        if await limiter.ip_blocked(sess.peer_ip):
            await self._refuse_auth(Outcome("auth", Result.FAIL, "too many failures from this IP",
                                            replies.AUTH_TOO_MANY_FAILURES, Phase.AUTH))
            return
        creds = await (self._auth_plain(args) if mechanism == "PLAIN" else self._auth_login(args))
        if creds is None:
            return  # the client was answered already (aborted, bad base64, ...)
        login, password = creds
        login_text = login.decode("utf-8", "replace")
        # A sub-login "account/user" (accounts/identity.py) authenticates as the
        # account with its password; failures count against the account, so
        # rotating sub-logins buys no extra guesses.
        try:
            account_name, identity = split_login(login_text, self.ctx.config.identity.max_length)
        except IdentityError as exc:
            await self._refuse_auth(Outcome("auth", Result.FAIL, f"bad sub-login {login_text}: {exc}",
                                            replies.AUTH_BAD_IDENTITY, Phase.AUTH, login_text))
            return
        if await limiter.account_blocked(account_name):
            await self._refuse_auth(Outcome("auth", Result.FAIL, f"too many failures for {account_name}",
                                            replies.AUTH_TOO_MANY_FAILURES, Phase.AUTH, login_text))
            return
        try:
            account = await self.ctx.accounts.authenticate(account_name, password)
        except Exception as exc:
            # a database that is down or overran its deadline: expected, no traceback
            log.warning("AUTH for %s from %s: account store unavailable (%s)", text_safe(login_text, 100),
                        sess.peer_ip, type(exc).__name__)
            await self.reply(replies.AUTH_TEMP_FAILURE)
            return
        if account is None:
            await limiter.failed(sess.peer_ip, account_name)
            await self._refuse_auth(Outcome("auth", Result.FAIL, f"bad credentials for {login_text}",
                                            replies.AUTH_INVALID, Phase.AUTH, login_text))
            return
        if account.suspended:
            await self._refuse_auth(Outcome("auth", Result.FAIL, f"account {account.name} suspended",
                                            replies.AUTH_SUSPENDED, Phase.AUTH, login_text))
            return
        sess.account = account
        sess.auth_method = "smtp-auth"
        sess.auth_login = login_text
        sess.identity = identity
        aio.authenticated = True
        who = f"account {account.name}" + (f" identity {identity}" if identity is not None else "")
        self._record(sess.ledger, Outcome("auth", Result.PASS, f"{who} via {mechanism}",
                                          phase=Phase.AUTH, item=login_text))
        self.ctx.events.publish(Authenticated(sess))
        await self.reply(replies.AUTH_OK)

    async def _refuse_auth(self, outcome: Outcome) -> None:
        sess = self.gsession
        assert sess is not None and outcome.reply is not None   # every AUTH refusal is made with its reply
        self._record(sess.ledger, outcome)
        self.ctx.events.publish(Refusal(sess, outcome))
        await self.reply(outcome.reply)

    async def _challenge(self, prompt: bytes) -> bytes | None:
        await self.push(b"334 " + base64.b64encode(prompt))
        try:
            line = (await self._reader.readuntil(b"\n")).strip()
        except asyncio.LimitOverrunError as exc:
            # RFC 4954 4: one reply for the whole over-long line, read to its end
            await self._discard_long_line(exc.consumed)
            await self.reply(replies.AUTH_LINE_TOO_LONG)
            return None
        if line == b"*":
            await self.reply(replies.AUTH_ABORTED)
            return None
        return await self._b64(line)

    async def _b64(self, data: str | bytes) -> bytes | None:
        """Decoded base64, or None after a 501 (bad base64, or not even ASCII)."""
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):   # ValueError: a str holding non-ASCII characters
            await self.reply(replies.AUTH_BAD_BASE64)
            return None

    async def _auth_plain(self, args: list[str]) -> tuple[bytes, bytes] | None:
        if len(args) == 1:
            blob = await self._challenge(b"")
            if blob is None:
                return None
        else:
            blob = await self._b64(args[1])
            if blob is None:
                return None
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await self.reply(replies.AUTH_BAD_BASE64, "PLAIN needs authzid NUL authcid NUL password")
            return None
        authzid, login, password = parts
        if authzid and authzid != login:
            # Acting as another account is not a thing customers may do.
            await self.reply(replies.AUTH_INVALID)
            return None
        return login, password

    async def _auth_login(self, args: list[str]) -> tuple[bytes, bytes] | None:
        login: bytes | None
        if len(args) == 2:
            login = await self._b64(args[1])
            if login is None:
                return None
        else:
            login = await self._challenge(b"Username:")
            if login is None:
                return None
        password = await self._challenge(b"Password:")
        if password is None:
            return None
        return login, password

    # ------------------------------------------------------------- transactions
    async def _reset_transaction(self) -> None:
        if self.tx is not None and self.tx.decision == "open":
            # Given up by the client: after every recipient was refused it is
            # a refusal, otherwise an abort (nothing was relayed either way).
            self.tx.decision = "refused" if not self.tx.recipients and self.tx.refused_recipients else "aborted"
            self._ended(self.tx)
        handover, self.handover = self.handover, None
        if handover is not None:
            await handover.release()
        self.tx = None

    def _ended(self, tx: Transaction) -> None:
        self.ctx.events.publish(TransactionEnded(tx))

    def _record(self, ledger: list[Outcome], outcome: Outcome) -> None:
        """An outcome decided here rather than by a check (syntax, AUTH)."""
        ledger.append(outcome)
        self.ctx.events.outcome(outcome)

    def _refuse_tx(self, tx: Transaction, outcome: Outcome) -> None:
        """A transaction refused at MAIL: logged, told, over."""
        assert outcome.reply is not None   # a refusal refuses with a reply
        tx.decision = "deferred" if outcome.reply.is_transient else "refused"
        tx.final_reply = outcome.reply
        self.ctx.events.publish(Refusal(tx.session, outcome, tx))
        self._ended(tx)

    async def smtp_RSET(self, arg: str | None) -> None:
        if arg:
            await self.reply(replies.ARG_SYNTAX, "RSET takes no argument")
            return
        await self._reset_transaction()
        await self.reply(replies.RESET)

    async def smtp_NOOP(self, arg: str | None) -> None:
        await self.reply(replies.NOOP)

    async def smtp_QUIT(self, arg: str | None) -> None:
        await self._reset_transaction()
        await self.close_with(replies.BYE)

    async def smtp_VRFY(self, arg: str | None) -> None:
        await self.reply(replies.VRFY_NOTHING)

    async def smtp_EXPN(self, arg: str | None) -> None:
        await self.reply(replies.EXPN_DISABLED)

    async def smtp_HELP(self, arg: str | None) -> None:
        await self.reply(replies.HELP)

    async def smtp_MAIL(self, arg: str | None) -> None:
        sess = self.gsession
        assert sess is not None
        if not sess.helo:
            await self.reply(replies.NEED_HELO)
            return
        if self.tx is not None:
            await self.reply(replies.NESTED_MAIL)
            return
        if not arg or arg[:5].upper() != "FROM:":
            await self.reply(replies.ARG_SYNTAX, "MAIL FROM:<address>")
            return
        if sess.transactions >= self.ctx.config.smtp.max_transactions:
            await self.close_with(replies.TOO_MANY_TRANSACTIONS)
            return
        if self.listener.require_auth and sess.account is None:
            sess.ledger.append(Outcome("mail_auth_required", Result.FAIL, "submission listener needs AUTH",
                                       replies.AUTH_REQUIRED, Phase.MAIL))
            await self.reply(replies.AUTH_REQUIRED)
            return
        tx = Transaction(session=sess)
        try:
            address, rest = parse_path(arg[5:], utf8=True, allow_null=True)
            params = parse_params(rest) if sess.esmtp else ({} if not rest else None)
            if params is None:
                raise AddressError("syntax", "parameters need EHLO")
        except AddressError as exc:
            reply = replies.RELAY_TRICK if exc.kind == "trick" else replies.BAD_SENDER_SYNTAX
            outcome = Outcome("mail_syntax", Result.FAIL, exc.detail, reply, Phase.MAIL)
            self._record(tx.ledger, outcome)
            self._refuse_tx(tx, outcome)
            await self.reply(reply, exc.detail)
            return
        problem = _check_mail_params(params, address)
        if problem is not None:
            reply, detail = problem
            outcome = Outcome("mail_syntax", Result.FAIL, detail, reply, Phase.MAIL)
            self._record(tx.ledger, outcome)
            self._refuse_tx(tx, outcome)
            await self.reply(reply, detail)
            return
        tx.mail_from = address
        tx.mail_params = params
        self._record(tx.ledger, Outcome("mail_syntax", Result.PASS, phase=Phase.MAIL))
        verdict = await self.ctx.pipeline.run(Phase.MAIL, tx, tx.ledger, address)
        tx.mark("mail")
        if not verdict.accepted:
            refusal, refusal_reply = _refusal(verdict)
            self._refuse_tx(tx, refusal)
            if refusal_reply.code == 421:   # a check closes the session (mail_account_connections)
                await self.close_with(refusal_reply)
                return
            await self.reply(refusal_reply, _client_detail(refusal))
            return
        sess.transactions += 1
        self.tx = tx
        self.handover = self.ctx.delivery.open(tx)
        await self.reply(replies.SENDER_OK)

    async def smtp_RCPT(self, arg: str | None) -> None:
        tx = self.tx
        if tx is None:
            await self.reply(replies.NEED_MAIL)
            return
        if not arg or arg[:3].upper() != "TO:":
            await self.reply(replies.ARG_SYNTAX, "RCPT TO:<address>")
            return
        try:
            # Parsed with UTF-8 allowed so a non-ASCII address without SMTPUTF8
            # gets its own precise reply (5.6.7) below instead of a syntax error.
            address, rest = parse_path(arg[3:], utf8=True, allow_null=False)
            params = parse_params(rest)
        except AddressError as exc:
            reply = replies.RELAY_TRICK if exc.kind == "trick" else replies.BAD_RECIPIENT_SYNTAX
            await self._refuse_rcpt(tx, "rcpt_syntax", reply, exc.detail, arg[3:].strip()[:300])
            return
        if address.needs_smtputf8 and not tx.smtputf8:
            await self._refuse_rcpt(tx, "rcpt_syntax", replies.SMTPUTF8_REQUIRED,
                                    "non-ASCII address without SMTPUTF8", address.addr)
            return
        if params:
            await self._refuse_rcpt(tx, "rcpt_syntax", replies.PARAM_UNKNOWN, ", ".join(params), address.addr)
            return
        label = address.addr
        handover = self.handover
        assert handover is not None
        if self._reader._buffer and handover.wants_prefetch:  # type: ignore[attr-defined]
            handover.prefetch(bytes(self._reader._buffer))  # type: ignore[attr-defined]
        verdict = await self.ctx.pipeline.run(Phase.RCPT, tx, tx.ledger, address, item_label=label)
        if not verdict.accepted:
            refusal, refusal_reply = _refusal(verdict)
            tx.refused_recipients += 1
            self.ctx.events.publish(Refusal(tx.session, refusal, tx, label))
            if refusal_reply.code == 421:   # a check closes the session (rcpt_harvest): RFC 5321 3.8
                await self._reset_transaction()
                await self.close_with(refusal_reply)
                return
            await self.reply(refusal_reply, _client_detail(refusal))
            return
        # Where the recipient goes (upstream, list copy, the gateway's own
        # mailboxes) is delivery's business; the client gets its answer.
        await self.reply(await handover.rcpt(address, params))

    async def _refuse_rcpt(self, tx: Transaction, check: str, reply: Reply, detail: str, label: str) -> None:
        tx.refused_recipients += 1
        outcome = Outcome(check, Result.FAIL, detail, reply, Phase.RCPT, label)
        self._record(tx.ledger, outcome)
        self.ctx.events.publish(Refusal(tx.session, outcome, tx, label))
        await self.reply(reply, detail)

    async def smtp_DATA(self, arg: str | None) -> None:
        tx = self.tx
        if tx is None:
            await self.reply(replies.NEED_MAIL)
            return
        if not tx.recipients:
            await self.reply(replies.NEED_RCPT)
            return
        if arg:
            await self.reply(replies.ARG_SYNTAX, "DATA takes no argument")
            return
        await self.push(replies.START_DATA.render().replace("354  ", "354 "))
        cfg = self.ctx.config.smtp
        # The idle timer a little later than the DATA deadline, so the client
        # hears that its DATA timed out, not that it was idle.
        self._reset_timeout(cfg.data_timeout + 5.0)
        try:
            async with asyncio.timeout(cfg.data_timeout):
                message, octets = await self._read_data(cfg.max_message_size)
        except TimeoutError:
            tx.decision = "aborted"
            self._record(tx.ledger, Outcome("session", Result.ERROR, "DATA timeout"))
            self._ended(tx)
            await self.close_with(replies.DATA_TIMEOUT)
            return
        self._reset_timeout()
        tx.mark("data_received")
        tx.data_octets = octets
        tx.message = message
        verdict = await self.ctx.pipeline.run(Phase.DATA, tx, tx.ledger)
        tx.mark("checked")
        if not verdict.accepted:
            refusal, refusal_reply = _refusal(verdict)
            self.ctx.events.publish(Refusal(tx.session, refusal, tx))
            await self._finish(refusal_reply, _client_detail(refusal))
            return
        handover, self.handover = self.handover, None
        assert handover is not None
        final = await handover.deliver()
        self.handover = handover   # settled and released by _finish, after the reply
        await self._finish(final)

    async def _finish(self, reply: Reply | Rendered, detail: str | None = None) -> None:
        """The client's answer to DATA, then the bookkeeping: nothing runs
        between the upstream's answer and the client's reply but the reply
        itself, and nothing the bookkeeping does can change it."""
        tx, self.tx = self.tx, None
        assert tx is not None   # DATA's transaction, still open
        handover, self.handover = self.handover, None   # delivered (to settle) or open (refused)
        tx.final_reply = reply
        if tx.decision == "open":
            tx.decision = "relayed" if reply.is_positive else ("deferred" if reply.is_transient else "refused")
        tx.mark("done")
        written = False
        try:
            gone = self.transport is None or self.transport.is_closing()
            await self.reply(reply, detail)
            written = not gone
        finally:
            if handover is not None:
                handover.settle(written)   # the handover's outcomes and duplicate windows (client_gone: not written)
            tx.message = None
            self._ended(tx)
            if handover is not None:
                await handover.release()

    async def _read_data(self, limit: int) -> tuple[bytes | None, int]:
        """Read the DATA stream up to CRLF.CRLF; return (unstuffed bytes, octets).

        The terminator is only ever <CRLF>.<CRLF>: variants with bare CR or LF
        (SMTP smuggling) are message content and stay in it, where the wire
        check refuses them. Past ``limit`` the bytes are discarded but the
        stream is read to its end, so the 552 reply lands after it.
        """
        reader = self._reader
        # The CRLF that ended the DATA command line is the first half of the
        # terminator when the message is empty; put it back in front.
        reader._buffer[0:0] = b"\r\n"  # type: ignore[attr-defined]
        saved_limit = reader._limit  # type: ignore[attr-defined]
        reader._limit = limit + (limit >> 3) + 1024  # type: ignore[attr-defined]
        dropped = 0
        try:
            while True:
                try:
                    chunk = await reader.readuntil(b"\r\n.\r\n")
                    break
                except asyncio.LimitOverrunError as exc:
                    # Too big: discard what we have (keeping 4 bytes in case the
                    # terminator straddles the cut) and go on reading.
                    n = max(0, exc.consumed - 4)
                    await reader.readexactly(n)
                    dropped += n
                    reader._limit = 1 << 20  # type: ignore[attr-defined]
        finally:
            reader._limit = saved_limit  # type: ignore[attr-defined]
        if dropped:
            return None, dropped + len(chunk)
        body = chunk[2:-3].replace(b"\r\n.", b"\r\n")
        if body.startswith(b"."):  # the first line lost its leading CRLF above
            body = body[1:]
        return body, len(body)

    # --------------------------------------------------------------- eviction
    @property
    def session_info(self) -> SessionInfo | None:
        return self.gsession

    def evictable(self) -> bool:
        """Idle and unauthenticated (smtp/evict.py): greeted, waiting for a
        command with none arriving, no transaction, no account."""
        return (self._greeted and not self._busy and not self._closing and self.tx is None
                and self.gsession is not None and self.gsession.account is None
                and self.transport is not None and not self.transport.is_closing()
                and not self._reader._buffer)  # type: ignore[attr-defined]

    def evict(self) -> None:
        """421 4.7.0 and close, to make room for a newcomer; the slot is free at once."""
        if self.transport is None or self.transport.is_closing():
            return
        self._closing = True
        if self._counted_ip is not None:
            self.ctx.connections.closed(self._counted_ip)
            self._counted_ip = None
        self._close_now(replies.EVICTED_UNAUTHENTICATED, "evicted")

    def _close_now(self, reply: Reply, ended: str) -> None:
        """Write ``reply`` and close, outside the command loop (no await: from
        a callback or another session's task); nothing if already closing."""
        if self.transport is None or self.transport.is_closing():
            return
        assert self.gsession is not None   # made in connection_made, before the session is listed
        self.gsession.ended = ended
        try:
            self._writer.write((reply.render() + "\r\n").encode())
        except Exception:  # the transport is going already
            pass
        self.transport.close()

    # --------------------------------------------------------------- shutdown
    def shutdown_if_idle(self) -> bool:
        """Close with 421 4.3.2 unless a transaction is in flight; True if closed."""
        if self.tx is None and not self._busy:
            self._close_now(replies.SHUTTING_DOWN, "shutdown")
            return True
        return False

    def force_close(self) -> None:
        self._close_now(replies.SHUTTING_DOWN, "shutdown")


def _refusal(verdict: Verdict) -> tuple[Outcome, Reply | Rendered]:
    """A refused verdict's refusal and its reply (the pipeline refuses only
    with an outcome whose reply refuses, so both are there)."""
    refusal = verdict.refusal
    assert refusal is not None and refusal.reply is not None
    return refusal, refusal.reply


def _client_detail(refusal: Outcome) -> str | None:
    """What of a refusal's detail the client sees: none for our own internal
    errors (a check that raised or overran its deadline): the exception's
    name and the deadline are for the ledger and the log, not the reply."""
    if refusal.reply is replies.INTERNAL_ERROR:
        return None
    return refusal.detail or None


def _check_mail_params(params: dict[str, str | bool], address: EnvelopeAddress) -> tuple[Reply, str] | None:
    for key, value in params.items():
        if key == "SIZE":
            if not isinstance(value, str) or not value.isdigit():
                return replies.ARG_SYNTAX, "SIZE needs a number"
        elif key == "BODY":
            if not isinstance(value, str) or value.upper() not in ("7BIT", "8BITMIME"):
                return replies.ARG_SYNTAX, "BODY is 7BIT or 8BITMIME"
            params[key] = value.upper()
        elif key == "SMTPUTF8":
            if value is not True:
                return replies.ARG_SYNTAX, "SMTPUTF8 takes no value"
        elif key == "AUTH":
            continue  # RFC 4954 5: accepted and ignored
        else:
            return replies.PARAM_UNKNOWN, key
    if address.needs_smtputf8 and not params.get("SMTPUTF8"):
        return replies.SMTPUTF8_REQUIRED, "non-ASCII sender without SMTPUTF8"
    return None


def _add_enhanced(status: str) -> str:
    code_text = status[:3]
    if not code_text.isdigit():
        return status
    code = int(code_text)
    if code in _NO_ENHANCED:
        return status
    enhanced = _DEFAULT_ENHANCED.get(code, f"{code_text[0]}.0.0")
    rest = status[4:]
    sep = status[3:4] or " "
    # aiosmtpd's own texts begin with "Error: "; keep the words, drop the noise.
    if rest.startswith("Error: "):
        rest = rest[7:]
    return f"{code_text}{sep}{enhanced} {rest}".rstrip()


def _plain_ip(ip: str) -> str:
    try:
        addr = ipaddress.ip_address(ip.split("%")[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def _tls_info(ssl_obj: Any) -> TlsInfo | None:
    if ssl_obj is None:
        return None
    cipher = ssl_obj.cipher()
    return TlsInfo(version=ssl_obj.version() or "", cipher=cipher[0] if cipher else "")


__all__ = ["GatewaySMTP"]

