"""Sender authorization (P-FORGE) end to end: real SMTP through the gateway,
the DNS proof through the test DNS server (UDP loopback), the CLI as a
subprocess against the gateway's own database."""
from __future__ import annotations

import asyncio
import email.utils
import time

import pytest

from gateway.accounts.proof import (DomainProofChecker, ProofStatus, lookup_proof, proof_record, token_in,
                                    verify_account_domain)
from gateway.accounts.settings import AccountSettings
from gateway.accounts.store import AccountError
from gateway.checks.data_sender_auth import report_type
from gateway.accounts.authorize import authorize
from gateway.accounts.model import Account, AccountStatus, SenderDomain
from gateway.message.parse import parse_headers

from conftest import TEST_DNS, run_cli_async
from dns_fixtures import live_dns
from smtp_client import cmd, send, session


# ------------------------------------------------------------------ helpers
def serve_domain(dns_server, domain: str) -> None:
    """A zone that exists and takes mail; SOA minimum 0 so no resolver caches its negative answers."""
    dns_server.add_zone(domain, minimum=0)
    dns_server.set(domain, "MX", [f"10 mx.{domain}"], ttl=0)
    dns_server.set(f"mx.{domain}", "A", ["93.184.215.20"], ttl=0)


def publish(dns_server, domain: str, token: str) -> None:
    dns_server.set(f"_gateway-proof.{domain}", "TXT", ["v=spf1 -all", f"gateway-proof={token}"], ttl=0)


def message(sender: str = "alice@example.com", *, frm: str | None = None, extra: bytes = b"",
            body: bytes = b"Hello.\r\n", ctype: bytes = b"") -> bytes:
    frm_b = (frm if frm is not None else f"Alice <{sender}>").encode()
    return (b"From: " + frm_b + b"\r\n"
            b"To: Bob <bob@example.org>\r\n"
            b"Subject: sender auth test\r\n"
            b"Date: " + email.utils.formatdate(time.time()).encode() + b"\r\n"
            b"Message-ID: <" + str(time.monotonic_ns()).encode() + b"@example.com>\r\n"
            + extra + ctype + b"\r\n" + body)


def dsn(frm: str = "Mail Delivery System <MAILER-DAEMON@example.com>",
        report: bytes = b"delivery-status") -> bytes:
    body = (b"--b1\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
            b"--b1\r\nContent-Type: message/" + report + b"\r\n\r\n"
            b"Reporting-MTA: dns; mx.example.com\r\n\r\n"
            b"Final-Recipient: rfc822; nobody@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n"
            b"--b1--\r\n")
    return message(frm=frm, ctype=b"MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type="
                   + report + b"; boundary=\"b1\"\r\n", body=body)


def write_cli_config(tmp_path, dns_server) -> str:
    path = tmp_path / "cli.toml"
    path.write_text(f"""
[[listeners]]
name = "plain"
address = "127.0.0.1"
port = 0
tls = "none"

[[relay.upstreams]]
host = "127.0.0.1"
port = 2526

[storage]
url = "sqlite+aiosqlite:///{tmp_path / 'gw.db'}"

[auth]
scrypt_n = 16
insecure_test_scrypt = true

[dns]
nameservers = ["{dns_server.address}"]
timeout = 1.0
min_ttl = 0
""")
    return str(path)


async def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


def domain_of(h, account: str, domain: str) -> SenderDomain:
    acc = h.gw.accounts.cached(account)
    return next(d for d in acc.domains if d.domain == domain)


# ------------------------------------------------------------------ pure rules
def _acc(*domains: tuple[str, str], subdomains: bool = False) -> Account:
    return Account(1, "a", AccountStatus.ACTIVE, allow_subdomains=subdomains,
                   domains=tuple(SenderDomain(d, s, "tok") for d, s in domains))


def test_authorize_rule():
    acc = _acc(("shop.example", "verified"), ("corp.example", "approved"), ("new.example", "pending"))
    assert authorize(acc, "shop.example").allowed
    assert authorize(acc, "corp.example").allowed
    v = authorize(acc, "new.example")
    assert not v.allowed and "awaits its DNS proof" in v.reason and "_gateway-proof.new.example" in v.reason
    v = authorize(acc, "mail.shop.example")
    assert not v.allowed and "may not send from subdomains of shop.example" in v.reason
    assert not authorize(acc, "evilshop.example").allowed  # a suffix is not a subdomain
    assert "is not a sender domain" in authorize(acc, "other.example").reason
    acc = _acc(("shop.example", "verified"), ("new.example", "pending"), subdomains=True)
    assert authorize(acc, "a.b.shop.example").allowed
    assert "awaits its DNS proof" in authorize(acc, "x.new.example").reason


def test_token_match_and_report_type():
    assert token_in(("v=spf1 -all", " gateway-proof=abc "), "abc")
    assert not token_in(("gateway-proof=abcd",), "abc")
    assert not token_in(("gateway-proof=",), "")
    assert proof_record("shop.example", "T") == '_gateway-proof.shop.example. TXT "gateway-proof=T"'
    d = dsn()
    assert report_type(d, parse_headers(d)) == "delivery-status"
    m = dsn(report=b"disposition-notification")
    assert report_type(m, parse_headers(m)) == "disposition-notification"
    # multipart/report without the machine-readable part is not a DSN
    fake = d.replace(b"Content-Type: message/delivery-status", b"Content-Type: text/plain")
    assert report_type(fake, parse_headers(fake)) is None
    plain = message()
    assert report_type(plain, parse_headers(plain)) is None


# ------------------------------------------------------------------ the proof lookup
async def test_verify_domain_through_the_test_dns_server(dns_server, make_resolver):
    serve_domain(dns_server, "proof.example")
    resolver = make_resolver()
    res = await lookup_proof(resolver, "proof.example", "tok-1")
    ok, detail = res.published, res.detail
    assert not ok and "NXDOMAIN" in detail
    dns_server.set("_gateway-proof.proof.example", "TXT", ["gateway-proof=someone-else"], ttl=0)
    res = await lookup_proof(resolver, "proof.example", "tok-1")
    ok, detail = res.published, res.detail
    assert not ok and "do not carry this domain's token" in detail
    publish(dns_server, "proof.example", "tok-1")
    res = await lookup_proof(resolver, "proof.example", "tok-1")
    ok, detail = res.published, res.detail
    assert ok, detail
    # fresh=True: the answer cached a moment ago does not hide the removal
    dns_server.remove("_gateway-proof.proof.example")
    assert (await lookup_proof(resolver, "proof.example", "tok-1")).status is ProofStatus.ABSENT
    dns_server.mode("_gateway-proof.proof.example", "servfail")
    res = await lookup_proof(resolver, "proof.example", "tok-1")
    assert res.status is ProofStatus.UNKNOWN and "failed" in res.detail


# ------------------------------------------------------------------ the life cycle over SMTP and the CLI
async def test_proof_life_cycle_over_smtp_cli_and_recheck(sink, gateway_factory, dns_server, tmp_path):
    for d in ("proof.example", "example.org"):
        serve_domain(dns_server, d)
    h = await gateway_factory(sink, dns=live_dns(dns_server), accounts={"proof_recheck_interval": 0.2})
    await h.add_account(domains=())
    dom = await h.gw.accounts.add_domain("alice", "proof.example")
    assert dom.status == "pending"
    msg = message("news@proof.example")

    # 1. not yet published: refused at MAIL, and the CLI says what to publish
    r = await send(h.port(), mail_from="news@proof.example", data=msg)
    assert r == (b"550 5.7.1 P-FORGE Sender domain not authorized for this account: proof.example awaits its "
                 b"DNS proof (TXT record at _gateway-proof.proof.example, then 'gateway account domain verify')")
    cfg = write_cli_config(tmp_path, dns_server)
    r = await run_cli_async("account", "domain", "verify", "alice", "proof.example", "--config", cfg)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "not verified: proof not yet published" in r.stdout
    assert f'_gateway-proof.proof.example. TXT "gateway-proof={dom.token}"' in r.stdout

    # 2. published: the CLI verifies, the gateway relays
    publish(dns_server, "proof.example", dom.token)
    r = await run_cli_async("account", "domain", "verify", "alice", "proof.example", "--config", cfg)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert r.stdout.startswith("domain proof.example of alice verified")
    await h.gw.accounts.refresh()
    assert domain_of(h, "alice", "proof.example").status == "verified"
    r = await send(h.port(), mail_from="news@proof.example", data=msg)
    assert r.startswith(b"250 2.0.0 OK: relayed"), r
    await sink.wait_for(1)
    assert sink.messages[0].mail_from == "news@proof.example"
    # the re-check runs every 0.2 s and keeps a published proof
    await wait_until(lambda: h.gw.proof_checker.last is not None and h.gw.proof_checker.last.kept >= 1)
    assert domain_of(h, "alice", "proof.example").status == "verified"

    # 3. record removed: the periodic re-check revokes, MAIL is refused again
    dns_server.remove("_gateway-proof.proof.example")
    await wait_until(lambda: domain_of(h, "alice", "proof.example").status == "pending")
    d = domain_of(h, "alice", "proof.example")
    assert d.note.startswith("proof gone") and "_gateway-proof.proof.example does not exist" in d.note
    r = await send(h.port(), mail_from="news@proof.example", data=message("news@proof.example"))
    assert r.startswith(b"550 5.7.1 P-FORGE Sender domain not authorized for this account: proof.example awaits")
    assert len(sink.messages) == 1


async def test_recheck_never_revokes_on_dns_failure_and_skips_approved(sink, gateway_factory, dns_server):
    for d in ("kept.example", "gone.example", "approved.example"):
        serve_domain(dns_server, d)
    h = await gateway_factory(sink, dns=live_dns(dns_server), accounts={"proof_recheck_interval": 0})
    assert not h.gw.proof_checker._task.running  # 0 = no periodic re-check
    await h.add_account(domains=("approved.example",))
    store = h.gw.accounts
    tokens = {}
    for d in ("kept.example", "gone.example"):
        tokens[d] = (await store.add_domain("alice", d)).token
        publish(dns_server, d, tokens[d])
        assert (await verify_account_domain(store, h.gw.resolver, "alice", d)).status == "verified"
    checker = DomainProofChecker(store, h.gw.resolver, AccountSettings(proof_lookup_timeout=2.0))

    # a resolver failure is no answer: nothing is revoked
    dns_server.mode("_gateway-proof.gone.example", "servfail")
    report = await checker.run_once()
    assert (report.checked, report.kept, report.unknown, report.revoked) == (2, 1, 1, 0)
    assert domain_of(h, "alice", "gone.example").status == "verified"

    # the token disappears (the TXT record stays with other strings): revoked
    dns_server.mode("_gateway-proof.gone.example", "normal")
    dns_server.set("_gateway-proof.gone.example", "TXT", ["v=spf1 -all"], ttl=0)
    report = await checker.run_once()
    assert (report.checked, report.kept, report.revoked) == (2, 1, 1)
    assert domain_of(h, "alice", "gone.example").status == "pending"
    assert domain_of(h, "alice", "kept.example").status == "verified"
    # operator-approved domains carry no proof and are never looked up
    assert dns_server.count("_gateway-proof.approved.example") == 0
    assert domain_of(h, "alice", "approved.example").status == "approved"
    # verify by hand: pending stays pending while nothing is published
    res = await verify_account_domain(store, h.gw.resolver, "alice", "gone.example")
    assert res.status == "pending" and not res.authorized
    res = await verify_account_domain(store, h.gw.resolver, "alice", "approved.example")
    assert res.status == "approved" and res.authorized


async def test_revoke_is_guarded_by_status_and_token_in_the_update(sink, gateway_factory, dns_server):
    # An operator's change made while the lookup ran wins over the re-check's revocation.
    h = await gateway_factory(sink, dns=live_dns(dns_server), accounts={"proof_recheck_interval": 0})
    await h.add_account(domains=())
    store = h.gw.accounts
    checker = DomainProofChecker(store, h.gw.resolver, AccountSettings())
    looked_up = await store.add_domain("alice", "race.example")
    assert await store.set_domain_status("alice", "race.example", "verified", note="test")
    # removed and re-added meanwhile: a new token, not what was looked up
    await store.remove_domain("alice", "race.example")
    readded = await store.add_domain("alice", "race.example")
    assert await store.set_domain_status("alice", "race.example", "verified", note="test")
    assert not await checker._revoke("alice", looked_up, "gone")
    assert domain_of(h, "alice", "race.example").status == "verified"
    # approved by an operator meanwhile
    assert await store.set_domain_status("alice", "race.example", "approved", note="approved by test")
    assert not await checker._revoke("alice", readded, "gone")
    assert domain_of(h, "alice", "race.example").status == "approved"
    # unknown account or domain: nothing to revoke
    assert not await checker._revoke("nobody", readded, "gone")
    assert not await checker._revoke("alice", SenderDomain("other.example", "verified", readded.token), "gone")
    # still as looked up: revoked
    assert await store.set_domain_status("alice", "race.example", "verified", note="test")
    assert await checker._revoke("alice", readded, "gone")
    d = domain_of(h, "alice", "race.example")
    assert d.status == "pending" and d.note.startswith("proof gone") and d.note.endswith(": gone")
    # without expectations an unknown domain is still an error
    with pytest.raises(AccountError):
        await store.set_domain_status("alice", "other.example", "verified")


async def test_operator_approved_domain_relays_without_dns_proof(sink, gateway_factory, dns_server):
    serve_domain(dns_server, "corp.example")
    serve_domain(dns_server, "example.org")
    h = await gateway_factory(sink, dns=live_dns(dns_server))
    await h.add_account(domains=("corp.example",))  # conftest: approved by an operator
    assert domain_of(h, "alice", "corp.example").note == "approved by test"
    r = await send(h.port(), mail_from="ceo@corp.example", data=message("ceo@corp.example"))
    assert r.startswith(b"250 2.0.0 OK: relayed"), r
    await sink.wait_for(1)
    await h.gw.proof_checker.run_once()
    assert dns_server.count("_gateway-proof.corp.example") == 0


# ------------------------------------------------------------------ subdomains
async def test_subdomains_only_where_the_account_allows_them(sink, gateway_factory):
    h = await gateway_factory(sink, dns={"static": TEST_DNS + ["news.example.com MX 10 mx.example.com"]})
    await h.add_account()
    msg = message("letters@news.example.com")
    r = await send(h.port(), mail_from="letters@news.example.com", data=msg)
    assert r == (b"550 5.7.1 P-FORGE Sender domain not authorized for this account: news.example.com: "
                 b"this account may not send from subdomains of example.com")
    await h.gw.accounts.update("alice", allow_subdomains=True)
    r = await send(h.port(), mail_from="letters@news.example.com", data=msg)
    assert r.startswith(b"250 2.0.0 OK: relayed"), r
    # allowed subdomains do not reach sideways: example.net stays foreign
    r = await send(h.port(), mail_from="letters@example.net", data=message("letters@example.net"))
    assert r == (b"550 5.7.1 P-FORGE Sender domain not authorized for this account: "
                 b"example.net is not a sender domain of this account")


# ------------------------------------------------------------------ headers
@pytest.mark.parametrize("frm,extra,expected", [
    ("Mallory <mallory@example.net>", b"",
     b"550 5.7.1 P-FORGE Header From domain not authorized for this account: "
     b"example.net is not a sender domain of this account"),
    # every mailbox of From counts, not just the first
    ("Alice <alice@example.com>, Eve <eve@attacker.example>", b"Sender: alice@example.com\r\n",
     b"550 5.7.1 P-FORGE Header From domain not authorized for this account: "
     b"attacker.example is not a sender domain of this account"),
    ("Alice <alice@example.com>", b"Sender: Ops <ops@example.net>\r\n",
     b"550 5.7.1 P-FORGE Header Sender domain not authorized for this account: "
     b"example.net is not a sender domain of this account"),
    # display name with an address of another domain: data_subject's finding, not repeated here
    ('"ceo@example.net" <alice@example.com>', b"",
     b"550 5.7.1 P-FORGE Misleading From display name: From display name shows an address in example.net but "
     b"the address is in example.com [subj.display_name]"),
])
async def test_foreign_header_addresses_refused(sink, gateway_factory, frm, extra, expected):
    h = await gateway_factory(sink)
    await h.add_account()
    r = await send(h.port(), mail_from="alice@example.com", data=message(frm=frm, extra=extra))
    assert r == expected
    assert sink.messages == []


async def test_display_name_address_in_a_related_domain_of_another_owner(sink, gateway_factory):
    # subj.display_name lets a parent domain pass (same organization); the
    # account owns only the subdomain, so showing the parent is forged.
    h = await gateway_factory(sink, dns={"static": TEST_DNS + ["shop.example.com MX 10 mx.example.com"]})
    await h.add_account(domains=("shop.example.com",))
    r = await send(h.port(), mail_from="news@shop.example.com",
                   data=message(frm='"billing@example.com" <news@shop.example.com>'))
    assert r == (b"550 5.7.1 P-FORGE From display name shows an address not authorized for this account: "
                 b"From display name shows an address in example.com, which is not a sender domain of this account")
    # its own address in the display name is fine
    r = await send(h.port(), mail_from="news@shop.example.com",
                   data=message(frm='"news@shop.example.com" <news@shop.example.com>'))
    assert r.startswith(b"250 2.0.0 OK: relayed"), r


async def test_utf8_header_domain_compared_as_a_label(sink, gateway_factory):
    h = await gateway_factory(sink)
    await h.add_account(domains=("xn--bcher-kva.example",))
    data = message(frm="Jörg <jörg@bücher.example>")
    r = await send(h.port(), mail_from="info@xn--bcher-kva.example", data=data, params=" SMTPUTF8 BODY=8BITMIME")
    assert r.startswith(b"250 2.0.0 OK: relayed"), r


# ------------------------------------------------------------------ the null sender
async def test_null_sender_only_for_dsn_and_mdn(sink, gateway_factory):
    h = await gateway_factory(sink)
    await h.add_account()
    r = await send(h.port(), mail_from="", data=message())
    assert r == (b"550 5.7.1 P-FORGE Null sender only for delivery status or disposition notifications: "
                 b"message is text/plain (none given), not multipart/report with a delivery-status or "
                 b"disposition-notification part")
    fake = dsn().replace(b"Content-Type: message/delivery-status", b"Content-Type: text/plain")
    r = await send(h.port(), mail_from="", data=fake)
    assert r.startswith(b"550 5.7.1 P-FORGE Null sender only for delivery status"), r
    assert sink.messages == []
    r = await send(h.port(), mail_from="", data=dsn())
    assert r.startswith(b"250 2.0.0 OK: relayed"), r
    r = await send(h.port(), mail_from="", data=dsn(report=b"disposition-notification"))
    assert r.startswith(b"250 2.0.0 OK: relayed"), r
    await sink.wait_for(2)
    assert [m.mail_from for m in sink.messages] == ["<>", "<>"]  # aiosmtpd writes the null path so
    # a DSN still needs an authorized From
    r = await send(h.port(), mail_from="", data=dsn(frm="MAILER-DAEMON@example.net"))
    assert r.startswith(b"550 5.7.1 P-FORGE Header From domain not authorized"), r


async def test_unauthenticated_sessions_are_left_to_the_relay_check(sink, gateway_factory):
    h = await gateway_factory(sink)
    await h.add_account()
    reader, writer = await session(h.port(), auth=False)
    assert (await cmd(reader, writer, b"MAIL FROM:<someone@example.net>")).startswith(b"250")
    assert (await cmd(reader, writer, b"RCPT TO:<bob@example.org>")).startswith(b"554 5.7.1 P-RELAY")
    writer.close()
