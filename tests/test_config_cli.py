"""Configuration errors, `gateway check-config`, the account CLI and dev mode,
run as real processes."""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import minimal_toml, need, run_cli, tcp_reachable
from gateway.config import ConfigError, from_mapping, load

REPO = Path(__file__).resolve().parent.parent


def _readme_message() -> bytes:
    """The Python example of the README, run as written."""
    text = (REPO / "README.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    build = code.split("with smtplib", 1)[0]
    scope: dict = {}
    exec(build, scope)
    return scope["message"]


README_MESSAGE = _readme_message()
GOOD = minimal_toml("{db}", port=2525)


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "gateway.toml"
    p.write_text(text.replace("{db}", str(tmp_path / "gw.db")))
    return p


@pytest.mark.parametrize("snippet,key,problem", [
    ("[smtp]\nmax_recipientz = 5\n", "smtp.max_recipientz", "unknown key"),
    ("[smtp]\nmax_recipients = \"many\"\n", "smtp.max_recipients", "must be an integer"),
    ("[smtp]\nmax_recipients = 0\n", "smtp.max_recipients", "must be greater than 0"),
    ("[checks]\nrcpt = [\"rcpt_nonsense\"]\n", "checks.rcpt", "unknown check 'rcpt_nonsense'"),
    ("[checks]\nrcpt = [\"mail_size\"]\n", "checks.rcpt", "acts in phase mail"),
    ("[http]\nadmin_key = \"env:GW_TEST_UNSET_VAR\"\n", "http.admin_key", "GW_TEST_UNSET_VAR is not set"),
    ("[tls]\ncert_file = \"/nonexistent.pem\"\nkey_file = \"/nonexistent.key\"\n", "tls.cert_file", "does not exist"),
    ("[counters]\nbackend = \"memcached\"\n", "counters.backend", "must be one of"),
    ("[counters]\nexpected_nodes = 0\n", "counters.expected_nodes", "must be greater than 0"),
    ("[counters]\ntimeout = 0\n", "counters.timeout", "must be greater than 0"),
    ("[counters]\nretry_interval = 5.0\nretry_max = 1.0\n", "counters.retry_max", "must not be less than"),
    ("[relay]\nbreaker_failures = 0\n", "relay.breaker_failures", "must be greater than 0"),
    ("[relay]\nbreaker_backoff = 10.0\nbreaker_backoff_max = 1.0\n", "relay.breaker_backoff_max",
     "must not be less than"),
])
def test_config_errors_name_file_key_and_problem(tmp_path, snippet, key, problem):
    path = write(tmp_path, GOOD + snippet)
    with pytest.raises(ConfigError) as err:
        load(path, env={})
    assert err.value.source == str(path)
    assert err.value.key == key
    assert problem in err.value.problem
    result = run_cli("check-config", str(path))
    assert result.returncode == 2
    assert str(path) in result.stderr and key in result.stderr and problem in result.stderr


def test_listener_errors(tmp_path):
    path = write(tmp_path, GOOD.replace('address = "127.0.0.1"\nport = 2525', 'address = "localhost"\nport = 2525'))
    with pytest.raises(ConfigError) as err:
        load(path, env={})
    assert err.value.key == "listeners[0].address"
    path = write(tmp_path, GOOD.replace("port = 2525", "port = 99999"))
    with pytest.raises(ConfigError) as err:
        load(path, env={})
    assert err.value.key == "listeners[0].port"


def test_toml_syntax_error_and_missing_file(tmp_path):
    path = write(tmp_path, GOOD + "[smtp\n")
    result = run_cli("check-config", str(path))
    assert result.returncode == 2 and "TOML syntax error" in result.stderr and str(path) in result.stderr
    result = run_cli("serve", "--config", str(tmp_path / "missing.toml"))
    assert result.returncode == 2 and "cannot read file" in result.stderr
    result = run_cli("serve")
    assert result.returncode == 2 and "no config file given" in result.stderr


def test_no_upstream_is_an_error(tmp_path):
    path = write(tmp_path, GOOD.replace("[[relay.upstreams]]\nhost = \"127.0.0.1\"\nport = 2526\n", ""))
    with pytest.raises(ConfigError) as err:
        load(path, env={})
    assert err.value.key == "relay"


def test_env_values(tmp_path):
    path = write(tmp_path, GOOD + "[smtp]\nhostname = \"env:GW_HOST\"\nmax_recipients = \"env:GW_MAXR\"\n")
    cfg = load(path, env={"GW_HOST": "relay.example", "GW_MAXR": "7"})
    assert cfg.smtp.hostname == "relay.example" and cfg.smtp.max_recipients == 7


def test_check_config_accepts_the_shipped_examples(tmp_path, certs):
    for name in ("gateway.example.toml", "gateway.container.toml"):
        text = (REPO / "deploy" / name).read_text()
        text = text.replace("/etc/gateway/tls/fullchain.pem", certs.cert_file)
        text = text.replace("/etc/gateway/tls/privkey.pem", certs.key_file)
        path = tmp_path / name
        path.write_text(text)
        env = {"GATEWAY_ADMIN_KEY": "k", "GATEWAY_REGISTRY_SECRET": "00112233445566778899aabbccddeeff", "GATEWAY_HOSTNAME": "relay.example", "GATEWAY_PUBLIC_URL": "https://relay.example", "GATEWAY_UPSTREAM_HOST": "mx.example",
               "GATEWAY_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"}
        result = run_cli("check-config", str(path), env=env)
        assert result.returncode == 0, result.stderr
        assert "OK" in result.stdout


def test_service_mailbox_must_parse(tmp_path):
    data = {"relay": {"upstreams": [{"host": "127.0.0.1", "port": 25}]},
            "smtp": {"service_mailboxes": ["not an address"]}}
    with pytest.raises(ConfigError) as err:
        from_mapping(data, "<t>")
    assert err.value.key == "smtp.service_mailboxes"


def test_account_cli(tmp_path):
    path = write(tmp_path, GOOD)
    env = {"PW": "hunter2"}
    r = run_cli("account", "add", "shop", "--config", str(path), "--password-env", "PW", "--contact",
                "ops@shop.example", "--network", "192.0.2.0/24", env=env)
    assert r.returncode == 0, r.stderr
    r = run_cli("account", "add", "shop", "--config", str(path), "--password-env", "PW", env=env)
    assert r.returncode == 1 and "exists already" in r.stderr
    r = run_cli("account", "domain", "add", "shop", "Shop.Example", "--config", str(path))
    assert r.returncode == 0 and "_gateway-proof.shop.example" in r.stdout and "pending" in r.stdout
    r = run_cli("account", "domain", "add", "shop", "other.example", "--approve", "--config", str(path))
    assert r.returncode == 0 and "pre-approved" in r.stdout
    r = run_cli("account", "domain", "add", "shop", "bad..example", "--config", str(path))
    assert r.returncode == 1 and "invalid domain" in r.stderr
    r = run_cli("account", "network", "add", "shop", "2001:db8::/32", "--config", str(path))
    assert r.returncode == 0
    r = run_cli("account", "suspend", "shop", "--config", str(path))
    assert r.returncode == 0
    r = run_cli("account", "show", "shop", "--config", str(path))
    assert r.returncode == 0
    assert "status: suspended" in r.stdout and "192.0.2.0/24" in r.stdout and "2001:db8::/32" in r.stdout
    assert "shop.example: pending" in r.stdout and "other.example: approved" in r.stdout
    r = run_cli("account", "reinstate", "shop", "--config", str(path))
    r = run_cli("account", "list", "--config", str(path))
    assert r.returncode == 0 and r.stdout.startswith("shop\tactive\tops@shop.example")
    r = run_cli("account", "passwd", "shop", "--config", str(path), input="newpass\n")
    assert r.returncode == 0
    r = run_cli("account", "domain", "remove", "shop", "other.example", "--config", str(path))
    assert r.returncode == 0
    r = run_cli("account", "show", "nobody", "--config", str(path))
    assert r.returncode == 1 and "no account 'nobody'" in r.stderr
    # The password is stored as a scrypt hash, never in clear.
    raw = (tmp_path / "gw.db").read_bytes()
    assert b"hunter2" not in raw and b"newpass" not in raw and b"scrypt$" in raw


def test_help_lists_commands():
    r = run_cli("--help")
    assert r.returncode == 0
    for word in ("serve", "check-config", "account"):
        assert word in r.stdout
    r = run_cli("serve", "--help")
    assert "--dev" in r.stdout and "--config" in r.stdout


async def test_dev_mode_refuses_non_loopback(tmp_path):
    from gateway.app import Gateway
    from gateway.config import dev_config
    from dataclasses import replace
    cfg = dev_config(tmp_path)
    with pytest.raises(ValueError, match="auth_without_tls: only on a loopback listener"):
        replace(cfg.listeners[0], address="0.0.0.0")   # the dev listener's AUTH in clear text
    cfg = replace(cfg, listeners=[replace(cfg.listeners[0], address="0.0.0.0", auth_without_tls=False)])
    gw = Gateway(cfg)
    with pytest.raises(ConfigError) as err:
        await gw.start()
    assert err.value.key == "listeners[0].address" and "loopback only" in err.value.problem


async def test_readme_dev_command_runs_and_relays(tmp_path):
    """The README's first command: `gateway serve --dev` in a fresh directory."""
    need(not tcp_reachable("127.0.0.1", 2525) and not tcp_reachable("127.0.0.1", 8025),
         "ports 2525/8025 are in use by something else")
    from test_readme import gateway_script
    exe = gateway_script()      # this environment's script (a stale one may be elsewhere on PATH)
    need(exe is not None, "the `gateway` console script is not installed (pip install -e .)")
    proc = await asyncio.create_subprocess_exec(exe, "serve", "--dev", cwd=tmp_path,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        banner = b""
        deadline = time.monotonic() + 30
        while b"DEV MODE" not in banner and time.monotonic() < deadline:
            line = await asyncio.wait_for(proc.stderr.readline(), 30)
            if not line:
                break
            banner += line
        assert b"AUTH is allowed without TLS" in banner, banner
        assert b"127.0.0.1:2525" in banner

        def session():
            with smtplib.SMTP("127.0.0.1", 2525, timeout=10) as s:
                s.login("demo", "demo")
                s.sendmail("alice@example.com", ["bob@example.org"], README_MESSAGE)
            with smtplib.SMTP("127.0.0.1", 2525, timeout=10) as s:
                try:
                    s.sendmail("alice@example.com", ["bob@example.org"], b"Subject: x\r\n\r\nx\r\n")
                except smtplib.SMTPRecipientsRefused as exc:
                    return exc.recipients["bob@example.org"]
            return None

        refused = await asyncio.to_thread(session)
        assert refused[0] == 554 and b"5.7.1 P-RELAY" in refused[1]
        files = list((tmp_path / "dev-outbox" / "new").iterdir())
        assert len(files) == 1
        body = files[0].read_bytes()
        assert b"X-Gateway-Trace: " in body and body.endswith(README_MESSAGE)
        import httpx
        async with httpx.AsyncClient() as http:
            r = await http.get("http://127.0.0.1:8025/readyz")
            assert r.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        out = await proc.stdout.read()
        assert b'"decision":"relayed"' in out and b'"decision":"refused"' in out
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_sigterm_drains_with_the_http_side_still_answering(tmp_path):
    """SIGTERM is the gateway's (cli.py), never uvicorn's: while a transaction
    is still open the HTTP side keeps serving and /readyz answers 503
    draining; the process then ends 0 once the session is gone."""
    smtp_port, http_port = _free_port(), _free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "serve", "--dev", "--smtp-port", str(smtp_port),
        "--http-port", str(http_port), cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)

    async def until(text: bytes) -> None:
        while True:
            line = await asyncio.wait_for(proc.stderr.readline(), 30)
            assert line, f"the gateway ended before {text!r}"
            if line.startswith(text):
                return

    try:
        await until(b"gateway ready: HTTP")
        import aiosmtplib
        import httpx
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=smtp_port, timeout=10, start_tls=False)
        await smtp.connect()
        await smtp.login("demo", "demo")
        await smtp.mail("alice@example.com")          # a transaction in flight: the drain waits for it
        proc.send_signal(signal.SIGTERM)
        await until(b"gateway stopping")
        async with httpx.AsyncClient(timeout=10) as http:
            r = await http.get(f"http://127.0.0.1:{http_port}/readyz")
        assert r.status_code == 503 and r.json()["status"] == "draining"
        await smtp.quit()
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_example_config_runs_the_default_checks():
    """deploy/gateway.example.toml documents the defaults: the same checks, same order."""
    import tomllib
    from gateway.config import DEFAULT_CHECKS
    data = tomllib.loads((REPO / "deploy" / "gateway.example.toml").read_text())
    assert data["checks"] == DEFAULT_CHECKS


# ------------------------------------------------------------------ start-up: ports, dev options, TLS, version
def _listening_socket() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def _free_port() -> int:
    from conftest import free_port
    return free_port()


@pytest.mark.parametrize("busy", ["smtp", "http"])
def test_busy_port_is_one_line_before_anything_is_created(tmp_path, busy):
    """A port in use: one line naming address:port and the option to change,
    exit 2, and the working directory stays empty (no database, outbox,
    registry key or certificate)."""
    with _listening_socket() as held:
        taken = held.getsockname()[1]
        other = _free_port()
        smtp, http = (taken, other) if busy == "smtp" else (other, taken)
        r = run_cli("serve", "--dev", "--smtp-port", str(smtp), "--http-port", str(http), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    option = "--smtp-port" if busy == "smtp" else "--http-port"
    assert f"127.0.0.1:{taken}" in lines[0] and option in lines[0] and "in use" in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == []


def test_busy_port_with_a_config_names_the_key(tmp_path):
    with _listening_socket() as held:
        taken = held.getsockname()[1]
        text = GOOD.replace("port = 2525", f"port = {taken}") + (
            f'[log]\ntransactions = "{tmp_path / "tx.jsonl"}"\n'
            f'[registry]\nsecret = "0123456789abcdef0123456789abcdef"\n[http]\nport = {_free_port()}\n')
        path = write(tmp_path, text)
        r = run_cli("serve", "--config", str(path), cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    warning, line = r.stderr.strip().splitlines()   # GOOD's insecure_test_scrypt is warned about first
    assert warning.startswith("WARNING: ") and "auth.insecure_test_scrypt" in warning, warning
    assert f"127.0.0.1:{taken}" in line and "listeners[0].port" in line and str(path) in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gateway.toml"]   # no gw.db, no tx.jsonl


def test_port_options_need_dev(tmp_path):
    path = write(tmp_path, GOOD)
    r = run_cli("serve", "--config", str(path), "--smtp-port", "2600")
    assert r.returncode == 2 and "--smtp-port" in r.stderr and "only with --dev" in r.stderr
    r = run_cli("serve", "--dev", "--http-port", "70000")
    assert r.returncode == 2 and "not a TCP port" in r.stderr


def test_version():
    import gateway
    from importlib.metadata import version
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"gateway {gateway.__version__}"
    assert version("gateway") == gateway.__version__      # pyproject reads the same attribute
    from test_readme import gateway_script
    exe = gateway_script()
    need(exe is not None, "the `gateway` console script is not installed (pip install -e .)")
    r = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == f"gateway {gateway.__version__}"


class DevServe:
    """`gateway serve --dev --smtp-port P --http-port Q` in a directory."""

    def __init__(self, cwd: Path):
        self.cwd = cwd
        self.smtp, self.http = _free_port(), _free_port()
        self.proc = None
        self.banner = ""

    async def __aenter__(self):
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", "serve", "--dev", "--smtp-port", str(self.smtp),
            "--http-port", str(self.http), cwd=self.cwd, env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)

        async def ready():
            while "the account, list and block commands" not in self.banner:
                line = await self.proc.stderr.readline()
                if not line:
                    raise AssertionError("dev gateway exited:\n" + self.banner)
                self.banner += line.decode()
        await asyncio.wait_for(ready(), 30)
        return self

    async def __aexit__(self, *exc):
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            self.returncode = await asyncio.wait_for(self.proc.wait(), 30)
        self.stdout = await self.proc.stdout.read()


async def test_dev_ports_and_starttls_with_a_self_signed_certificate(tmp_path):
    """--smtp-port/--http-port move the dev listeners; STARTTLS is offered with a
    certificate made on the first start and reused on the next; AUTH works
    after STARTTLS (smtplib) and, on this loopback listener, without it."""
    import ssl
    import httpx
    from cryptography import x509

    async with DevServe(tmp_path) as gw:
        assert f"127.0.0.1:{gw.smtp} (starttls)" in gw.banner and f"127.0.0.1:{gw.http}/" in gw.banner
        assert "self-signed certificate (made now)" in gw.banner
        cert_file = tmp_path / "dev-tls" / "cert.pem"
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        assert cert.issuer == cert.subject                                     # self-signed
        assert (tmp_path / "dev-tls" / "key.pem").stat().st_mode & 0o077 == 0  # key readable by its owner only
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"http://127.0.0.1:{gw.http}/readyz")).status_code == 200

        def session():
            ctx = ssl.create_default_context(cafile=str(cert_file))   # verifies: the cert names 127.0.0.1
            with smtplib.SMTP("127.0.0.1", gw.smtp, timeout=10) as s:
                s.ehlo()
                assert s.has_extn("starttls") and s.has_extn("auth")   # AUTH before TLS on the dev listener
                s.starttls(context=ctx)
                s.ehlo()
                assert s.has_extn("auth") and not s.has_extn("starttls")
                s.login("demo", "demo")
                s.sendmail("alice@example.com", ["bob@example.org"], README_MESSAGE)
            with smtplib.SMTP("127.0.0.1", gw.smtp, timeout=10) as s:    # no TLS: AUTH still allowed here
                s.login("demo", "demo")
                s.sendmail("alice@example.com", ["bob@example.org"], README_MESSAGE)

        await asyncio.to_thread(session)
        fingerprint = cert.fingerprint(cert.signature_hash_algorithm)
    assert gw.returncode == 0
    records = [line for line in gw.stdout.splitlines() if b'"decision":"relayed"' in line]
    assert len(records) == 2
    assert b'"tls":{"version":"TLSv1.3"' in records[0] and b'"tls"' not in records[1]
    assert len(list((tmp_path / "dev-outbox" / "new").iterdir())) == 2

    async with DevServe(tmp_path) as gw:      # second start: the same certificate
        assert "self-signed certificate (reused)" in gw.banner
    again = x509.load_pem_x509_certificate((tmp_path / "dev-tls" / "cert.pem").read_bytes())
    assert again.fingerprint(again.signature_hash_algorithm) == fingerprint


async def test_dev_starttls_with_swaks(tmp_path):
    need(shutil.which("swaks") is not None, "swaks is not installed (apt-get install swaks)")
    async with DevServe(tmp_path) as gw:
        proc = await asyncio.create_subprocess_exec(
            "swaks", "--server", f"127.0.0.1:{gw.smtp}", "-tls", "--auth", "PLAIN", "--auth-user", "demo",
            "--auth-password", "demo", "--from", "alice@example.com", "--to", "bob@example.org",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out = (await asyncio.wait_for(proc.communicate(), 60))[0].decode()
        assert proc.returncode == 0, out
    assert "<-  220 2.0.0 Ready to start TLS" in out and "=== TLS started with cipher TLSv1." in out
    assert "<~  235 2.7.0 Authentication successful" in out        # <~ : over TLS
    assert "<~  250 2.0.0 OK: relayed" in out


def test_ctrl_c_at_the_password_prompt(tmp_path):
    """SIGINT while `account add` waits at its prompt on a terminal: one line
    "aborted", exit 130, no traceback, nothing written."""
    import select

    path = write(tmp_path, GOOD)
    master, slave = os.openpty()
    def as_a_terminal_job() -> None:
        # A foreground job on a terminal has SIGINT at its default; a suite started in the
        # background by a non-interactive shell (`... &`, nohup) has it ignored, and an ignored
        # SIGINT is inherited by the child, where Python then never raises KeyboardInterrupt.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "account", "add", "shop", "--config", str(path)],
                            stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                            preexec_fn=as_a_terminal_job, env={**os.environ, "PYTHONPATH": str(REPO)})
    os.close(slave)
    seen = b""

    def read_until(pred, seconds=30.0):
        nonlocal seen
        deadline = time.monotonic() + seconds
        while not pred(seen):
            left = deadline - time.monotonic()
            assert left > 0, seen
            ready, _, _ = select.select([master], [], [], left)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:      # EIO: the child closed the terminal
                    return
                if not chunk:
                    return
                seen += chunk

    try:
        read_until(lambda b: b"password: " in b)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 130
        read_until(lambda b: b"aborted" in b, 5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    text = seen.decode(errors="replace")
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    assert [line.strip() for line in text.splitlines() if line.strip()][-1] == "aborted", text
    assert not (tmp_path / "gw.db").exists()       # the prompt comes before the database


def test_cli_finds_the_dev_setup_only_in_a_dev_directory(tmp_path):
    r = run_cli("account", "list", cwd=tmp_path)
    assert r.returncode == 2 and "no config file given" in r.stderr
    r = run_cli("account", "add", "shop", "--dev", input="pw\n", cwd=tmp_path)     # --dev makes the setup
    assert r.returncode == 0, r.stderr
    r = run_cli("account", "list", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("shop\tactive"), r.stderr
    assert f"using the dev setup in {tmp_path}" in r.stderr
    r = run_cli("serve", cwd=tmp_path)          # serve never guesses: --dev or a config
    assert r.returncode == 2 and "no config file given" in r.stderr


def test_dev_domain_proof_goes_through_the_dev_zone(tmp_path):
    """domain add publishes the proof into dev-zone.txt, verify finds it,
    remove takes it out; a domain outside the dev zone cannot be verified."""
    def cli(*args):
        return run_cli("account", *args, "--dev", cwd=tmp_path)

    assert run_cli("account", "add", "shop", "--dev", input="pw\n", cwd=tmp_path).returncode == 0
    r = cli("domain", "add", "shop", "shop.example")
    assert r.returncode == 0 and "dev mode: published it" in r.stdout
    zone = (tmp_path / "dev-zone.txt").read_text()
    assert zone.count("_gateway-proof.shop.example TXT") == 1
    r = cli("domain", "verify", "shop", "shop.example")
    assert r.returncode == 0 and "verified" in r.stdout
    # another account claims the same domain: its own proof line
    assert run_cli("account", "add", "other", "--dev", input="pw\n", cwd=tmp_path).returncode == 0
    assert cli("domain", "add", "other", "shop.example").returncode == 0
    assert (tmp_path / "dev-zone.txt").read_text().count("_gateway-proof.shop.example TXT") == 2
    r = cli("domain", "remove", "shop", "shop.example")
    assert r.returncode == 0 and "removed from" in r.stdout and "proof record is removed" in r.stdout
    assert (tmp_path / "dev-zone.txt").read_text().count("_gateway-proof.shop.example TXT") == 1
    assert cli("domain", "verify", "other", "shop.example").returncode == 0      # the other's proof stays
    assert cli("domain", "remove", "other", "shop.example").returncode == 0
    assert "_gateway-proof.shop.example" not in (tmp_path / "dev-zone.txt").read_text()
    # A proof that is not published (written by hand as a wrong token) is not accepted.
    r = cli("domain", "add", "shop", "shop.example")
    token_line = next(line for line in (tmp_path / "dev-zone.txt").read_text().splitlines()
                      if line.startswith("_gateway-proof.shop.example"))
    (tmp_path / "dev-zone.txt").write_text(token_line.rsplit("=", 1)[0] + '=wrong"\n')
    r = cli("domain", "verify", "shop", "shop.example")
    assert r.returncode == 1 and "do not carry this domain's token" in r.stdout


async def test_dev_zone_is_reread_when_it_changes(tmp_path):
    from gateway.config import DEV_DNS
    from gateway.dns import devzone
    from gateway.dns.resolver import Resolver, Status
    from gateway.dns.settings import ResolverSettings

    zone = tmp_path / "dev-zone.txt"
    res = Resolver(ResolverSettings(static_only=True, static=list(DEV_DNS)), zone_file=str(zone))
    try:
        assert (await res.query("shop.example", "MX")).records == ((10, "mail.shop.example"),)
        assert (await res.query("new.example", "MX")).status is Status.NXDOMAIN
        devzone.publish(zone, "new.example", "MX", "10 mail.new.example")
        with open(zone, "a") as fh:
            fh.write("this is no record\n")          # skipped with a warning, the rest applies
        assert (await res.query("new.example", "MX")).records == ((10, "mail.new.example"),)
        assert devzone.unpublish(zone, "new.example", "MX") == 1
        assert (await res.query("new.example", "MX")).status is Status.NXDOMAIN
    finally:
        await res.close()
