"""The gateway's configuration tree: TOML + environment, validated once.

Everything the gateway does is decided by this tree; nothing deeper in the
code reads the environment. ``load(path)`` returns a :class:`Config` or raises
:class:`ConfigError` naming the file, the key and the problem.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Mapping

from .configload import ConfigError, load_section
from .registry.settings import RegistrySettings
from .accounts.settings import AccountSettings
from .accounts.identity import IdentitySettings
from .accounts.passwords import DEFAULT_N as DEFAULT_SCRYPT_N, MAX_N as MAX_SCRYPT_N, MIN_N as MIN_SCRYPT_N
from .dns.settings import DnsblSettings, DomainSettings, ResolverSettings
from .forwarding import ForwardingSettings
from .state.limitsettings import LimitSettings
from .message.settings import HeaderSettings
from .core.transaction import Phase
from .checks import PHASES, SPECS, default_order

__all__ = ["Config", "ConfigError", "ListenError", "config_warnings", "load", "dev_config", "is_dev_dir"]

TlsMode = Literal["none", "starttls", "implicit"]


class ListenError(ConfigError):
    """A listening address cannot be bound: one line naming address:port and
    what to change (the dev option or the config key)."""

    def __init__(self, source: str, key: str, problem: str, hint: str):
        super().__init__(source, key, problem)
        self.args = (f"{problem}; {hint}",)

    def __str__(self) -> str:
        return self.args[0]


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{name}: must be greater than 0, got {value}")


@dataclass(frozen=True)
class ListenerSettings:
    name: str = "smtp"
    address: str = "127.0.0.1"
    port: int = 2525
    tls: TlsMode = "starttls"          # none | starttls (offered) | implicit (port 465 style)
    require_tls: bool = False          # refuse MAIL before STARTTLS
    auth_without_tls: bool = False     # offer AUTH on a clear-text connection (loopback tests, dev)
    require_auth: bool = False         # submission style: MAIL needs AUTH (530 5.7.0)
    proxy_protocol: bool = False       # expect a PROXY v1/v2 header first
    proxy_trusted: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    proxy_timeout: float = 5.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: {self.port} is not a TCP port")
        try:
            ip = ipaddress.ip_address(self.address)
        except ValueError:
            raise ValueError(f"address: {self.address!r} is not an IP address") from None
        if self.auth_without_tls and not ip.is_loopback:
            raise ValueError(f"auth_without_tls: only on a loopback listener (127.0.0.0/8, ::1), not on "
                             f"{self.address}: passwords would cross the network in clear text; "
                             f"use tls = \"starttls\" or \"implicit\" there")
        for net in self.proxy_trusted:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"proxy_trusted: {net!r} is not a network") from None
        _positive("proxy_timeout", self.proxy_timeout)


@dataclass(frozen=True)
class TlsSettings:
    cert_file: str = ""
    key_file: str = ""
    min_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"
    handshake_timeout: float = 10.0

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file: cert_file and key_file go together")
        _positive("handshake_timeout", self.handshake_timeout)


@dataclass(frozen=True)
class SmtpSettings:
    hostname: str = field(default_factory=socket.getfqdn)
    banner: str = "ESMTP relay gateway"
    max_message_size: int = 25 * 1024 * 1024
    max_recipients: int = 100
    idle_timeout: float = 300.0         # waiting for a command outside a transaction
    # Until the session is authenticated (greeting, EHLO, STARTTLS, AUTH; a
    # client-network session is authenticated at connect) every wait for a
    # command is at most this long: squatting a connection slot costs an
    # unauthenticated client 30 s, not idle_timeout (docs/architecture.md,
    # "Timeouts and limits").
    preauth_timeout: float = 30.0
    command_timeout: float = 300.0      # waiting for the next command inside one (RFC 5321 4.5.3.2.7)
    data_timeout: float = 600.0         # whole DATA transfer
    max_connections: int = 1000
    max_connections_per_ip: int = 50
    # Fraction of max_connections: once that many sessions are open, each
    # newcomer the connect checks accept closes the oldest idle
    # unauthenticated session(s) (smtp/evict.py). 0 turns eviction off.
    evict_unauthenticated_at: float = 0.9
    max_commands: int = 10000           # per session
    max_bogus_commands: int = 10
    max_transactions: int = 1000        # per session
    grace_period: float = 30.0          # graceful shutdown
    service_mailboxes: list[str] = field(default_factory=list)  # reachable without AUTH
    service_maildir: str = "service-mail"
    allow_address_literals: bool = False
    trace_header: str = "X-Gateway-Trace"
    # Connection limits of issue 12 (P-LOAD; checks/connect_rate.py,
    # checks/mail_account_connections.py). New connections per client IP per
    # minute (GCRA on the rate limiter: Redis-shared with the counters' backend),
    # with a burst of connection_rate_burst at once; 0 turns it off. Concurrent
    # sessions per account, counted in memory per gateway process (N gateways:
    # N times this at most); 0 turns it off.
    connection_rate_per_ip: int = 600
    connection_rate_burst: int = 60
    max_connections_per_account: int = 200

    def __post_init__(self) -> None:
        for name in ("connection_rate_per_ip", "connection_rate_burst", "max_connections_per_account"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must not be negative (0 turns it off)")
        if self.connection_rate_per_ip and not self.connection_rate_burst:
            raise ValueError("connection_rate_burst: must be at least 1 while connection_rate_per_ip is on")
        for name in ("max_message_size", "max_recipients", "command_timeout", "idle_timeout",
                     "preauth_timeout", "data_timeout", "max_connections", "max_connections_per_ip", "max_commands",
                     "max_bogus_commands", "max_transactions"):
            _positive(name, getattr(self, name))
        if self.grace_period < 0:
            raise ValueError("grace_period: must not be negative")
        if not 0 <= self.evict_unauthenticated_at < 1:
            raise ValueError(f"evict_unauthenticated_at: a fraction of max_connections at least 0 (off) and "
                             f"below 1, got {self.evict_unauthenticated_at}")
        if not self.hostname or " " in self.hostname:
            raise ValueError(f"hostname: {self.hostname!r} is not a host name")
        if ":" in self.trace_header or " " in self.trace_header or not self.trace_header:
            raise ValueError(f"trace_header: {self.trace_header!r} is not a header field name")
        from .core.address import AddressError, parse_mailbox
        for mailbox in self.service_mailboxes:
            try:
                parse_mailbox(mailbox, utf8=True)
            except AddressError as exc:
                raise ValueError(f"service_mailboxes: {mailbox!r} is not an address ({exc.detail})") from None


@dataclass(frozen=True)
class AuthSettings:
    max_failures_per_ip: int = 10
    max_failures_per_account: int = 20
    failure_window: float = 600.0
    # scrypt cost N of new password hashes and of the dummy hash unknown
    # accounts are checked against (r = 8, p = 1): 2^14..2^17, default 2^15
    # (docs/sender-auth.md, "Password hashes": the measured cost per AUTH).
    scrypt_n: int = DEFAULT_SCRYPT_N
    # Test suites only: allows scrypt_n below 2^14 (down to 2) so tests hash
    # fast. check-config and serve warn loudly while it is set.
    insecure_test_scrypt: bool = False
    # scrypt verifications running at once (each needs 128 * 8 * N bytes:
    # 32 MiB at 2^15, 128 MiB at 2^17); more AUTHs wait for a free slot.
    max_concurrent_verifications: int = 2
    # Lockout back-off (accounts/limiter.py): a client IP or account name that
    # reaches its failure limit is locked out for failure_window, and each
    # further lockout within lockout_memory doubles it, up to lockout_max.
    lockout_max: float = 86400.0
    lockout_memory: float = 86400.0

    def __post_init__(self) -> None:
        if self.lockout_max < self.failure_window:
            raise ValueError(f"lockout_max: must not be less than failure_window ({self.failure_window:g} s), "
                             f"got {self.lockout_max:g}")
        _positive("lockout_memory", self.lockout_memory)
        _positive("max_failures_per_ip", self.max_failures_per_ip)
        _positive("max_failures_per_account", self.max_failures_per_account)
        _positive("failure_window", self.failure_window)
        if self.scrypt_n < 2 or self.scrypt_n & (self.scrypt_n - 1):
            raise ValueError("scrypt_n: must be a power of two")
        if self.scrypt_n > MAX_SCRYPT_N:
            raise ValueError(f"scrypt_n: at most 2^17 ({MAX_SCRYPT_N}; 128 MiB per verification), "
                             f"got {self.scrypt_n}")
        if self.scrypt_n < MIN_SCRYPT_N and not self.insecure_test_scrypt:
            raise ValueError(f"scrypt_n: at least 2^14 ({MIN_SCRYPT_N}), got {self.scrypt_n}: weaker password "
                             f"hashes are cheap to crack (insecure_test_scrypt = true allows it in test suites "
                             f"only)")
        if not 1 <= self.max_concurrent_verifications <= 64:
            raise ValueError("max_concurrent_verifications: must be within 1..64")

    def warnings(self) -> list[tuple[str, str]]:
        """(key, problem) of settings that are allowed but unsafe outside a test suite."""
        if self.insecure_test_scrypt:
            return [("auth.insecure_test_scrypt", f"TEST SUITES ONLY: password hashes may be made with scrypt_n "
                                                  f"= {self.scrypt_n} (below 2^14 they are cheap to crack); "
                                                  f"never set this in production")]
        return []


@dataclass(frozen=True)
class HarvestSettings:
    """The harvest guard (P-HARVEST, checks/rcpt_harvest.py). Refused
    recipients (5xx, ours or the upstream's) are counted per session and, in
    fixed windows of ``window`` seconds on the shared counters, per client IP,
    per account and per identity. In a session, after ``tarpit_after`` of
    them each further RCPT reply waits ``tarpit_delay`` seconds, doubling up to
    ``tarpit_max``; at ``max_refused_per_session`` the session is closed with
    421 4.7.0. Past ``max_refused_per_ip`` / ``_per_account`` /
    ``_per_identity`` in a window new RCPTs of that IP / account / identity
    are deferred (451 4.7.1) until the window ends. 0 turns a limit off."""
    max_refused_per_session: int = 30
    tarpit_after: int = 10
    tarpit_delay: float = 1.0
    tarpit_max: float = 10.0
    window: float = 3600.0
    max_refused_per_ip: int = 100
    max_refused_per_account: int = 500
    max_refused_per_identity: int = 100

    def __post_init__(self) -> None:
        for name in ("max_refused_per_session", "tarpit_after", "max_refused_per_ip", "max_refused_per_account",
                     "max_refused_per_identity"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must not be negative (0 turns it off)")
        _positive("window", self.window)
        if self.tarpit_delay < 0:
            raise ValueError("tarpit_delay: must not be negative (0 turns the tarpit off)")
        if self.tarpit_max < self.tarpit_delay:
            raise ValueError(f"tarpit_max: must not be less than tarpit_delay ({self.tarpit_delay:g}), "
                             f"got {self.tarpit_max:g}")


@dataclass(frozen=True)
class UpstreamSettings:
    host: str = "127.0.0.1"
    port: int = 25
    tls: TlsMode = "none"
    verify_tls: bool = True
    username: str = ""
    password: str = ""                # use "env:NAME" to read it from the environment
    connect_timeout: float = 10.0
    command_timeout: float = 60.0
    data_timeout: float = 300.0

    def __post_init__(self) -> None:
        if not 0 < self.port <= 65535:
            raise ValueError(f"port: {self.port} is not a TCP port")
        _positive("connect_timeout", self.connect_timeout)
        _positive("command_timeout", self.command_timeout)
        _positive("data_timeout", self.data_timeout)


@dataclass(frozen=True)
class RelaySettings:
    upstreams: list[UpstreamSettings] = field(default_factory=list)
    pool_size: int = 64               # idle connections kept per upstream
    idle_timeout: float = 30.0        # close pooled connections idle longer than this
    max_messages_per_connection: int = 1000
    helo_name: str = ""               # default: smtp.hostname
    # Circuit breaker per upstream (relay/breaker.py): open after this many
    # consecutive connection failures (at once after a timeout, with
    # breaker_open_on_timeout), skipped for a back-off that doubles from
    # breaker_backoff to breaker_backoff_max, probed in the background after it.
    breaker_failures: int = 3
    breaker_open_on_timeout: bool = True
    breaker_backoff: float = 5.0
    breaker_backoff_max: float = 300.0
    # Open upstream connections of this process, over all upstreams, in use
    # and idle (relay/pool.py). A session holds at most one (one transaction
    # at a time, one upstream transaction each), so 100 lets 100 sessions be
    # between RCPT and the end of DATA at once: far more than one upstream MTA
    # usually wants from one client (Postfix's smtpd_client_connection_count_limit
    # is 50) while a handful of gateway processes stay below an upstream's
    # process limit (Postfix default_process_limit 100). Past it a transaction
    # reuses an idle connection, closes an idle one to another upstream, or
    # waits (first come, first served) up to connection_wait seconds for one
    # to be released; then its RCPT gets 451 4.4.5.
    max_connections: int = 100
    connection_wait: float = 5.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_connections <= 100_000:
            raise ValueError(f"max_connections: must be within 1..100000, got {self.max_connections}")
        if not 0 <= self.connection_wait <= 60:
            raise ValueError(f"connection_wait: must be within 0..60 seconds (well under the client's "
                             f"smtp.command_timeout), got {self.connection_wait}")
        if self.pool_size < 0:
            raise ValueError("pool_size: must not be negative")
        _positive("idle_timeout", self.idle_timeout)
        _positive("max_messages_per_connection", self.max_messages_per_connection)
        _positive("breaker_failures", self.breaker_failures)
        _positive("breaker_backoff", self.breaker_backoff)
        if self.breaker_backoff_max < self.breaker_backoff:
            raise ValueError(f"breaker_backoff_max: must not be less than breaker_backoff "
                             f"({self.breaker_backoff}), got {self.breaker_backoff_max}")


@dataclass(frozen=True)
class StorageSettings:
    url: str = "sqlite+aiosqlite:///gateway.db"   # or postgresql+asyncpg://user@host/db
    # PostgreSQL: a new connection must be up within connect_timeout, a
    # statement answered within command_timeout, a pooled connection handed
    # out within pool_timeout (seconds). A black-holed server then costs a
    # caller at most these, never the TCP timeout (minutes).
    connect_timeout: float = 5.0
    command_timeout: float = 10.0
    pool_timeout: float = 5.0

    def __post_init__(self) -> None:
        if not (self.url.startswith("sqlite+aiosqlite://") or self.url.startswith("postgresql+asyncpg://")):
            raise ValueError("url: must start with sqlite+aiosqlite:// or postgresql+asyncpg://")
        for name in ("connect_timeout", "command_timeout", "pool_timeout"):
            value = getattr(self, name)
            if not 0 < value <= 600:
                raise ValueError(f"{name}: must be in (0, 600] seconds")


@dataclass(frozen=True)
class CounterSettings:
    backend: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "gw:"
    # Redis down (state/counters.py): every Redis call has this deadline; past
    # it, or on any Redis error, the counters fall back to local per-process
    # counts with every limit divided by expected_nodes (the gateways sharing
    # the Redis), and re-probe Redis in the background after retry_interval,
    # doubling to retry_max, until it answers again.
    timeout: float = 0.5
    expected_nodes: int = 1
    retry_interval: float = 1.0
    retry_max: float = 30.0

    def __post_init__(self) -> None:
        _positive("timeout", self.timeout)
        _positive("expected_nodes", self.expected_nodes)
        _positive("retry_interval", self.retry_interval)
        if self.retry_max < self.retry_interval:
            raise ValueError(f"retry_max: must not be less than retry_interval ({self.retry_interval}), "
                             f"got {self.retry_max}")


ViolationClass = Literal["negligence", "deliberate"]
# The class of each kind of violation the checks record (strikes/violations.py):
# a volume spike from one site of an account is negligence (a hacked site).
DEFAULT_VIOLATION_CLASSES = {"rate_storm": "negligence", "bulk": "negligence", "repeat": "negligence",
                             "harvest": "negligence"}


@dataclass(frozen=True)
class StrikesSettings:
    """``[strikes]``: how violations are recorded (P-STRIKE; docs/strikes.md).

    ``classes`` maps a violation kind (``rate_storm``, ``bulk``, ``repeat``,
    ``harvest``) or a POLICY rule id (``P-UCE``) to ``negligence`` or
    ``deliberate``; a kind's entry wins over its rule's, and what neither
    names takes DEFAULT_VIOLATION_CLASSES (negligence)."""

    classes: dict[str, ViolationClass] = field(default_factory=dict)

    def class_of(self, rule: str, kind: str) -> str:
        return self.classes.get(kind) or self.classes.get(rule) or DEFAULT_VIOLATION_CLASSES.get(kind, "negligence")


@dataclass(frozen=True)
class BulkSettings:
    """``[bulk]``: the bulk and repeat detectors (checks/data_bulk.py, docs/bulk.md; P-UCE).

    A message whose fingerprint has reached more than ``recipients_threshold``
    distinct recipients of one account (or one identity in it) within
    ``window`` seconds is deferred (451 4.7.1); past ``refuse_factor`` times
    the threshold it is refused (550 5.7.1) and a violation recorded. The same
    fingerprint to the same recipient again within ``window`` is refused
    (``repeat``), unless it carries the same Message-ID (a resend)."""

    window: float = 3600.0
    recipients_threshold: int = 50
    refuse_factor: float = 2.0
    repeat: bool = True

    def __post_init__(self) -> None:
        if not 60 <= self.window <= 7 * 86400:
            raise ValueError(f"window: must be in [60, 604800] seconds, got {self.window}")
        if not isinstance(self.recipients_threshold, int) or not 1 <= self.recipients_threshold <= 10_000:
            raise ValueError(f"recipients_threshold: must be an integer in [1, 10000], got {self.recipients_threshold}")
        if not 1.0 <= self.refuse_factor <= 100.0:
            raise ValueError(f"refuse_factor: must be in [1, 100], got {self.refuse_factor}")

    @property
    def refuse_at(self) -> int:
        """More distinct recipients than this: refused, not deferred."""
        return max(self.recipients_threshold, int(self.recipients_threshold * self.refuse_factor))


@dataclass(frozen=True)
class HttpSettings:
    enabled: bool = True
    address: str = "127.0.0.1"
    port: int = 8025
    admin_key: str = ""               # "env:NAME" recommended
    # Request bodies (gateway/web/limits.py): the most a route takes, and the
    # seconds from the request's headers to the body's last byte (then 413 /
    # 408). The subscriber import (JSON or a CSV file) has its own pair.
    max_body: int = 64 * 1024
    body_timeout: float = 10.0
    max_import_body: int = 16 * 1024 * 1024
    import_body_timeout: float = 120.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: {self.port} is not a TCP port")
        for name in ("max_body", "body_timeout", "max_import_body", "import_body_timeout"):
            _positive(name, getattr(self, name))


@dataclass(frozen=True)
class LogSettings:
    level: Literal["debug", "info", "warning", "error"] = "info"
    transactions: str = "-"           # "-" = standard output, else a file path (one JSON line per transaction)


# The default order of the checks per phase, from the check modules' SPECs.
DEFAULT_CHECKS: dict[str, list[str]] = default_order()

CheckMode = Literal["enforce", "warn", "off"]


@dataclass(frozen=True)
class CheckSettings:
    """``[checks]``: which checks run in each phase, in order; ``[checks.modes]``:
    ``enforce`` (the default of most checks; a SPEC may default to ``warn``),
    ``warn`` (a would-be refusal is recorded, the mail goes on) or ``off``
    per check; ``[checks.deadlines]``: seconds per check
    (defaults: each check's SPEC). docs/checks.md."""

    connect: list[str] = field(default_factory=lambda: list(DEFAULT_CHECKS["connect"]))
    helo: list[str] = field(default_factory=lambda: list(DEFAULT_CHECKS["helo"]))
    mail: list[str] = field(default_factory=lambda: list(DEFAULT_CHECKS["mail"]))
    rcpt: list[str] = field(default_factory=lambda: list(DEFAULT_CHECKS["rcpt"]))
    data: list[str] = field(default_factory=lambda: list(DEFAULT_CHECKS["data"]))
    modes: dict[str, CheckMode] = field(default_factory=dict)
    deadlines: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, seconds in self.deadlines.items():
            if not 0 < seconds <= 3600:
                raise ValueError(f"deadlines: {name}: must be in (0, 3600] seconds, got {seconds}")

    def order(self) -> dict[Phase, list[str]]:
        """The checks that run, per phase, in order (``off`` ones left out)."""
        return {phase: [n for n in getattr(self, phase.value) if self.mode(n) != "off"] for phase in PHASES}

    def mode(self, name: str) -> str:
        """``[checks.modes]``, else the check's SPEC default (``enforce`` for most)."""
        mode = self.modes.get(name)
        if mode is not None:
            return mode
        spec = SPECS.get(name)
        return spec.default_mode if spec is not None else "enforce"

    def deadline(self, name: str) -> float:
        seconds = self.deadlines.get(name)
        return seconds if seconds is not None else SPECS[name].deadline


@dataclass(frozen=True)
class DevSettings:
    enabled: bool = False
    outbox: str = "dev-outbox"        # maildir of the embedded upstream
    # The dev DNS zone: records in the form of dns.static ("name TYPE data"),
    # read on top of the built-in dev records and re-read when the file
    # changes; `gateway account domain add` publishes the TXT proof here.
    zone_file: str = ""


@dataclass(frozen=True)
class Config:
    source: str = "<defaults>"
    listeners: list[ListenerSettings] = field(default_factory=lambda: [ListenerSettings()])
    smtp: SmtpSettings = field(default_factory=SmtpSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    relay: RelaySettings = field(default_factory=RelaySettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    counters: CounterSettings = field(default_factory=CounterSettings)
    bulk: BulkSettings = field(default_factory=BulkSettings)
    strikes: StrikesSettings = field(default_factory=StrikesSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    log: LogSettings = field(default_factory=LogSettings)
    checks: CheckSettings = field(default_factory=CheckSettings)
    dns: ResolverSettings = field(default_factory=ResolverSettings)
    dnsbl: DnsblSettings = field(default_factory=DnsblSettings)
    domains: DomainSettings = field(default_factory=DomainSettings)
    headers: HeaderSettings = field(default_factory=HeaderSettings)
    dev: DevSettings = field(default_factory=DevSettings)
    registry: RegistrySettings = field(default_factory=RegistrySettings)
    accounts: AccountSettings = field(default_factory=AccountSettings)
    forwarding: ForwardingSettings = field(default_factory=ForwardingSettings)
    harvest: HarvestSettings = field(default_factory=HarvestSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)     # rcpt_rate (issue 12)
    identity: IdentitySettings = field(default_factory=IdentitySettings)   # sub-logins, identity headers

    def __post_init__(self) -> None:
        names = [listener.name for listener in self.listeners]
        if len(set(names)) != len(names):
            raise ValueError("listeners: listener names must be unique")
        if any(listener.tls != "none" for listener in self.listeners) and not self.tls.cert_file \
                and not self.dev.enabled:
            raise ValueError("tls: a listener uses TLS but tls.cert_file/tls.key_file are not set")
        if not self.dev.enabled and not self.relay.upstreams:
            raise ValueError("relay: at least one [[relay.upstreams]] is needed")


def _validate_semantics(cfg: Config) -> None:
    """Cross-section checks that need more than one section."""
    _validate_checks(cfg)
    _validate_harvest(cfg)
    if cfg.relay.connection_wait >= cfg.smtp.command_timeout:
        raise ConfigError(cfg.source, "relay.connection_wait",
                          f"{cfg.relay.connection_wait:g} s must be less than smtp.command_timeout "
                          f"({cfg.smtp.command_timeout:g} s): the client would give up on its RCPT before the "
                          f"gateway answers it")
    for tls_file in (cfg.tls.cert_file, cfg.tls.key_file):
        if tls_file and not Path(tls_file).is_file():
            raise ConfigError(cfg.source, "tls.cert_file" if tls_file == cfg.tls.cert_file else "tls.key_file",
                              f"file {tls_file!r} does not exist")


def _validate_harvest(cfg: Config) -> None:
    """The tarpit waits inside the rcpt_harvest check: its longest wait must
    leave room under the check's deadline, or the tarpit itself would end in
    the pipeline's 451 4.3.0 for an overrun."""
    deadline = cfg.checks.deadline("rcpt_harvest")
    if cfg.harvest.tarpit_max + 1.0 > deadline:
        raise ConfigError(cfg.source, "harvest.tarpit_max",
                          f"{cfg.harvest.tarpit_max:g} s must be at least 1 s less than the deadline of the "
                          f"rcpt_harvest check ({deadline:g} s, [checks.deadlines]): the tarpit would overrun it")


def _validate_checks(cfg: Config) -> None:
    """The configured checks against their contracts (gateway/checks/contract.py):
    known, in their own phase, each once; mandatory ones present and enforcing;
    every check a running check requires running before it."""
    checks = cfg.checks
    where: dict[str, tuple[int, int]] = {}   # name -> (phase index, position): the run order
    for p, phase in enumerate(PHASES):
        key = f"checks.{phase.value}"
        for i, name in enumerate(getattr(checks, phase.value)):
            spec = SPECS.get(name)
            if spec is None:
                raise ConfigError(cfg.source, key, f"unknown check {name!r} (known: {', '.join(sorted(SPECS))})")
            if spec.phase is not phase:
                raise ConfigError(cfg.source, key, f"check {name!r} acts in phase {spec.phase.value}, not {phase.value}")
            if name in where:
                raise ConfigError(cfg.source, key, f"check {name!r} is listed twice")
            where[name] = (p, i)
    for table in ("modes", "deadlines"):
        for name in getattr(checks, table):
            if name not in SPECS:
                raise ConfigError(cfg.source, f"checks.{table}.{name}",
                                  f"unknown check (known: {', '.join(sorted(SPECS))})")
    for name, spec in SPECS.items():
        if not spec.mandatory:
            continue
        key = f"checks.{spec.phase.value}"
        if name not in where:
            raise ConfigError(cfg.source, key, f"check {name!r} cannot be left out: {spec.summary}; without it "
                                               f"the gateway would relay for anyone (an open relay)")
        if checks.mode(name) != "enforce":
            raise ConfigError(cfg.source, f"checks.modes.{name}",
                              f"check {name!r} is mandatory and runs in enforce mode only, not {checks.mode(name)!r}")
    running = {name for name in where if checks.mode(name) != "off"}
    for name in sorted(running, key=lambda n: where[n]):
        spec = SPECS[name]
        for dep in spec.requires:
            key = f"checks.{spec.phase.value}"
            if dep not in running:
                why = "is off in [checks.modes]" if dep in where else f"is not in checks.{SPECS[dep].phase.value}"
                raise ConfigError(cfg.source, key, f"check {name!r} needs the result of {dep!r}, which {why}; "
                                                   f"add {dep!r} or leave {name!r} out too")
            if where[dep] > where[name]:
                raise ConfigError(cfg.source, key, f"check {name!r} needs the result of {dep!r}, which runs "
                                                   f"after it; put {dep!r} first")


def config_warnings(cfg: Config) -> list[str]:
    """``file: key: problem`` of each setting the config takes but that is unsafe outside a test suite
    (check-config and serve print them)."""
    return [f"{cfg.source}: {key}: {problem}" for key, problem in cfg.auth.warnings()]


def from_mapping(data: Mapping, source: str, env: Mapping[str, str] | None = None) -> Config:
    data = dict(data)
    data.pop("source", None)
    checks = data.get("checks")
    if isinstance(checks, Mapping) and "auth" in checks:
        raise ConfigError(source, "checks.auth", "no check acts in the AUTH phase (failed logins are limited by "
                                                 "[auth], suspended accounts refused by mail_account_status): "
                                                 "remove this key")
    cfg = load_section(Config, data, source, "", env)
    cfg = replace(cfg, source=source)
    _validate_semantics(cfg)
    return cfg


def load(path: str | os.PathLike, env: Mapping[str, str] | None = None) -> Config:
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(source, "", f"cannot read file: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(source, "", "file is not UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "", f"TOML syntax error: {exc}") from None
    return from_mapping(data, source, env)


# The offline DNS of --dev: the demo domains and the README's example
# domains exist, everything else does not (the zone file adds to these).
DEV_DOMAINS = ("example.com", "example.org", "example.net", "shop.example", "blog.example")
DEV_DNS = [line for i, d in enumerate(DEV_DOMAINS, start=14)
           for line in (f"{d} MX 10 mail.{d}", f"mail.{d} A 93.184.215.{i}")]

# What `gateway serve --dev` keeps in its working directory.
DEV_DATABASE = "gateway-dev.db"
DEV_ZONE_FILE = "dev-zone.txt"
DEV_CERT_FILE = "dev-tls/cert.pem"
DEV_KEY_FILE = "dev-tls/key.pem"
DEV_SMTP_PORT = 2525
DEV_HTTP_PORT = 8025


def is_dev_dir(workdir: str | os.PathLike) -> bool:
    """Has ``gateway serve --dev`` run in ``workdir`` (its database is there)?"""
    return (Path(workdir) / DEV_DATABASE).is_file()


def dev_config(workdir: str | os.PathLike = ".", *, smtp_port: int = DEV_SMTP_PORT,
               http_port: int = DEV_HTTP_PORT) -> Config:
    """Embedded defaults for ``gateway serve --dev`` (loopback only).

    Pure: names the files of the working directory, creates none of them
    (the gateway does at start, after its ports are bound). STARTTLS is
    offered with a self-signed certificate the gateway makes on first start;
    AUTH is allowed without TLS on this loopback listener."""
    wd = Path(workdir).resolve()
    data = {
        "listeners": [{"name": "dev", "address": "127.0.0.1", "port": smtp_port, "tls": "starttls",
                       "auth_without_tls": True}],
        "smtp": {"hostname": "gateway.dev.localhost", "service_maildir": str(wd / "dev-service-mail")},
        "storage": {"url": f"sqlite+aiosqlite:///{wd / DEV_DATABASE}"},
        "http": {"address": "127.0.0.1", "port": http_port},
        "registry": {"public_base_url": f"http://127.0.0.1:{http_port}"},
        "dev": {"enabled": True, "outbox": str(wd / "dev-outbox"), "zone_file": str(wd / DEV_ZONE_FILE)},
        "dns": {"static_only": True, "static": list(DEV_DNS)},
    }
    cfg = from_mapping(data, "<--dev defaults>")
    # The certificate may not exist yet: set after validation, made by Gateway.start.
    return replace(cfg, tls=replace(cfg.tls, cert_file=str(wd / DEV_CERT_FILE), key_file=str(wd / DEV_KEY_FILE)))
