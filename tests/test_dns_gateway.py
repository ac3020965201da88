"""DNSBL and sender-domain checks end to end: SMTP client -> gateway -> the
test DNS server on UDP loopback. PROXY headers let a test claim a client
address (the RFC 5782 test points 127.0.0.2 / 127.0.0.1)."""
from __future__ import annotations


import aiosmtplib
import pytest

from conftest import CORPORA
from dns_fixtures import live_dns
from smtp_client import cmd, proxied_session, reply

ZONES = CORPORA / "dnsbl-rfc5782-rbldnsd" / "zones"


def serve_test_zone(dns_server) -> None:
    dns_server.add_zone("test-bl.example", minimum=300)
    dns_server.load_rbldnsd("test-bl.example", "ip4set", str(ZONES / "test-bl.ip4set"))
    dns_server.load_rbldnsd("test-bl.example", "ip6trie", str(ZONES / "test-bl.ip6trie"))


def dns_sections(dns_server, **dnsbl):
    return {
        "dns": live_dns(dns_server),
        "dnsbl": {"zones": [{"name": "test-bl.example", "display": "Test BL", "weight": 1,
                             "codes": ["127.0.0.2-127.0.0.11"], "txt": True}],
                  "threshold": 1, "budget": 1.5, **dnsbl},
        "listeners": [{"name": "plain", "address": "127.0.0.1", "port": 0, "tls": "none",
                       "auth_without_tls": True, "proxy_protocol": True}],
    }


async def test_listed_client_refused_at_connect(sink, gateway_factory, dns_server):
    serve_test_zone(dns_server)
    h = await gateway_factory(sink, **dns_sections(dns_server))
    reader, writer = await proxied_session(h.port(), "127.0.0.2")
    greeting = await reply(reader)
    assert greeting.startswith(b"554 5.7.1 P-BLOCK"), greeting
    assert b"Test BL" in greeting and b"test-bl.example" not in greeting
    writer.close()
    # 127.0.0.1 is the RFC 5782 "never listed" point.
    reader, writer = await proxied_session(h.port(), "127.0.0.1")
    assert (await reply(reader)).startswith(b"220 ")
    writer.close()
    refused = [r for r in h.log_records() if r["event"] == "session_refused"]
    assert refused and refused[0]["client_ip"] == "127.0.0.2"


async def test_listed_ipv6_client_refused(sink, gateway_factory, dns_server):
    serve_test_zone(dns_server)
    h = await gateway_factory(sink, **dns_sections(dns_server))
    reader, writer = await proxied_session(h.port(), "::ffff:7f00:2")
    assert (await reply(reader)).startswith(b"554 5.7.1 P-BLOCK")
    writer.close()


async def test_decide_at_mail_exempts_authenticated_account(sink, gateway_factory, dns_server):
    serve_test_zone(dns_server)
    dns_server.add_zone("example.com")
    dns_server.set("example.com", "MX", ["10 mx.example.com"])
    dns_server.set("mx.example.com", "A", ["93.184.215.14"])
    h = await gateway_factory(sink, **dns_sections(dns_server, decide_at="mail"))
    await h.add_account()
    reader, writer = await proxied_session(h.port(), "127.0.0.2")
    assert (await reply(reader)).startswith(b"220 ")
    await cmd(reader, writer, b"EHLO x")
    # Unauthenticated: refused at MAIL, with the reason readable in the session.
    r = await cmd(reader, writer, b"MAIL FROM:<alice@example.com>")
    assert r.startswith(b"554 5.7.1 P-BLOCK"), r
    assert (await cmd(reader, writer, b"AUTH PLAIN AGFsaWNlAHMzY3JldA==")).startswith(b"235")
    assert (await cmd(reader, writer, b"MAIL FROM:<alice@example.com>")).startswith(b"250")
    writer.close()
    # one check for the session: the lookups started at connect only warm the cache
    assert h.gw.dnsbl.stats.checks == 1 and h.gw.dnsbl.stats.listed == 1


async def test_dnsbl_resolver_failure_fail_open_and_closed(sink, gateway_factory, dns_server):
    dns_server.add_zone("test-bl.example")
    dns_server.mode("2.0.0.127.test-bl.example", "servfail")
    h = await gateway_factory(sink, **dns_sections(dns_server, on_error="closed"))
    reader, writer = await proxied_session(h.port(), "127.0.0.2")
    assert (await reply(reader)).startswith(b"451 4.7.1 P-BLOCK")
    writer.close()


# ---------------------------------------------------------------- sender domain (P-DOM)
@pytest.fixture
def domains(dns_server):
    dns_server.add_zone("good.example")
    dns_server.set("good.example", "MX", ["10 mx.good.example"])
    dns_server.set("mx.good.example", "A", ["93.184.215.14"])
    dns_server.add_zone("implicit.example")
    dns_server.set("implicit.example", "A", ["93.184.215.15"])
    dns_server.add_zone("nullmx.example")
    dns_server.set("nullmx.example", "MX", ["0 ."])
    dns_server.add_zone("bogus.example")
    dns_server.set("bogus.example", "MX", ["10 mx.bogus.example"])
    dns_server.set("mx.bogus.example", "A", ["127.0.0.1"])
    dns_server.add_zone("slow.example")
    dns_server.mode("slow.example", "drop")
    dns_server.add_zone("nx.example")
    dns_server.add_zone("example.com")  # the From domain of the test message
    dns_server.set("example.com", "MX", ["10 mx.good.example"])
    return dns_server


@pytest.mark.parametrize("sender,expected", [
    ("a@good.example", b"250 2.1.0"),
    ("a@implicit.example", b"250 2.1.0"),
    ("a@nullmx.example", b"550 5.7.27 P-DOM"),
    ("a@bogus.example", b"550 5.1.8 P-DOM"),
    ("a@gone.nx.example", b"550 5.1.8 P-DOM"),
    ("a@slow.example", b"451 4.4.3 P-DOM"),
])
async def test_sender_domain_must_exist(sink, gateway_factory, domains, sender, expected):
    h = await gateway_factory(sink, dns=live_dns(domains))
    await h.add_account(domains=("good.example", "implicit.example", "nullmx.example", "bogus.example",
                                 "gone.nx.example", "slow.example"))
    c = aiosmtplib.SMTP(hostname="127.0.0.1", port=h.port(), timeout=10)
    await c.connect()
    await c.login("alice", "s3cret")
    resp = await c.execute_command(b"MAIL", f"FROM:<{sender}>".encode())
    assert f"{resp.code} {resp.message}".encode().startswith(expected), resp
    await c.quit()


async def test_null_sender_skips_domain_check_and_relays(sink, gateway_factory, domains):
    h = await gateway_factory(sink, dns=live_dns(domains))
    await h.add_account(domains=("good.example",))
    c = aiosmtplib.SMTP(hostname="127.0.0.1", port=h.port(), timeout=10)
    await c.connect()
    await c.login("alice", "s3cret")
    # The null sender is for DSNs only (P-FORGE), and From must be the account's.
    import email.utils
    dsn = (b"From: Mail Delivery System <MAILER-DAEMON@good.example>\r\n"
           b"To: bob@good.example\r\nSubject: Undelivered Mail\r\n"
           b"Date: " + email.utils.formatdate().encode() + b"\r\n"
           b"Message-ID: <dsn-1@good.example>\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/report; report-type=delivery-status; boundary=\"b1\"\r\n\r\n"
           b"--b1\r\nContent-Type: text/plain\r\n\r\nNot delivered.\r\n"
           b"--b1\r\nContent-Type: message/delivery-status\r\n\r\n"
           b"Reporting-MTA: dns; mx.good.example\r\n\r\nFinal-Recipient: rfc822; x@example.org\r\n"
           b"Action: failed\r\nStatus: 5.1.1\r\n\r\n--b1--\r\n")
    await c.sendmail("", ["bob@good.example"], dsn)
    await c.quit()
    await sink.wait_for(1)
