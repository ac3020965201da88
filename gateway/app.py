"""Composition root: builds stores, counters, relay, checks and servers from
the config; start-up, readiness and graceful shutdown."""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import ssl
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Callable, Iterator, MutableSet, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

from . import dev
from .accounts.identity import identity_secret
from .accounts.limiter import AuthLimiter
from .accounts.proof import DomainProofChecker
from .accounts.store import AccountStore
from .blocklist.service import BlockList
from .strikes.violations import ViolationRecorder
from .checks import factories
from .config import Config, ConfigError, ListenError
from .core.events import EventBus
from .delivery import Delivery, Finalizer, local_handlers
from .dns.dnsbl import Dnsbl
from .dns.resolver import Resolver
from .metrics import Metrics
from .pipeline import Pipeline, build_pipeline
from .relay.devsink import DevSink
from .relay.maildir import MaildirWriter
from .relay.pool import RelayPool
from .services import Services
from .smtp.context import Network, Session, SmtpContext
from .smtp.evict import ConnectOrder
from .smtp.limits import ConnectionTracker
from .smtp.server import GatewaySMTP
from .state.counters import Counters, MemoryCounters, RedisCounters
from .state.distinct import DistinctCounter, distinct_for
from .state.ratelimit import RateLimiter, limiter_for
from .storage.db import create_engine, migrate
from .txlog import TransactionLog
from .state.deadline import within

if TYPE_CHECKING:  # pragma: no cover
    import uvicorn

    from .registry.service import RegistryService   # imported where it is made, in start()

log = logging.getLogger("gateway")

def _endpoint(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def bind_listening_socket(address: str, port: int) -> socket.socket:
    """A bound, listening TCP socket (SO_REUSEADDR; IPv6 only for an IPv6 address)."""
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    return socket.create_server((address, port), family=family, backlog=1024)


def build_tls_context(config: Config) -> ssl.SSLContext | None:
    if not config.tls.cert_file:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if config.tls.min_version == "TLSv1.3" else ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(config.tls.cert_file, config.tls.key_file)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(config.source, "tls.cert_file", f"cannot load certificate/key: {exc}") from None
    return ctx


class Gateway:
    def __init__(self, config: Config, *, clock: Callable[[], float] = time.time,
                 txlog: TransactionLog | None = None):
        self.config = config
        self.clock = clock
        self.metrics = Metrics(lambda: self)
        self.txlog = txlog      # made in start(), after the ports are bound, when not given
        self.connections = ConnectionTracker()
        self.events = EventBus()     # outcomes, refusals, ends of transactions and sessions
        self.sessions: MutableSet[Session] = ConnectOrder()   # oldest first (smtp/evict.py)
        self.draining = False
        self.ready = False
        self.ports: dict[str, int] = {}
        self.http_port: int | None = None
        self._servers: list[asyncio.base_events.Server] = []
        self._http: uvicorn.Server | None = None
        self._http_task: asyncio.Task | None = None
        self._devsink: DevSink | None = None
        self._proxy_nets: dict[str, list[Network]] = {}
        self.engine: AsyncEngine | None = None
        self.accounts: AccountStore | None = None
        self.blocklist: BlockList | None = None
        self.violations: ViolationRecorder | None = None
        self.counters: Counters | None = None
        self.rate_limiter: RateLimiter | None = None
        self.distinct: DistinctCounter | None = None
        self.relay: RelayPool | None = None
        self.pipeline: Pipeline | None = None
        self.services: Services | None = None
        self.registry: RegistryService | None = None
        self.resolver: Resolver | None = None
        self.dnsbl: Dnsbl | None = None
        self.proof_checker: DomainProofChecker | None = None
        self.auth_limiter: AuthLimiter | None = None
        self.service_mail: MaildirWriter | None = None
        self.delivery: Delivery | None = None
        self.smtp_context: SmtpContext | None = None   # what the SMTP sessions see, built in start()
        self._sockets: dict[str, socket.socket] = {}    # bound first, served later
        self._http_socket: socket.socket | None = None
        self.dev_certificate_made = False
        self.stopped = asyncio.Event()

    # ------------------------------------------------------------------ start-up
    def _bind(self) -> None:
        """Bind every listening address before anything is created (database,
        outbox, key files): a busy port is one line naming address:port and
        what to change, and the working directory stays as it was."""
        cfg = self.config
        wanted: list[tuple[str | None, str, int, str]] = [(lst.name, lst.address, lst.port,
                   "--smtp-port" if cfg.dev.enabled else f"listeners[{i}].port")
                  for i, lst in enumerate(cfg.listeners)]
        if cfg.http.enabled:
            wanted.append((None, cfg.http.address, cfg.http.port, "--http-port" if cfg.dev.enabled else "http.port"))
        try:
            for name, address, port, key in wanted:
                try:
                    sock = bind_listening_socket(address, port)
                except OSError as exc:
                    what = "SMTP" if name is not None else "HTTP"
                    why = os.strerror(exc.errno) if exc.errno else str(exc)
                    problem = f"cannot listen on {_endpoint(address, port)} ({what}): {why}"
                    hint = (f"start with {key} PORT" if cfg.dev.enabled
                            else f"change {key} in {cfg.source}") + ", or stop what listens there"
                    raise ListenError(cfg.source, key, problem, hint) from None
                if name is None:
                    self._http_socket = sock
                else:
                    self._sockets[name] = sock
        except BaseException:
            self._close_sockets()
            raise

    def _close_sockets(self) -> None:
        for sock in [*self._sockets.values(), self._http_socket]:
            if sock is not None:
                sock.close()
        self._sockets.clear()
        self._http_socket = None

    async def start(self) -> None:
        dev.check_loopback(self.config)
        self._bind()
        try:
            await self._start_bound()
        except BaseException:
            self._close_sockets()      # those not yet handed to a server
            raise

    async def _start_bound(self) -> None:
        cfg = self.config
        if self.txlog is None:
            self.txlog = TransactionLog(cfg.log.transactions)
        # Metrics first: a transaction is counted before its line is written.
        self.metrics.subscribe(self.events)
        self.txlog.subscribe(self.events)
        if cfg.smtp.service_mailboxes:
            self.service_mail = MaildirWriter(cfg.smtp.service_maildir)
        if cfg.dev.enabled and cfg.tls.cert_file:
            self.dev_certificate_made = dev.certificate(cfg)
        tls_context = build_tls_context(cfg)
        from .registry.service import registry_secret, require_secret
        registry_key = registry_secret(cfg)
        require_secret(cfg, registry_key)   # a missing registry key fails before anything starts
        # The key of the opaque identity in the Received header (accounts/identity.py).
        identity_key = identity_secret(cfg.identity, registry_key)
        st = cfg.storage
        self.engine = create_engine(st.url, connect_timeout=st.connect_timeout, command_timeout=st.command_timeout,
                                    pool_timeout=st.pool_timeout)
        await migrate(self.engine)
        self.accounts = AccountStore(self.engine, scrypt_n=cfg.auth.scrypt_n, clock=self.clock,
                                     max_concurrent_verifications=cfg.auth.max_concurrent_verifications,
                                     db_timeout=cfg.storage.connect_timeout)
        await self.accounts.start()
        self.blocklist = BlockList(self.engine, clock=self.clock)   # P-BLOCK, polled for changes
        await self.blocklist.start()
        # P-STRIKE: every Violation a check publishes, stored (batched, off the reply path).
        self.violations = ViolationRecorder(self.engine, self.events, cfg.strikes.class_of, clock=self.clock,
                                            node=cfg.smtp.hostname, timeout=min(5.0, st.command_timeout))
        await self.violations.start()
        if cfg.counters.backend == "redis":
            c = cfg.counters
            self.counters = RedisCounters(c.redis_url, c.key_prefix, self.clock, timeout=c.timeout,
                                          expected_nodes=c.expected_nodes, retry_interval=c.retry_interval,
                                          retry_max=c.retry_max)
        else:
            self.counters = MemoryCounters(self.clock)
        # Rate limits (issue 12) on the same backend: in Redis with the
        # counters' client, deadline and fallback, else in memory.
        self.rate_limiter = limiter_for(self.counters, self.clock)
        # Distinct recipients per fingerprint (bulk and repeat detectors), same backend.
        self.distinct = distinct_for(self.counters, self.clock)
        self.auth_limiter = AuthLimiter(self.counters, cfg.auth.max_failures_per_ip,
                                        cfg.auth.max_failures_per_account, cfg.auth.failure_window,
                                        limiter=self.rate_limiter, lockout_max=cfg.auth.lockout_max,
                                        lockout_memory=cfg.auth.lockout_memory)
        # The resolver's shared DNS cache lives in the counters' Redis (same
        # URL): it borrows their client, which the "counters" shutdown step
        # closes after the resolver's.
        shared_dns = (self.counters.client
                      if isinstance(self.counters, RedisCounters) and cfg.dnsbl.shared_cache else None)
        self.resolver = Resolver(cfg.dns, redis=shared_dns,
                                 zone_file=cfg.dev.zone_file if cfg.dev.enabled else None)
        self.dnsbl = Dnsbl(cfg.dnsbl, self.resolver, on_alert=self._dnsbl_alert)
        self.dnsbl.start()
        self.proof_checker = DomainProofChecker(self.accounts, self.resolver, cfg.accounts)
        self.proof_checker.start()
        self.relay = RelayPool(cfg.relay, cfg.smtp.hostname)
        if cfg.dev.enabled:
            self._devsink = DevSink(cfg.dev.outbox)
            await dev.start_upstream(self._devsink, self.relay, self.accounts)
        await self.relay.start()
        from .registry.service import build_registry
        self.registry = build_registry(cfg, self.engine, relay=self.relay, accounts=self.accounts, clock=self.clock)
        await self.registry.start()
        self.services = Services(config=cfg, accounts=self.accounts, counters=self.counters, registry=self.registry,
                                 rate_limiter=self.rate_limiter,
                                 distinct=self.distinct,
                                 connections=self.connections, clock=self.clock,
                                 resolver=self.resolver, dnsbl=self.dnsbl, blocklist=self.blocklist,
                                 events=self.events)
        self.pipeline = build_pipeline(cfg.checks.order(), factories(self.services),
                                       on_outcome=self.events.outcome, settings=cfg.checks)
        self.delivery = Delivery(self.relay, Finalizer(cfg.smtp.hostname, cfg.smtp.trace_header, self.clock,
                                                         strip_fields=cfg.identity.field_names,
                                                         identity_key=identity_key),
                                 local_handlers(self.service_mail, self.registry), self.events, self.registry)
        for listener in cfg.listeners:
            self._proxy_nets[listener.name] = [ipaddress.ip_network(n, strict=False)
                                               for n in listener.proxy_trusted]
        ctx = self.smtp_context = SmtpContext(
            config=cfg, pipeline=self.pipeline, accounts=self.accounts, auth_limiter=self.auth_limiter,
            connections=self.connections, delivery=self.delivery, events=self.events,
            draining=lambda: self.draining, proxy_networks=self._proxy_nets, sessions=self.sessions)
        loop = asyncio.get_running_loop()
        for listener in cfg.listeners:
            if listener.tls != "none" and tls_context is None:
                raise ConfigError(cfg.source, "tls.cert_file", f"listener {listener.name} needs a certificate")
            implicit = listener.tls == "implicit"
            server = await loop.create_server(
                (lambda lst=listener: GatewaySMTP(ctx, lst, tls_context)),
                sock=self._sockets.pop(listener.name),
                ssl=tls_context if implicit else None,
                ssl_handshake_timeout=cfg.tls.handshake_timeout if implicit else None,
                backlog=1024)
            self._servers.append(server)
            self.ports[listener.name] = server.sockets[0].getsockname()[1]
        if cfg.http.enabled:
            await self._start_http()
        self.ready = True

    def _dnsbl_alert(self, zone, reason: str) -> None:
        log.error("DNSBL zone %s disabled: %s", zone.display, reason)
        self.metrics.dnsbl_alerts.labels(zone.display).inc()

    async def _start_http(self) -> None:
        import contextlib

        import uvicorn

        class _HttpServer(uvicorn.Server):
            """uvicorn without its signal handlers: SIGTERM and SIGINT are the
            gateway's (cli.py). uvicorn >= 0.29 takes them in serve() and puts
            the earlier ones back when it stops (its install_signal_handlers
            hook is gone)."""

            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                yield

        from .web.app import create_app
        from .web.context import WebContext, health_of, readiness_of

        cfg = self.config
        if self.accounts is None or self.blocklist is None:
            raise RuntimeError("the HTTP side starts after the accounts and the block list")
        app = create_app(WebContext(
            http=cfg.http, accounts=self.accounts, blocklist=self.blocklist, registry=self.registry,
            readiness=lambda: readiness_of(ready=self.ready, draining=self.draining,
                                           upstream=self.relay is None or self.relay.any_available),
            health=lambda: health_of(self.relay, self.counters), metrics=self.metrics.render))
        config = uvicorn.Config(app, host=cfg.http.address, port=cfg.http.port, loop="none",
                                log_level="warning", lifespan="off", access_log=False)
        self._http = _HttpServer(config)
        sock, self._http_socket = _made(self._http_socket, "the HTTP socket"), None
        self._http_task = asyncio.get_running_loop().create_task(self._http.serve(sockets=[sock]))
        for _ in range(500):
            if self._http.started:
                break
            if self._http_task.done():
                exc = self._http_task.exception()
                raise ConfigError(cfg.source, "http.port", f"cannot start HTTP server: {exc}")
            await asyncio.sleep(0.01)
        servers = getattr(self._http, "servers", [])
        if servers and servers[0].sockets:
            self.http_port = servers[0].sockets[0].getsockname()[1]
        else:
            self.http_port = cfg.http.port

    # ---------------------------------------------------------------- shutdown
    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting; let in-flight transactions finish within the grace
        period; close the rest with 421 4.3.2."""
        grace = self.config.smtp.grace_period if grace is None else grace
        self.draining = True
        self.ready = False
        for server in self._servers:
            server.close()
        deadline = time.monotonic() + grace
        while True:
            for proto in list(self.sessions):
                proto.shutdown_if_idle()
            if not self.sessions or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)
        for proto in list(self.sessions):
            proto.force_close()
        for server in self._servers:
            try:
                await within(server.wait_closed(), 2)
            except asyncio.TimeoutError:
                pass
        await asyncio.sleep(0)  # let connection_lost callbacks run
        if self._http is not None:
            self._http.should_exit = True
        # Each component gets a bounded time: a stuck one is logged and left
        # behind, so SIGTERM always ends the process.
        steps = [
            # Handovers whose client left during them run to their end (the relay's
            # timeouts bound them): their upstream answer decides the log line.
            ("handovers without a client", self.delivery.settled() if self.delivery is not None else None),
            ("registry", self.registry.stop() if self.registry is not None else None),
            ("relay pool", self.relay.close() if self.relay is not None else None),
            ("HTTP server", self._http_task),
            ("dev outbox", self._devsink.close() if self._devsink is not None else None),
            ("violations", self.violations.stop() if self.violations is not None else None),
            ("account refresher", self.accounts.stop() if self.accounts is not None else None),
            ("block lists", self.blocklist.stop() if self.blocklist is not None else None),
            ("domain proof re-check", self.proof_checker.stop() if self.proof_checker is not None else None),
            ("DNSBL probes", self.dnsbl.stop() if self.dnsbl is not None else None),
            ("resolver", self.resolver.close() if self.resolver is not None else None),
            ("counters", self.counters.close() if self.counters is not None else None),  # also the resolver's Redis
            ("database", self.engine.dispose() if self.engine is not None else None),
        ]
        for what, awaitable in steps:
            if awaitable is not None:
                await _bounded(what, awaitable)
        self._close_sockets()      # a start that failed half-way
        if self.txlog is not None:
            self.txlog.close()
        self.stopped.set()


_T = TypeVar("_T")


def _made(component: _T | None, what: str) -> _T:
    """A component an earlier step of start() made: it is there, or start-up runs out of order."""
    if component is None:
        raise RuntimeError(f"{what} is made earlier in start()")
    return component


async def _bounded(what: str, awaitable, seconds: float = 5.0) -> None:
    """Await a shutdown step for at most ``seconds``; never raise."""
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        task.cancel()
        log.error("shutdown: %s did not finish within %.0f s; going on", what, seconds)
    elif not task.cancelled() and task.exception() is not None:
        log.error("shutdown: %s failed: %r", what, task.exception())


def with_listener_ports(config: Config, ports: dict[str, int]) -> Config:
    """A copy of ``config`` with the named listeners moved to other ports (tests)."""
    listeners = [replace(lst, port=ports.get(lst.name, lst.port)) for lst in config.listeners]
    return replace(config, listeners=listeners)
