"""Shared fixtures: real sockets on loopback only.

- ``certs``: a test CA and a server certificate for localhost/127.0.0.1 (trustme)
- ``sink``: an aiosmtpd upstream that records what it receives and can refuse
  chosen recipients or be stopped
- ``gateway_factory``: starts a real :class:`gateway.app.Gateway` on ephemeral
  ports with SQLite in tmp_path, relaying to the sink
- ``gateway_b``: starts ``gateway serve`` as a separate process (:class:`GatewayProcess`)
- ``pg_url``: a fresh PostgreSQL database for one test (``pg_database_url``, ``pg_admin``)
- ``run_cli`` / ``run_cli_async``: the command line as a real process

All tests run under uvloop, as production does.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
import uvloop
from aiosmtpd.smtp import SMTP as AioSMTP

from gateway.app import Gateway
from gateway.config import from_mapping
from gateway.txlog import TransactionLog

from dns_fixtures import dns_server, make_resolver  # noqa: F401  (fixtures for the DNS tests)

CI = os.environ.get("CI", "").lower() == "true"


def _faketime_safe_sleep() -> None:
    """Under libfaketime (the suite is also run a year ahead and back with
    ``faketime``), CPython >= 3.11's time.sleep fails with EINVAL: it sleeps
    with clock_nanosleep(TIMER_ABSTIME), which libfaketime 0.9.10 mangles.
    subprocess's wait(timeout=) and Selenium sleep that way, so in this test
    process time.sleep waits in select() instead (a relative timeout, which
    libfaketime leaves alone). Nothing changes without libfaketime."""
    if "faketime" not in os.environ.get("LD_PRELOAD", ""):
        return
    import select
    import time

    def sleep(seconds: float) -> None:
        select.select([], [], [], max(0.0, seconds))

    time.sleep = sleep


_faketime_safe_sleep()


def without_faketime(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) without libfaketime in LD_PRELOAD:
    for programs whose clock does not matter to a test and that misbehave
    under it (headless Chromium spins its timers and never paints)."""
    env = dict(os.environ if env is None else env)
    kept = [lib for lib in env.get("LD_PRELOAD", "").split(":") if lib and "faketime" not in lib]
    if kept:
        env["LD_PRELOAD"] = ":".join(kept)
    else:
        env.pop("LD_PRELOAD", None)
    return env


REPO = Path(__file__).resolve().parents[1]
# shared/ lies beside the repository (in a checkout and in CI's fresh clone alike),
# or beside a directory above it (a git worktree under a subdirectory).
CORPORA = next((p / "shared" / "corpora" for p in REPO.parents if (p / "shared" / "corpora").is_dir()),
               REPO.parent / "shared" / "corpora")
# bench/ is importable from the tests (bench.ham_refusals holds the corpus helpers)
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))


async def eventually(predicate, what: str, timeout: float = 10.0) -> None:
    """Wait (polling every 20 ms) until ``predicate()`` is true; AssertionError
    naming ``what`` after ``timeout`` seconds."""
    async def wait():
        while not predicate():
            await asyncio.sleep(0.02)
    try:
        await asyncio.wait_for(wait(), timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"not within {timeout} s: {what}") from None


def need(condition: bool, reason: str) -> None:
    """Skip with a visible reason, except under CI=true where it must run."""
    if not condition:
        if CI:
            pytest.fail(f"required under CI=true: {reason}")
        pytest.skip(reason)


def tcp_reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
async def redis_client():
    """A client of the machine's Redis (skipped with a reason when it does not answer, except under CI)."""
    need(tcp_reachable("127.0.0.1", 6379), "Redis is not reachable at 127.0.0.1:6379")
    import redis.asyncio as redis
    client = redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


@pytest.fixture
async def redis_proxy():
    """tests/faultproxy.py in front of the machine's Redis, for a test to cut or black-hole."""
    from faultproxy import FaultProxy
    need(tcp_reachable("127.0.0.1", 6379), "Redis is not reachable at 127.0.0.1:6379")
    proxy = await FaultProxy("127.0.0.1", 6379).start()
    yield proxy
    await proxy.stop()


class WindowClock:
    """Real time plus an offset that starts just after a boundary of ``window``
    (fixed-window counters start empty), moved to the next window by hand."""

    def __init__(self, window: float):
        self.window = window
        now = time.time()
        self.offset = (now // window + 1) * window - now + 1.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def next_window(self) -> None:
        now = self()
        self.offset += (now // self.window + 1) * self.window - now + 1.0


# ------------------------------------------------------------------ PostgreSQL: a fresh database per use
PG_HOST, PG_PORT = "127.0.0.1", 5432


def in_thread(coro):
    """Run a coroutine to completion on its own loop in another thread (fixtures
    may be set up while the test's loop is running)."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(uvloop.run, coro).result(timeout=30)


def _pg_admin_user() -> str | None:
    import asyncpg

    async def probe(user):
        conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=user, database="test", timeout=3)
        await conn.close()

    for user in ("postgres", "root"):
        try:
            in_thread(probe(user))
            return user
        except Exception:
            continue
    return None


def pg_admin(sql: str, user: str | None = None) -> None:
    """Run ``sql`` as the admin user (``user``, else the one ``_pg_admin_user``
    finds) in database ``test``, on its own loop in another thread: nothing of
    the caller's loop is disturbed, but the caller blocks (from a coroutine:
    ``await asyncio.to_thread(pg_admin, sql)``)."""
    import asyncpg

    user = user or _pg_admin_user()

    async def run():
        conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=user, database="test", timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    in_thread(run())


def pg_database_url(prefix: str = "gw_test") -> tuple[str, Any]:
    """Create a fresh database; returns (SQLAlchemy URL, drop function).
    Skips (fails under CI=true) when PostgreSQL cannot be reached."""
    import secrets

    need(tcp_reachable(PG_HOST, PG_PORT), f"PostgreSQL at {PG_HOST}:{PG_PORT} is not reachable")
    user = _pg_admin_user()
    need(user is not None, "PostgreSQL does not let user postgres or root into database 'test'")
    name = f"{prefix}_{secrets.token_hex(6)}"
    pg_admin(f'CREATE DATABASE "{name}"', user)

    def drop():
        pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', user)

    return f"postgresql+asyncpg://{user}@{PG_HOST}:{PG_PORT}/{name}", drop


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    url, drop = pg_database_url()
    yield url
    drop()


@pytest.fixture(params=["sqlite", "postgres"])
def storage_url(request, tmp_path):
    """The gateway's storage URL, once on SQLite and once on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'gw.db'}"
        return
    url, drop = pg_database_url()
    yield url
    drop()


async def stop_process(proc: asyncio.subprocess.Process, timeout: float = 15) -> None:
    """SIGTERM a child (a gateway under test), and SIGKILL it if it has not
    ended within ``timeout``."""
    if proc.returncode is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()


class GatewayProcess:
    """``python3 -m gateway.cli serve --config FILE`` as a child process
    ("gateway B" of the tests with two gateways). ``start`` returns once it
    has printed its "gateway ready" lines: everything is listening then, HTTP
    included (its /readyz answers 200). ``port`` and ``http_port`` are the
    ports it reports there; ``stderr`` collects its output."""

    def __init__(self, config: Path, env: dict[str, str] | None = None):
        self.config = config
        self.env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self.proc: asyncio.subprocess.Process | None = None
        self.port: int | None = None
        self.http_port: int | None = None
        self.stderr: list[str] = []
        self._drain: asyncio.Task | None = None

    async def start(self, timeout: float = 30) -> "GatewayProcess":
        from gateway.config import load

        http = load(self.config, env=self.env).http.enabled
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", "serve", "--config", str(self.config), cwd=REPO, env=self.env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)

        async def ready():
            while True:
                line = await self.proc.stderr.readline()
                if not line:
                    raise AssertionError("gateway B exited:\n" + "".join(self.stderr))
                text = line.decode(errors="replace")
                self.stderr.append(text)
                if text.startswith("gateway ready: SMTP"):
                    # "gateway ready: SMTP plain 127.0.0.1:PORT (none)"
                    self.port = int(text.split("127.0.0.1:")[1].split()[0])
                    if not http:
                        return
                elif text.startswith("gateway ready: HTTP"):
                    # "gateway ready: HTTP http://127.0.0.1:PORT/ (healthz, readyz, metrics)"
                    self.http_port = int(text.split("127.0.0.1:")[1].split("/")[0])
                    return

        try:
            await asyncio.wait_for(ready(), timeout)
        except asyncio.TimeoutError:
            await self.stop()
            raise AssertionError(f"gateway B not ready within {timeout:g} s:\n" + "".join(self.stderr)) from None
        except BaseException:
            await self.stop()
            raise
        self._drain = asyncio.get_running_loop().create_task(self._drain_stderr())
        return self

    async def _drain_stderr(self):
        while self.proc is not None:
            line = await self.proc.stderr.readline()
            if not line:
                return
            self.stderr.append(line.decode(errors="replace"))

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        try:
            await stop_process(self.proc)
        except ProcessLookupError:      # it has ended by itself meanwhile
            await asyncio.wait_for(self.proc.wait(), 15)
        if self._drain is not None:
            self._drain.cancel()


@pytest.fixture
async def gateway_b():
    """``gateway_b(config, env=None)`` -> a started :class:`GatewayProcess`; all stopped at teardown."""
    started: list[GatewayProcess] = []

    async def make(config: Path, env: dict[str, str] | None = None) -> GatewayProcess:
        gp = GatewayProcess(config, env)
        started.append(gp)          # stopped at teardown even if start fails half-way
        return await gp.start()

    yield make
    for gp in started:
        await gp.stop()


def run_cli(*args: str, env: dict | None = None, input: str | None = None, cwd: Path | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
    """``python3 -m gateway.cli ARGS`` as a real process (text output captured);
    ``env`` is added to this process's environment."""
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, input=input, cwd=cwd,
                          timeout=timeout)


async def run_cli_async(*args: str, **kw: Any) -> subprocess.CompletedProcess:
    """run_cli in a thread: the test's event loop (and a gateway on it) keeps running."""
    return await asyncio.to_thread(run_cli, *args, **kw)


def have_binary(name: str) -> bool:
    return shutil.which(name) is not None or Path(f"/usr/sbin/{name}").exists()


def pytest_asyncio_loop_factories(config, item):
    return {"uvloop": uvloop.new_event_loop}


# ------------------------------------------------------------------ TLS
@dataclass
class Certs:
    cert_file: str
    key_file: str
    ca_file: str

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_file)
        return ctx


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Certs:
    import trustme

    d = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1", "::1")
    cert_file, key_file, ca_file = d / "server.pem", d / "server.key", d / "ca.pem"
    server.private_key_pem.write_to_path(str(key_file))
    with open(cert_file, "wb") as fh:
        for blob in server.cert_chain_pems:
            fh.write(blob.bytes())
    ca.cert_pem.write_to_path(str(ca_file))
    return Certs(str(cert_file), str(key_file), str(ca_file))


# ------------------------------------------------------------------ upstream sink
@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    mail_options: list[str]


@dataclass
class Sink:
    host: str = "127.0.0.1"
    port: int = 0
    messages: list[Received] = field(default_factory=list)
    refuse_rcpt: dict[str, str] = field(default_factory=dict)    # address -> reply
    data_reply: str | None = None
    connections: int = 0
    server: Any = None
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_for(self, count: int, timeout: float = 5.0) -> None:
        async def _wait():
            while len(self.messages) < count:
                self._arrived.clear()
                await self._arrived.wait()
        await asyncio.wait_for(_wait(), timeout)

    # aiosmtpd handler hooks
    async def handle_MAIL(self, server, session, envelope, address, options):
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server, session, envelope, address, options):
        if address in self.refuse_rcpt:
            return self.refuse_rcpt[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.data_reply:
            return self.data_reply
        self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content,
                                      list(envelope.mail_options)))
        self._arrived.set()
        return "250 2.0.0 queued as SINK%d" % len(self.messages)

    async def start(self) -> "Sink":
        loop = asyncio.get_running_loop()

        def factory():
            self.connections += 1
            return AioSMTP(self, hostname="sink.test", enable_SMTPUTF8=True, data_size_limit=None, loop=loop)

        self.server = await loop.create_server(factory, self.host, self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            try:  # bounded: a client connection left open must not hang the teardown
                await asyncio.wait_for(self.server.wait_closed(), 5)
            except asyncio.TimeoutError:
                pass
            self.server = None


@pytest.fixture
async def sink():
    s = await Sink().start()
    yield s
    await s.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ the gateway
def minimal_toml(db: Path | str, extra: str = "", *, port: int = 0) -> str:
    """The smallest config the command-line tests write, as TOML text: one
    plain listener on loopback (``port``, 0 = any), one upstream at
    127.0.0.1:2526, SQLite storage in ``db`` (a path, or a placeholder such
    as ``"{db}"`` the caller replaces), cheap scrypt hashes; ``extra``, more
    sections, appended."""
    return f"""
[[listeners]]
name = "smtp"
address = "127.0.0.1"
port = {port}
tls = "none"

[[relay.upstreams]]
host = "127.0.0.1"
port = 2526

[storage]
url = "sqlite+aiosqlite:///{db}"

[auth]
scrypt_n = 16
insecure_test_scrypt = true
""" + extra


def base_config(tmp_path: Path, sink: Sink | None, certs: Certs | None = None, **sections: Any) -> dict:
    cfg: dict[str, Any] = {
        "listeners": [{"name": "plain", "address": "127.0.0.1", "port": 0, "tls": "none",
                       "auth_without_tls": True}],
        "smtp": {"hostname": "gw.test", "max_recipients": 5, "max_message_size": 100_000,
                 "grace_period": 5.0},
        "auth": {"scrypt_n": 16, "insecure_test_scrypt": True, "max_failures_per_ip": 5, "max_failures_per_account": 5},
        "storage": {"url": f"sqlite+aiosqlite:///{tmp_path / 'gw.db'}"},
        "http": {"enabled": False},
        "log": {"transactions": str(tmp_path / "transactions.jsonl")},
        "relay": {"upstreams": [{"host": "127.0.0.1", "port": sink.port if sink else free_port(),
                                 "connect_timeout": 2.0, "command_timeout": 5.0}]},
        "registry": {"secret": "0123456789abcdef0123456789abcdef"},
        # No DNS server in these tests: the domains they use exist in a static table.
        "dns": {"static_only": True, "static": list(TEST_DNS)},
    }
    if certs is not None:
        cfg["tls"] = {"cert_file": certs.cert_file, "key_file": certs.key_file}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


TEST_DNS = [
    f"{d} MX 10 mx.{d}" for d in ("example.com", "example.org", "example.net", "shop.example",
                                   "attacker.example", "elsewhere.example", "xn--bcher-kva.example")
] + [
    f"mx.{d} A 93.184.215.{i}" for i, d in enumerate(("example.com", "example.org", "example.net", "shop.example",
                                                    "attacker.example", "elsewhere.example",
                                                    "xn--bcher-kva.example"), start=10)
]


class GatewayHandle:
    def __init__(self, gw: Gateway, tmp_path: Path):
        self.gw = gw
        self.tmp_path = tmp_path

    def port(self, name: str = "plain") -> int:
        return self.gw.ports[name]

    @property
    def log_path(self) -> Path:
        return self.tmp_path / "transactions.jsonl"

    def log_records(self) -> list[dict]:
        import orjson
        if not self.log_path.exists():
            return []
        return [orjson.loads(line) for line in self.log_path.read_bytes().splitlines() if line.strip()]

    async def add_account(self, name: str = "alice", password: str = "s3cret", domains=("example.com",),
                          networks=()) -> None:
        await self.gw.accounts.add(name, password, contact=f"ops@{domains[0] if domains else 'example.com'}")
        for d in domains:
            await self.gw.accounts.add_domain(name, d, approved_by="test")
        for n in networks:
            await self.gw.accounts.add_network(name, n)


@pytest.fixture
async def gateway_factory(tmp_path):
    started: list[Gateway] = []

    async def make(sink: Sink | None, certs: Certs | None = None, *, clock: Any = None,
                   **sections: Any) -> GatewayHandle:
        data = base_config(tmp_path, sink, certs, **sections)
        config = from_mapping(data, "<test>")
        gw = Gateway(config, txlog=TransactionLog(config.log.transactions), **({"clock": clock} if clock else {}))
        await gw.start()
        started.append(gw)
        return GatewayHandle(gw, tmp_path)

    yield make
    for gw in started:
        if not gw.stopped.is_set():
            await gw.stop(grace=0.5)


# The Date is the clock's at collection (never a fixed day: the gateway's Date
# window would refuse it once the calendar moves on).
MESSAGE = (b"From: Alice <alice@example.com>\r\n"
           b"To: Bob <bob@example.org>\r\n"
           b"Subject: test message\r\n"
           b"Date: " + formatdate(usegmt=True).encode() + b"\r\n"
           b"Message-ID: <test-1@example.com>\r\n"
           b"\r\n"
           b"Hello Bob,\r\n.leading dot line\r\nbye\r\n")


@pytest.fixture
def check_kit():
    """The typed check harness (tests/checkkit.py): services, a check built through
    its contract, and the transaction it runs on."""
    from checkkit import CheckKit
    return CheckKit()
