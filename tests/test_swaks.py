"""swaks (Debian package) against the gateway: AUTH PLAIN and AUTH LOGIN on a
587-style (STARTTLS) and a 465-style (implicit TLS) listener.

swaks verifies the gateway's certificate against the test CA
(``--tls-verify --tls-ca-path ca.pem``); one test shows that a foreign CA
makes swaks give up with its TLS exit code. Exit codes (man swaks):
0 accepted, 28 error in AUTH transaction, 29 error in TLS transaction.
swaks runs through asyncio subprocesses: the gateway lives in the test's loop.
"""
from __future__ import annotations

import asyncio

import pytest

from conftest import have_binary, need

pytestmark = pytest.mark.timeout(120)

LISTENERS = {
    "starttls": {"name": "submission", "address": "127.0.0.1", "port": 0, "tls": "starttls",
                 "require_tls": True, "require_auth": True},
    "implicit": {"name": "smtps", "address": "127.0.0.1", "port": 0, "tls": "implicit",
                 "require_auth": True},
}
TLS_OPTION = {"starttls": "--tls", "implicit": "--tls-on-connect"}

BODY = "Hello Bob,\n.leading dot line\nbye\n"


@pytest.fixture
def swaks_bin():
    need(have_binary("swaks"), "swaks not found (Debian package swaks is needed)")
    return "swaks"


async def swaks(*args: str, timeout: float = 60.0) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "swaks", *args, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"swaks {' '.join(args)} did not exit within {timeout}s") from None
    return proc.returncode, out.decode("utf-8", "replace")


def swaks_args(port: int, mode: str, ca_file: str, mechanism: str, password: str,
               subject: str = "swaks test") -> list[str]:
    return ["--server", "127.0.0.1", "--port", str(port), "--helo", "swaks.client.test",
            TLS_OPTION[mode], "--tls-verify", "--tls-ca-path", ca_file,
            "--auth", mechanism, "--auth-user", "alice", "--auth-password", password,
            "--from", "alice@example.com", "--to", "bob@example.org",
            "--header", f"Subject: {subject}", "--body", BODY, "--timeout", "15"]


async def start(gateway_factory, sink, certs, mode: str):
    h = await gateway_factory(sink, certs, listeners=[LISTENERS[mode]])
    await h.add_account("alice", "s3cret", domains=("example.com",))
    return h, h.port(LISTENERS[mode]["name"])


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
@pytest.mark.parametrize("mode", ["starttls", "implicit"])
async def test_swaks_auth_and_relay(sink, gateway_factory, certs, swaks_bin, mode, mechanism):
    h, port = await start(gateway_factory, sink, certs, mode)
    rc, out = await swaks(*swaks_args(port, mode, certs.ca_file, mechanism, "s3cret",
                                      subject=f"swaks {mode} {mechanism}"))
    assert rc == 0, out
    if mode == "starttls":
        assert "-> STARTTLS" in out and "<-  220 2.0.0" in out, out
    assert f"~> AUTH {mechanism}" in out, out
    assert "<~  235 2.7.0" in out, out
    assert "<~  250 2.0.0 OK: relayed, trace id " in out, out
    await sink.wait_for(1, timeout=10)
    got = sink.messages[0]
    assert got.mail_from == "alice@example.com" and got.rcpt_tos == ["bob@example.org"]
    assert f"Subject: swaks {mode} {mechanism}".encode() in got.data
    assert b"Received: from swaks.client.test ([127.0.0.1])" in got.data
    assert b"(authenticated account alice)" in got.data
    assert b"with ESMTPSA id " in got.data
    assert b"\r\nX-Gateway-Trace: " in got.data
    # swaks dot-stuffs ".leading dot line"; it arrives exactly once unstuffed
    assert b"\r\n\r\nHello Bob,\r\n.leading dot line\r\nbye\r\n" in got.data, got.data[-80:]
    rec = [r for r in h.log_records() if r.get("event") == "transaction"]
    assert rec and rec[-1]["account"] == "alice" and rec[-1]["listener"] == LISTENERS[mode]["name"]


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
@pytest.mark.parametrize("mode", ["starttls", "implicit"])
async def test_swaks_wrong_password(sink, gateway_factory, certs, swaks_bin, mode, mechanism):
    _, port = await start(gateway_factory, sink, certs, mode)
    rc, out = await swaks(*swaks_args(port, mode, certs.ca_file, mechanism, "wrong"))
    assert rc == 28, out  # swaks: error in AUTH transaction
    assert "535 5.7.8 P-RELAY Authentication credentials invalid" in out, out
    assert "MAIL FROM" not in out
    assert sink.messages == []


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
async def test_swaks_refuses_certificate_from_unknown_ca(sink, gateway_factory, certs, swaks_bin, mode,
                                                        tmp_path):
    import trustme

    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    _, port = await start(gateway_factory, sink, certs, mode)
    rc, out = await swaks(*swaks_args(port, mode, str(other_ca), "PLAIN", "s3cret"))
    assert rc == 29, out  # swaks: error in TLS transaction
    assert "~> AUTH" not in out and "MAIL FROM" not in out, out
    assert sink.messages == []
