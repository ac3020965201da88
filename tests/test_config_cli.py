"""Configuration errors, `gateway check-config`, the account CLI and dev mode,
run as real processes."""
from __future__ import annotations

import asyncio
import shutil
import signal
import smtplib
import time
from pathlib import Path

import pytest

from conftest import need, run_cli, tcp_reachable
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
GOOD = """
[[listeners]]
name = "smtp"
address = "127.0.0.1"
port = 2525
tls = "none"

[[relay.upstreams]]
host = "127.0.0.1"
port = 2526

[storage]
url = "sqlite+aiosqlite:///{db}"

[auth]
scrypt_n = 16
"""


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
    cfg = replace(cfg, listeners=[replace(cfg.listeners[0], address="0.0.0.0")])
    gw = Gateway(cfg)
    with pytest.raises(ConfigError) as err:
        await gw.start()
    assert err.value.key == "listeners[0].address" and "loopback only" in err.value.problem


async def test_readme_dev_command_runs_and_relays(tmp_path):
    """The README's first command: `gateway serve --dev` in a fresh directory."""
    need(not tcp_reachable("127.0.0.1", 2525) and not tcp_reachable("127.0.0.1", 8025),
         "ports 2525/8025 are in use by something else")
    exe = shutil.which("gateway")
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


def test_example_config_runs_the_default_checks():
    """deploy/gateway.example.toml documents the defaults: the same checks, same order."""
    import tomllib
    from gateway.config import DEFAULT_CHECKS
    data = tomllib.loads((REPO / "deploy" / "gateway.example.toml").read_text())
    assert data["checks"] == DEFAULT_CHECKS
