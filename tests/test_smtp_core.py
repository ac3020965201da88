"""The SMTP front end and relay over real loopback sockets."""
from __future__ import annotations

import asyncio
import smtplib

import aiosmtplib
import pytest

from gateway.core.transaction import Outcome, Phase

from conftest import MESSAGE
from smtp_client import cmd, proxied_session, raw_session, session
from smtp_client import reply as read_reply


async def client(port: int, **kw) -> aiosmtplib.SMTP:
    c = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10, start_tls=False,
                        local_hostname="client.test", **kw)
    await c.connect()
    await c.ehlo()
    return c


# ----------------------------------------------------------------- EHLO / AUTH
async def test_ehlo_advertises_extensions_and_auth_only_where_allowed(sink, gateway_factory, certs):
    h = await gateway_factory(sink, certs, listeners=[
        {"name": "plain", "address": "127.0.0.1", "port": 0, "tls": "none", "auth_without_tls": True},
        {"name": "submission", "address": "127.0.0.1", "port": 0, "tls": "starttls"},
    ])
    c = await client(h.port("plain"))
    for ext in ("size", "8bitmime", "smtputf8", "pipelining", "enhancedstatuscodes", "auth"):
        assert c.supports_extension(ext), ext
    assert c.esmtp_extensions["size"] == "100000"
    await c.quit()

    c = await client(h.port("submission"))
    assert c.supports_extension("starttls")
    assert not c.supports_extension("auth"), "AUTH must not be offered before STARTTLS"
    resp = await c.execute_command(b"AUTH", b"PLAIN", b"AGFsaWNlAHMzY3JldA==")
    assert resp.code == 538 and resp.message.startswith("5.7.11")
    await c.quit()


async def test_auth_success_and_failure(sink, gateway_factory):
    h = await gateway_factory(sink)
    await h.add_account()
    c = await client(h.port())
    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as err:
        await c.login("alice", "wrong")
    assert err.value.code == 535 and "5.7.8" in err.value.message
    await c.login("alice", "s3cret")
    resp = await c.sendmail("alice@example.com", ["bob@example.org"], MESSAGE)
    assert resp[0] == {}
    await c.quit()
    await sink.wait_for(1)
    assert sink.messages[0].rcpt_tos == ["bob@example.org"]


async def test_auth_login_mechanism(sink, gateway_factory):
    h = await gateway_factory(sink)
    await h.add_account()
    c = await client(h.port())
    resp = await c.auth_login("alice", "s3cret")
    assert resp.code == 235 and resp.message.startswith("2.7.0"), resp
    await c.quit()


@pytest.mark.parametrize("per_ip,per_account,limit", [(3, 100, 3), (100, 2, 2)], ids=["per-ip", "per-account"])
async def test_auth_failures_are_rate_limited(sink, gateway_factory, per_ip, per_account, limit):
    h = await gateway_factory(sink, auth={"max_failures_per_ip": per_ip, "max_failures_per_account": per_account})
    await h.add_account()
    c = await client(h.port())
    for _ in range(limit):
        with pytest.raises(aiosmtplib.SMTPAuthenticationError):
            await c.login("alice", "guess")
    # Even the right password is refused now: the limit holds for the window.
    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as err:
        await c.login("alice", "s3cret")
    assert err.value.code == 454 and "4.7.0" in err.value.message
    await c.quit()


async def test_suspended_account_refused_at_auth_and_mail(sink, gateway_factory):
    h = await gateway_factory(sink)
    await h.add_account()
    c = await client(h.port())
    await c.login("alice", "s3cret")
    from gateway.accounts.model import AccountStatus
    await h.gw.accounts.set_status("alice", AccountStatus.SUSPENDED)
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as err:
        await c.mail("alice@example.com")
    assert err.value.code == 550 and "5.7.1 P-STRIKE" in err.value.message
    await c.quit()
    c = await client(h.port())
    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as err:
        await c.login("alice", "s3cret")
    assert err.value.code == 535 and "P-STRIKE" in err.value.message
    await c.quit()
    assert sink.messages == []


async def test_starttls_then_auth_under_uvloop(sink, gateway_factory, certs):
    h = await gateway_factory(sink, certs, listeners=[
        {"name": "submission", "address": "127.0.0.1", "port": 0, "tls": "starttls", "require_tls": True}])
    await h.add_account()
    loop = asyncio.get_running_loop()
    assert "uvloop" in type(loop).__module__
    c = aiosmtplib.SMTP(hostname="localhost", port=h.port("submission"), start_tls=False,
                        tls_context=certs.client_context(), timeout=10)
    await c.connect()
    await c.ehlo()
    resp = await c.execute_command(b"MAIL", b"FROM:<alice@example.com>")
    assert resp.code == 530 and resp.message.startswith("5.7.0")
    await c.starttls()
    await c.ehlo()
    assert c.supports_extension("auth")
    assert not c.supports_extension("starttls")
    await c.login("alice", "s3cret")
    await c.sendmail("alice@example.com", ["bob@example.org"], MESSAGE)
    await c.quit()
    await sink.wait_for(1)
    assert b"with ESMTPSA" in sink.messages[0].data
    assert b"(using TLSv1.3" in sink.messages[0].data


async def test_starttls_discards_pipelined_plaintext(sink, gateway_factory, certs):
    """CVE-2011-0411: commands sent in clear after STARTTLS must not run."""
    h = await gateway_factory(sink, certs, listeners=[
        {"name": "submission", "address": "127.0.0.1", "port": 0, "tls": "starttls"}])
    reader, writer, _ = await raw_session(h.port("submission"))
    await cmd(reader, writer, b"EHLO x")
    writer.write(b"STARTTLS\r\nRSET\r\n")
    await writer.drain()
    reply = await read_reply(reader)
    assert reply.startswith(b"220 2.0.0")
    await writer.start_tls(certs.client_context(), server_hostname="localhost")
    # The injected RSET must not have been answered inside TLS.
    reply = await cmd(reader, writer, b"NOOP")
    assert reply.startswith(b"250 2.0.0"), reply
    writer.close()


async def test_implicit_tls_offers_auth(sink, gateway_factory, certs):
    h = await gateway_factory(sink, certs, listeners=[
        {"name": "smtps", "address": "127.0.0.1", "port": 0, "tls": "implicit"}])
    await h.add_account()
    c = aiosmtplib.SMTP(hostname="localhost", port=h.port("smtps"), use_tls=True,
                        tls_context=certs.client_context(), timeout=10)
    await c.connect()
    await c.ehlo()
    assert c.supports_extension("auth")
    assert not c.supports_extension("starttls")
    await c.login("alice", "s3cret")
    await c.sendmail("alice@example.com", ["bob@example.org"], MESSAGE)
    await c.quit()
    await sink.wait_for(1)


# ----------------------------------------------------------------- relay denial
RELAY_TRICKS = [
    "<@gw.test:victim@elsewhere.example>",       # source route
    "<@gw.test,@b.example:victim@elsewhere.example>",
    "<victim%elsewhere.example@gw.test>",        # %-hack
    "<elsewhere.example!victim@gw.test>",        # bang path
    "<\"victim@elsewhere.example\"@gw.test>",    # quoted local part hiding @
    "<\"victim%elsewhere.example\"@gw.test>",
    "<victim@[192.0.2.1]>",                      # address literal
    "<victim@[IPv6:2001:db8::1]>",
    "<victim@elsewhere.example.>",               # trailing dot
    "<postmaster%elsewhere.example@gw.test>",    # trick aimed at a service mailbox
    "<\"postmaster@elsewhere.example\"@gw.test>",
    "<victim@elsewhere.example@gw.test>",
]


@pytest.mark.parametrize("rcpt", RELAY_TRICKS + ["<victim@elsewhere.example>"])
async def test_unauthenticated_client_gets_no_relay(sink, gateway_factory, rcpt, tmp_path):
    h = await gateway_factory(sink, smtp={"service_mailboxes": ["postmaster@gw.test"],
                                          "service_maildir": str(tmp_path / "svc")})
    reader, writer, greeting = await raw_session(h.port())
    assert greeting.startswith(b"220 ")
    await cmd(reader, writer, b"EHLO attacker.example")
    assert (await cmd(reader, writer, b"MAIL FROM:<a@attacker.example>")).startswith(b"250 ")
    reply = await cmd(reader, writer, b"RCPT TO:" + rcpt.encode())
    assert reply[:3] in (b"554", b"553", b"530"), reply
    assert b" 5.7.1 P-RELAY" in reply or b" 5.1.3 P-STD" in reply, reply
    assert (await cmd(reader, writer, b"DATA")).startswith(b"503 5.5.1")
    writer.close()
    assert sink.messages == [] and sink.connections == 0


@pytest.mark.parametrize("rcpt", RELAY_TRICKS[:9])
async def test_relay_tricks_refused_even_when_authenticated(sink, gateway_factory, rcpt):
    h = await gateway_factory(sink)
    await h.add_account()
    c = await client(h.port())
    await c.login("alice", "s3cret")
    await c.mail("alice@example.com")
    resp = await c.execute_command(b"RCPT", b"TO:" + rcpt.encode())
    assert resp.code in (553, 554), (rcpt, resp)
    await c.quit()
    assert sink.messages == []


async def test_service_mailbox_reachable_without_auth_and_stored_locally(sink, gateway_factory, tmp_path):
    box = tmp_path / "svc"
    h = await gateway_factory(sink, smtp={"service_mailboxes": ["postmaster@gw.test"], "service_maildir": str(box)})
    c = await client(h.port())
    await c.sendmail("someone@example.net", ["Postmaster@GW.test"], MESSAGE)
    await c.quit()
    from gateway.relay.maildir import MaildirWriter
    stored = MaildirWriter(box)
    assert len(stored.keys()) == 1
    data = stored.get_bytes(stored.keys()[0])
    assert data.endswith(MESSAGE) and b"X-Gateway-Trace: " in data
    assert sink.messages == [] and sink.connections == 0


async def test_client_network_relays_without_auth(sink, gateway_factory):
    h = await gateway_factory(sink)
    await h.add_account("webhost", domains=("shop.example",), networks=("127.0.0.0/8",))
    c = await client(h.port())
    # From must be in the account's domains too (P-FORGE).
    message = MESSAGE.replace(b"From: Alice <alice@example.com>", b"From: Orders <orders@shop.example>")
    await c.sendmail("orders@shop.example", ["buyer@example.org"], message)
    await c.quit()
    await sink.wait_for(1)
    assert b"(client network of account webhost)" in sink.messages[0].data


async def test_submission_listener_requires_auth(sink, gateway_factory):
    h = await gateway_factory(sink, listeners=[{"name": "plain", "address": "127.0.0.1", "port": 0,
                                                "tls": "none", "auth_without_tls": True, "require_auth": True}])
    c = await client(h.port())
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as err:
        await c.mail("x@example.com")
    assert err.value.code == 530 and "5.7.0 P-RELAY" in err.value.message
    await c.quit()


# ----------------------------------------------------------------- envelope syntax
@pytest.mark.parametrize("arg,code,enhanced", [
    (b"MAIL FROM:<a b@example.com>", b"553", b"5.1.7"),
    (b"MAIL FROM:<a@-bad-.example>", b"553", b"5.1.7"),
    (b"MAIL FROM:<a@example.com> SIZE=abc", b"501", b"5.5.4"),
    (b"MAIL FROM:<a@example.com> FOO=bar", b"555", b"5.5.4"),
    (b"MAIL FROM:<\xc3\xbc@example.com>", b"553", b"5.6.7"),
    (b"MAIL FROM:a@example.com", b"553", b"5.1.7"),
])
async def test_bad_sender_syntax(sink, gateway_factory, arg, code, enhanced):
    h = await gateway_factory(sink)
    reader, writer, _ = await raw_session(h.port())
    await cmd(reader, writer, b"EHLO x")
    reply = await cmd(reader, writer, arg)
    assert reply.startswith(code + b" " + enhanced), reply
    writer.close()


async def test_smtputf8_addresses_relayed(sink, gateway_factory):
    h = await gateway_factory(sink)
    await h.add_account(domains=("example.com",))
    c = await client(h.port())
    await c.login("alice", "s3cret")
    resp = await c.execute_command(b"MAIL", "FROM:<alice@example.com>".encode(), b"SMTPUTF8")
    assert resp.code == 250
    resp = await c.execute_command(b"RCPT", "TO:<jürgen@bücher.example>".encode())
    assert resp.code == 250, resp
    await c.data(MESSAGE)
    await c.quit()
    await sink.wait_for(1)
    assert sink.messages[0].rcpt_tos == ["jürgen@bücher.example"]
    assert "SMTPUTF8" in sink.messages[0].mail_options


# ----------------------------------------------------------------- limits
async def test_oversized_message_refused_after_data(sink, gateway_factory):
    h = await gateway_factory(sink)
    await h.add_account()
    c = await client(h.port())
    await c.login("alice", "s3cret")
    big = MESSAGE + b"x" * 120_000 + b"\r\n"
    await c.mail("alice@example.com")
    await c.rcpt("bob@example.org")
    with pytest.raises(aiosmtplib.SMTPDataError) as err:
        await c.data(big)
    assert err.value.code == 552 and "5.3.4 P-LOAD" in err.value.message
    # The session goes on normally afterwards.
    await c.sendmail("alice@example.com", ["bob@example.org"], MESSAGE)
    await c.quit()
    await sink.wait_for(1)
    assert len(sink.messages) == 1


async def test_declared_size_over_limit_refused_at_mail(sink, gateway_factory):
    h = await gateway_factory(sink)
    await h.add_account()
    c = await client(h.port())
    await c.login("alice", "s3cret")
    resp = await c.execute_command(b"MAIL", b"FROM:<alice@example.com>", b"SIZE=200000")
    assert resp.code == 552 and resp.message.startswith("5.3.4 P-LOAD")
    await c.quit()


async def test_too_many_recipients(sink, gateway_factory):
    h = await gateway_factory(sink)  # max_recipients = 5
    await h.add_account()
    c = await client(h.port())
    await c.login("alice", "s3cret")
    await c.mail("alice@example.com")
    for i in range(5):
        await c.rcpt(f"r{i}@example.org")
    with pytest.raises(aiosmtplib.SMTPRecipientRefused) as err:
        await c.rcpt("r5@example.org")
    assert err.value.code == 452 and "4.5.3 P-LOAD" in err.value.message
    await c.data(MESSAGE)
    await c.quit()
    await sink.wait_for(1)
    assert len(sink.messages[0].rcpt_tos) == 5


async def test_connection_cap_per_ip(sink, gateway_factory):
    h = await gateway_factory(sink, smtp={"max_connections_per_ip": 2})
    held = [await raw_session(h.port()) for _ in range(2)]
    for _, _, greeting in held:
        assert greeting.startswith(b"220 ")
    reader, writer, greeting = await raw_session(h.port())
    assert greeting.startswith(b"421 4.7.0 P-LOAD"), greeting
    assert await reader.read() == b""  # closed
    for _, w, _ in held:
        w.close()


async def test_global_connection_cap(sink, gateway_factory):
    h = await gateway_factory(sink, smtp={"max_connections": 1})
    r1, w1, g1 = await raw_session(h.port())
    assert g1.startswith(b"220 ")
    _, _, g2 = await raw_session(h.port())
    assert g2.startswith(b"421 4.7.0 P-LOAD")
    w1.close()


async def test_bogus_commands_disconnect(sink, gateway_factory):
    h = await gateway_factory(sink, smtp={"max_bogus_commands": 3})
    reader, writer, _ = await raw_session(h.port())
    assert (await cmd(reader, writer, b"FOO")).startswith(b"500 5.5.2")
    assert (await cmd(reader, writer, b"BAR")).startswith(b"500 5.5.2")
    assert (await cmd(reader, writer, b"BAZ")).startswith(b"421 4.7.0")
    writer.close()


async def test_vrfy_and_expn_reveal_nothing(sink, gateway_factory):
    h = await gateway_factory(sink)
    reader, writer, _ = await raw_session(h.port())
    await cmd(reader, writer, b"EHLO x")
    assert (await cmd(reader, writer, b"VRFY postmaster")).startswith(b"252 2.5.0 P-HARVEST")
    assert (await cmd(reader, writer, b"EXPN staff")).startswith(b"502 5.5.1 P-HARVEST")
    writer.close()


async def test_command_timeout_inside_transaction_releases_upstream(sink, gateway_factory):
    # relay.connection_wait must stay below the command timeout (config.py)
    h = await gateway_factory(sink, smtp={"idle_timeout": 30, "command_timeout": 0.5},
                              relay={"connection_wait": 0.1})
    await h.add_account()
    reader, writer, _ = await raw_session(h.port())
    await cmd(reader, writer, b"EHLO x")
    await cmd(reader, writer, b"AUTH PLAIN AGFsaWNlAHMzY3JldA==")
    await cmd(reader, writer, b"MAIL FROM:<alice@example.com>")
    assert (await cmd(reader, writer, b"RCPT TO:<bob@example.org>")).startswith(b"250")
    data = await asyncio.wait_for(reader.read(), 5)
    assert data.startswith(b"421 4.4.2"), data
    writer.close()
    await asyncio.sleep(0.2)
    # The upstream transaction was reset and its connection pooled again.
    assert sink.messages == []
    assert len(h.gw.relay.upstreams[0].idle) == 1


async def test_idle_timeout_closes_with_421(sink, gateway_factory):
    h = await gateway_factory(sink, smtp={"idle_timeout": 0.5})
    reader, writer, _ = await raw_session(h.port())
    data = await asyncio.wait_for(reader.read(), 5)
    assert data.startswith(b"421 4.4.2"), data
    writer.close()


# ----------------------------------------------------------------- upstream
async def test_upstream_down_defers_and_relays_nothing(gateway_factory):
    h = await gateway_factory(None)  # the upstream port has no listener
    await h.add_account()
    c = await client(h.port())
    await c.login("alice", "s3cret")
    await c.mail("alice@example.com")
    with pytest.raises(aiosmtplib.SMTPRecipientRefused) as err:
        await c.rcpt("bob@example.org")
    assert err.value.code == 451 and err.value.message.startswith("4.4.1")
    await c.quit()


async def test_failover_to_second_upstream(sink, gateway_factory, caplog):
    from conftest import free_port
    dead = free_port()
    h = await gateway_factory(sink, relay={"upstreams": [
        {"host": "127.0.0.1", "port": dead, "connect_timeout": 1.0},
        {"host": "127.0.0.1", "port": sink.port}]})
    await h.add_account()
    c = await client(h.port())
    await c.login("alice", "s3cret")
    await c.sendmail("alice@example.com", ["bob@example.org"], MESSAGE)
    await c.quit()
    await sink.wait_for(1)
    # the log records the failover: the first upstream unreachable, the message relayed by the second
    assert any(r.name == "gateway.relay" and f"upstream 127.0.0.1:{dead} unreachable" in r.getMessage()
               for r in caplog.records), caplog.text
    rec = [r for r in h.log_records() if r.get("decision") == "relayed"][0]
    assert rec["upstream"] == f"127.0.0.1:{sink.port}", rec
    assert ("relay", "pass", f"upstream 127.0.0.1:{sink.port}") in [
        (o["check"], o["result"], o.get("detail")) for o in rec["ledger"]], rec["ledger"]
    assert h.gw.relay.stats["failovers"] == 1


async def test_upstream_refusing_one_of_three_recipients(sink, gateway_factory):
    sink.refuse_rcpt["nobody@example.org"] = "550 5.1.1 mailbox unknown"
    h = await gateway_factory(sink)
    await h.add_account()
    c = await client(h.port())
    await c.login("alice", "s3cret")
    await c.mail("alice@example.com")
    await c.rcpt("one@example.org")
    with pytest.raises(aiosmtplib.SMTPRecipientRefused) as err:
        await c.rcpt("nobody@example.org")
    assert err.value.code == 550 and "5.1.1" in err.value.message and "mailbox unknown" in err.value.message
    await c.rcpt("three@example.org")
    resp = await c.data(MESSAGE)
    assert resp.code == 250
    await c.quit()
    await sink.wait_for(1)
    assert sink.messages[0].rcpt_tos == ["one@example.org", "three@example.org"]
    rec = [r for r in h.log_records() if r.get("decision") == "relayed"][0]
    assert [r["to"] for r in rec["rcpts"]] == ["one@example.org", "three@example.org"]
    assert rec["rcpts_refused"] == 1


async def test_upstream_data_refusal_is_passed_back(sink, gateway_factory):
    sink.data_reply = "554 5.7.1 upstream content filter said no"
    h = await gateway_factory(sink)
    await h.add_account()
    c = await client(h.port())
    await c.login("alice", "s3cret")
    with pytest.raises(aiosmtplib.SMTPDataError) as err:
        await c.sendmail("alice@example.com", ["bob@example.org"], MESSAGE)
    assert err.value.code == 554 and "5.7.1" in err.value.message
    await c.quit()


async def test_client_disconnect_mid_data_relays_nothing(sink, gateway_factory):
    h = await gateway_factory(sink)
    await h.add_account()
    reader, writer, _ = await raw_session(h.port())
    await cmd(reader, writer, b"EHLO x")
    assert (await cmd(reader, writer, b"AUTH PLAIN AGFsaWNlAHMzY3JldA==")).startswith(b"235")
    assert (await cmd(reader, writer, b"MAIL FROM:<alice@example.com>")).startswith(b"250")
    assert (await cmd(reader, writer, b"RCPT TO:<bob@example.org>")).startswith(b"250")
    assert (await cmd(reader, writer, b"DATA")).startswith(b"354")
    writer.write(MESSAGE[:60])
    await writer.drain()
    writer.close()
    await asyncio.sleep(0.5)
    assert sink.messages == []
    # The upstream connection was reset and reused for the next message.
    c = await client(h.port())
    await c.login("alice", "s3cret")
    await c.sendmail("alice@example.com", ["bob@example.org"], MESSAGE)
    await c.quit()
    await sink.wait_for(1)
    assert len(sink.messages) == 1
    assert any(r["decision"] == "aborted" for r in h.log_records())


async def test_upstream_connections_are_reused(sink, gateway_factory):
    h = await gateway_factory(sink)
    await h.add_account()
    c = await client(h.port())
    await c.login("alice", "s3cret")
    for _ in range(5):
        await c.sendmail("alice@example.com", ["bob@example.org"], MESSAGE)
    await c.quit()
    await sink.wait_for(5)
    assert sink.connections == 1
    assert h.gw.relay.stats["connections_reused"] == 4


# ----------------------------------------------------------------- trace and log
async def test_bytes_relayed_unchanged_with_trace_prepended(sink, gateway_factory):
    h = await gateway_factory(sink)
    await h.add_account()
    c = await client(h.port())
    await c.login("alice", "s3cret")
    await c.sendmail("alice@example.com", ["bob@example.org"], MESSAGE)
    await c.quit()
    await sink.wait_for(1)
    data = sink.messages[0].data
    assert data.endswith(MESSAGE)
    added = data[: -len(MESSAGE)]
    assert added.startswith(b"Received: from client.test ([127.0.0.1])")
    assert b"(authenticated account alice)" in added
    assert b"by gw.test with ESMTPA id " in added
    rec = [r for r in h.log_records() if r.get("decision") == "relayed"][0]
    assert f"X-Gateway-Trace: {rec['trace_id']}\r\n".encode() in added
    assert f"id {rec['trace_id']}".encode() in added
    assert rec["account"] == "alice" and rec["mail_from"] == "alice@example.com"
    checks = [(o["check"], o["result"]) for o in rec["ledger"]]
    assert ("auth", "pass") in checks and ("rcpt_relay", "pass") in checks and ("relay", "pass") in checks
    assert rec["size"] == len(MESSAGE)
    assert rec["reply"].startswith("250 2.0.0")
    # the bytes metric counts the client's message (not the trace headers), counted after the reply
    relayed = [line for line in h.gw.metrics.render().decode().splitlines()
               if line.startswith("gateway_bytes_relayed_total ")]
    assert relayed == [f"gateway_bytes_relayed_total {float(len(MESSAGE))}"], relayed


# ----------------------------------------------------------------- robustness
class _Boom:
    name = "boom"
    phase = Phase.MAIL

    async def run(self, tx, item=None) -> Outcome:
        raise RuntimeError("bug")


async def test_bug_in_a_check_defers_with_451(sink, gateway_factory):
    h = await gateway_factory(sink)
    await h.add_account()
    h.gw.pipeline.phases[Phase.MAIL].append(_Boom())
    c = await client(h.port())
    await c.login("alice", "s3cret")
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as err:
        await c.mail("alice@example.com")
    assert err.value.code == 451 and err.value.message.startswith("4.3.0")
    # the reply names no exception (that is for the ledger and the log)
    assert err.value.message == "4.3.0 Temporary internal error, try again later", err.value.message
    await c.quit()
    ledger = [rec for rec in h.log_records() if rec.get("decision") == "deferred"][0]["ledger"]
    assert {"check": "boom", "result": "error", "detail": "internal error: RuntimeError"}.items() <= ledger[-1].items()


async def test_data_timeout_is_announced_as_such(sink, gateway_factory):
    h = await gateway_factory(sink, smtp={"data_timeout": 0.5})
    await h.add_account()
    reader, writer = await session(h.port())
    assert (await cmd(reader, writer, b"MAIL FROM:<alice@example.com>")).startswith(b"250")
    assert (await cmd(reader, writer, b"RCPT TO:<bob@example.org>")).startswith(b"250")
    assert (await cmd(reader, writer, b"DATA")).startswith(b"354")
    writer.write(b"Subject: never ends\r\n\r\nstill writing")
    await writer.drain()
    got = await asyncio.wait_for(read_reply(reader), 10)
    assert got == b"421 4.4.2 P-LOAD DATA timeout: the message did not end in time, closing\r\n", got
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    assert sink.messages == []


async def test_too_many_transactions_has_its_own_reply(sink, gateway_factory):
    h = await gateway_factory(sink, smtp={"max_transactions": 1})
    await h.add_account()
    reader, writer = await session(h.port())
    assert (await cmd(reader, writer, b"MAIL FROM:<alice@example.com>")).startswith(b"250")
    assert (await cmd(reader, writer, b"RSET")).startswith(b"250")
    got = await cmd(reader, writer, b"MAIL FROM:<alice@example.com>")
    assert got == b"421 4.7.0 P-LOAD Too many transactions in this session, closing\r\n", got
    writer.close()


async def test_bug_outside_checks_defers_with_451(sink, gateway_factory, monkeypatch):
    h = await gateway_factory(sink)
    await h.add_account()

    async def broken(*a, **kw):
        raise RuntimeError("bug in relay")
    monkeypatch.setattr(h.gw.relay, "begin", broken)
    c = await client(h.port())
    await c.login("alice", "s3cret")
    await c.mail("alice@example.com")
    with pytest.raises(aiosmtplib.SMTPRecipientRefused) as err:
        await c.rcpt("bob@example.org")
    assert err.value.code == 451 and err.value.message.startswith("4.3.0")
    # the session survives
    assert (await c.noop()).code == 250
    await c.quit()


async def test_graceful_shutdown_lets_inflight_transaction_finish(sink, gateway_factory):
    h = await gateway_factory(sink)
    await h.add_account()
    idle_reader, idle_writer, _ = await raw_session(h.port())
    c = await client(h.port())
    await c.login("alice", "s3cret")
    await c.mail("alice@example.com")
    await c.rcpt("bob@example.org")
    stopping = asyncio.get_running_loop().create_task(h.gw.stop(grace=10))
    await asyncio.sleep(0.2)
    # An idle session is closed with 421 4.3.2 at once ...
    assert (await asyncio.wait_for(idle_reader.read(), 5)).startswith(b"421 4.3.2")
    # ... new connections are refused ...
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", h.port())
    # ... and the transaction in flight completes.
    resp = await c.data(MESSAGE)
    assert resp.code == 250
    await asyncio.wait_for(stopping, 10)
    await sink.wait_for(1)
    idle_writer.close()


async def test_shutdown_grace_expiry_closes_with_421(sink, gateway_factory):
    h = await gateway_factory(sink)
    await h.add_account()
    reader, writer, _ = await raw_session(h.port())
    await cmd(reader, writer, b"EHLO x")
    await cmd(reader, writer, b"AUTH PLAIN AGFsaWNlAHMzY3JldA==")
    await cmd(reader, writer, b"MAIL FROM:<alice@example.com>")
    await h.gw.stop(grace=0.3)
    assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"421 4.3.2")
    assert sink.messages == []


# ----------------------------------------------------------------- PROXY protocol
async def test_proxy_protocol_v1_and_v2_client_address(sink, gateway_factory):
    h = await gateway_factory(sink, listeners=[{"name": "plain", "address": "127.0.0.1", "port": 0,
                                                "tls": "none", "proxy_protocol": True}])
    reader, writer = await proxied_session(h.port(), "203.0.113.5")
    assert (await reader.readline()).startswith(b"220 ")
    await cmd(reader, writer, b"EHLO x")
    await cmd(reader, writer, b"MAIL FROM:<a@example.net>")
    await cmd(reader, writer, b"RCPT TO:<b@example.org>")
    await cmd(reader, writer, b"QUIT")
    writer.close()
    import ipaddress
    import struct
    v2 = (b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x21]) + struct.pack("!H", 36)
          + ipaddress.IPv6Address("2001:db8::7").packed + ipaddress.IPv6Address("2001:db8::1").packed
          + struct.pack("!HH", 40001, 25))
    reader, writer = await asyncio.open_connection("127.0.0.1", h.port())
    writer.write(v2)
    await writer.drain()
    assert (await reader.readline()).startswith(b"220 ")
    await cmd(reader, writer, b"EHLO x")
    await cmd(reader, writer, b"MAIL FROM:<a@example.net>")
    await cmd(reader, writer, b"RCPT TO:<b@example.org>")
    await cmd(reader, writer, b"QUIT")
    writer.close()
    await asyncio.sleep(0.1)
    ips = [r["client_ip"] for r in h.log_records()]
    assert ips == ["203.0.113.5", "2001:db8::7"]
    assert all(r.get("proxied") for r in h.log_records())


async def test_proxy_header_missing_or_untrusted_closes(sink, gateway_factory):
    h = await gateway_factory(sink, listeners=[{"name": "plain", "address": "127.0.0.1", "port": 0,
                                                "tls": "none", "proxy_protocol": True,
                                                "proxy_trusted": ["10.0.0.0/8"]}])
    reader, writer = await proxied_session(h.port(), "203.0.113.5")
    try:
        data = await asyncio.wait_for(reader.read(), 5)
    except ConnectionResetError:
        data = b""
    assert data == b"", "no greeting for a PROXY header from an untrusted peer"


# ----------------------------------------------------------------- blocking client
async def test_stdlib_smtplib_client(sink, gateway_factory):
    h = await gateway_factory(sink)
    await h.add_account()

    def send():
        with smtplib.SMTP("127.0.0.1", h.port(), timeout=10) as s:
            s.login("alice", "s3cret")
            return s.sendmail("alice@example.com", ["bob@example.org", "carol@example.org"], MESSAGE)

    assert await asyncio.to_thread(send) == {}
    await sink.wait_for(1)
    assert sink.messages[0].rcpt_tos == ["bob@example.org", "carol@example.org"]
    assert b"\r\n.leading dot line\r\n" in sink.messages[0].data


async def test_non_ascii_encoded_word_is_refused_not_deferred(sink, gateway_factory):
    """A defect our parser trips over must end as a finding (5xx), never as 451 forever."""
    h = await gateway_factory(sink)
    await h.add_account()
    c = await client(h.port())
    await c.login("alice", "s3cret")
    message = MESSAGE.replace(b"Subject: test message", "Subject: =?utf-8?q?caf\u00e9?=".encode())
    await c.execute_command(b"MAIL", b"FROM:<alice@example.com>", b"SMTPUTF8", b"BODY=8BITMIME")
    await c.rcpt("bob@example.org")
    with pytest.raises(aiosmtplib.SMTPDataError) as err:
        await c.data(message)
    assert err.value.code == 550 and "P-HDR" in err.value.message, err.value
    await c.quit()
