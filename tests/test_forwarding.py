"""Forwarded mail (SRS), allowed per account or per identity (docs/forwarding.md).

Pure rules first (SRS0/SRS1, the recognition rule, the settings), then the
store on SQLite and PostgreSQL, the CLI, and SMTP end to end against the real
server and the test upstream sink: forwarding with evidence relayed byte for
byte under an SRS0 envelope sender (a customer DKIM signature still verifies),
candidates without evidence refused, and the bounce path back to the original
sender through the SRS domain, which is no open relay.
"""
from __future__ import annotations

import base64
import email.utils
import time
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.accounts.model import Account, AccountStatus, SenderDomain
from gateway.accounts.store import AccountError, AccountStore
from gateway.config import ConfigError, from_mapping
from gateway.forwarding import (RECEIVED_HOPS, Evidence, ForwardingSettings, Srs, SrsError, account_scope,
                                find_evidence)
from gateway.message.parse import parse_headers
from gateway.storage.db import create_engine, migrate

from conftest import base_config, free_port, run_cli_async
from smtp_client import cmd, dot_stuff, reply, send, session
from test_postfix import SUBMISSION, postfix_factory  # noqa: F401 - the fixture (Postfix started per test)

SECRET = "forwarding-test-secret-0123456789"
SRS_DOMAIN = "srs.gw.test"
FORWARDING = {"srs_domain": SRS_DOMAIN, "srs_secret": SECRET}
DAY = 86400.0


def srs(clock=time.time, secret: str = SECRET, domain: str = SRS_DOMAIN, **kw) -> Srs:
    return Srs(secret.encode(), domain, clock=clock, **kw)


# ------------------------------------------------------------------ SRS (pure)
def test_srs0_round_trip():
    s = srs()
    addr = s.forward("news", "Example.ORG")
    local, _, domain = addr.rpartition("@")
    assert domain == SRS_DOMAIN
    assert local.startswith("SRS0=") and local.endswith("=example.org=news")
    assert s.reverse(local) == ("news", "example.org")
    # local parts with '=' and '+' survive (the original local part is the rest)
    local2 = s.forward("a=b+c", "example.org").rpartition("@")[0]
    assert s.reverse(local2) == ("a=b+c", "example.org")
    # a local part that needs quoting is quoted as a whole
    quoted = s.forward("john doe", "example.org")
    assert quoted.startswith('"SRS0=') and quoted.endswith('=example.org=john doe"@' + SRS_DOMAIN)
    assert s.reverse(quoted.rpartition("@")[0][1:-1]) == ("john doe", "example.org")
    # a sender of the SRS domain itself is not rewritten again
    assert s.forward("SRS0=xx=AA=example.org=news", SRS_DOMAIN) == f"SRS0=xx=AA=example.org=news@{SRS_DOMAIN}"


def test_srs1_of_an_srs0_address_goes_back_to_the_first_forwarder():
    first = srs(secret="first-forwarder-secret-xyz", domain="fwd1.example")
    srs0 = first.forward("news", "example.org").rpartition("@")[0]
    s = srs()
    srs1 = s.forward(srs0, "fwd1.example")
    local = srs1.rpartition("@")[0]
    assert local.startswith("SRS1=") and "=fwd1.example==" in local
    assert local.endswith(srs0[4:])               # the first forwarder's SRS0 tail, unchanged
    back_local, back_domain = s.reverse(local)
    assert (back_local, back_domain) == (srs0, "fwd1.example")
    assert first.reverse(back_local) == ("news", "example.org")
    # an SRS1 address forwarded once more stays SRS1 (re-hashed), still naming the first forwarder
    again = srs(secret="third-forwarder-secret-abc", domain="fwd3.example")
    srs1b = again.forward(local, SRS_DOMAIN).rpartition("@")[0]
    assert srs1b.startswith("SRS1=") and "=fwd1.example==" in srs1b
    assert again.reverse(srs1b) == (srs0, "fwd1.example")
    with pytest.raises(SrsError) as exc:           # our hash, not the third forwarder's
        s.reverse(srs1b)
    assert exc.value.kind == "hash"


def test_srs_bad_hash_and_syntax():
    s = srs()
    local = s.forward("news", "example.org").rpartition("@")[0]
    parts = local.split("=")
    parts[1] = "AAAAAA" if parts[1] != "AAAAAA" else "BBBBBB"
    for bad, kind in (("=".join(parts), "hash"),
                      (local.replace("example.org", "example.net"), "hash"),    # hash covers the domain
                      (local.replace("=news", "=admin"), "hash"),               # and the local part
                      ("postmaster", "syntax"), ("SRS0=abc", "syntax"), ("SRS1=abc=def", "syntax"),
                      ("SRS0=" + parts[1] + "=!!=example.org=news", "hash")):
        with pytest.raises(SrsError) as exc:
            s.reverse(bad)
        assert exc.value.kind == kind, bad
    # another secret does not verify
    with pytest.raises(SrsError):
        srs(secret="another-secret-0123456789").reverse(local)


def test_srs_expiry_with_an_injected_clock():
    now = [1_000_000 * DAY + 3600.0]
    s = srs(clock=lambda: now[0], max_age_days=21)
    local = s.forward("news", "example.org").rpartition("@")[0]
    now[0] += 21 * DAY
    assert s.reverse(local) == ("news", "example.org")
    now[0] += DAY
    with pytest.raises(SrsError) as exc:
        s.reverse(local)
    assert exc.value.kind == "expired" and "22 days old" in exc.value.detail
    # the day counter wraps at 1024: an address from 1024 days ago would look fresh,
    # one from 1023 days ago is 1023 days old
    now[0] = 1_000_000 * DAY + 1023 * DAY
    with pytest.raises(SrsError):
        s.reverse(local)


def test_srs_hash_compare_is_case_insensitive():
    s = srs()
    local = s.forward("News", "Example.org").rpartition("@")[0]
    for variant in (local.lower(), local.upper(), local.swapcase()):
        orig_local, domain = s.reverse(variant)
        assert domain == "example.org" and orig_local.lower() == "news"


def test_srs_refuses_a_local_part_over_64_octets():
    s = srs()
    with pytest.raises(SrsError) as exc:
        s.forward("a-rather-long-mailbox-name-of-a-newsletter", "bounces.mailer.example.org")
    assert exc.value.kind == "too_long"


def test_forwarding_settings_are_checked():
    def load(fwd):
        return from_mapping(base_config_dict(forwarding=fwd), "gw.toml")

    with pytest.raises(ConfigError) as exc:
        load({"srs_domain": SRS_DOMAIN})
    assert "gw.toml" in str(exc.value) and "forwarding.srs_secret" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        load({"srs_domain": SRS_DOMAIN, "srs_secret": "short"})
    assert "at least 16" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        load({"srs_domain": "not a domain", "srs_secret": SECRET})
    assert "forwarding.srs_domain" in str(exc.value)
    cfg = from_mapping(base_config_dict(forwarding={"srs_domain": "SRS.GW.test", "srs_secret": "env:SRS_KEY"}),
                       "gw.toml", env={"SRS_KEY": SECRET})
    assert cfg.forwarding.srs_domain == SRS_DOMAIN and cfg.forwarding.srs_secret == SECRET
    assert not ForwardingSettings().enabled


def base_config_dict(**sections):
    return base_config(Path("/nonexistent"), None, **sections)


# ------------------------------------------------------------------ recognition (pure)
def _account(forwarding=True, identities=(), domains=("shop.example",)) -> Account:
    return Account(1, "shop", AccountStatus.ACTIVE, domains=tuple(SenderDomain(d, "approved") for d in domains),
                   forwarding=forwarding, forward_identities=tuple(identities))


def _headers(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\nbody\r\n").encode()


def evidence(acc: Account, *lines: str) -> Evidence | None:
    return find_evidence(parse_headers(_headers(*lines)), account_scope(acc))


def test_recognition_rule_fields():
    acc = _account()
    frm = "From: News <news@example.org>"
    assert str(evidence(acc, "Delivered-To: info@shop.example", frm)) == "Delivered-To: info@shop.example"
    assert evidence(acc, "X-Original-To: Info@SHOP.example", frm).address == "Info@SHOP.example"
    # Gmail style: the forwarding mailbox, then the destination
    assert evidence(acc, "X-Forwarded-For: info@shop.example someone@gmail.example", frm).field == \
        "X-Forwarded-For"
    assert evidence(acc, "X-Forwarded-To: sales@shop.example", frm) is not None
    assert evidence(acc, "Resent-From: Info <info@shop.example>", "Resent-To: someone@gmail.example", frm) \
        .field == "Resent-From"
    rcvd = ("Received: from mx.example.org (mx.example.org [192.0.2.1]) by mx.shop.example (Postfix) "
            "with ESMTP id 4AbC for <info@shop.example>; Thu, 3 Dec 2026 10:00:00 +0000")
    got = evidence(acc, rcvd, "Received: from a by mx.example.org; Thu, 3 Dec 2026 09:59:00 +0000", frm)
    assert got == Evidence("Received for", "info@shop.example")
    # nothing naming the account's domains: no evidence
    assert evidence(acc, "Delivered-To: news@example.org", "X-Original-To: someone@gmail.example", frm) is None
    assert evidence(acc, "To: info@shop.example", frm) is None      # To is what the author wrote, not delivery
    assert evidence(acc, "Received: from x by y; Thu, 3 Dec 2026 10:00:00 +0000", frm) is None


def test_recognition_rule_reads_only_the_topmost_received_hops():
    acc = _account()
    ours = "Received: from x by mx.shop.example for <info@shop.example>; Thu, 3 Dec 2026 10:00:00 +0000"
    other = "Received: from a by b.example; Thu, 3 Dec 2026 10:00:00 +0000"
    assert evidence(acc, *([other] * (RECEIVED_HOPS - 1)), ours) is not None
    assert evidence(acc, *([other] * RECEIVED_HOPS), ours) is None


def test_recognition_rule_identity_scope_and_domain_status():
    acc = _account(forwarding=False, identities=("info@shop.example",))
    assert evidence(acc, "Delivered-To: INFO@shop.example") is not None
    assert evidence(acc, "Delivered-To: sales@shop.example") is None
    # a pending domain is not the account's (yet)
    pending = Account(1, "shop", AccountStatus.ACTIVE, domains=(SenderDomain("shop.example", "pending"),),
                      forwarding=True)
    assert evidence(pending, "Delivered-To: info@shop.example") is None
    # subdomains only where the account allows them
    assert evidence(_account(), "Delivered-To: info@eu.shop.example") is None


# ------------------------------------------------------------------ store and CLI
async def test_store_forwarding_permissions(storage_url):
    engine = create_engine(storage_url)
    try:
        await migrate(engine)
        store = AccountStore(engine, scrypt_n=16)
        other = AccountStore(engine, scrypt_n=16)     # a running gateway's snapshot
        await store.refresh()
        await store.add("shop", "pw")
        await store.add_domain("shop", "shop.example", approved_by="test")
        with pytest.raises(AccountError, match="not a sender domain"):
            await store.allow_forwarding("shop", "info@elsewhere.example")
        assert await store.allow_forwarding("shop", "Info@Shop.Example") == "info@shop.example"
        await store.allow_forwarding("shop", "info@shop.example")          # idempotent
        await other.refresh()
        acc = other.cached("shop")
        assert acc.forward_identities == ("info@shop.example",) and not acc.forwarding and acc.may_forward
        await store.allow_forwarding("shop")
        await other.refresh()
        assert other.cached("shop").forwarding
        with pytest.raises(AccountError, match="every mailbox"):
            await store.deny_forwarding("shop", "sales@shop.example")
        await store.deny_forwarding("shop", "info@shop.example")
        await other.refresh()
        assert other.cached("shop").forward_identities == () and other.cached("shop").forwarding
        await store.allow_forwarding("shop", "sales@shop.example")
        await store.deny_forwarding("shop")                              # ends all of it
        await other.refresh()
        acc = other.cached("shop")
        assert not acc.may_forward and acc.forward_identities == ()
    finally:
        await engine.dispose()


async def test_cli_forwarding_allow_deny_show(tmp_path):
    conf = tmp_path / "gw.toml"
    conf.write_text(f"""
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

[forwarding]
srs_domain = "{SRS_DOMAIN}"
srs_secret = "env:GW_SRS_SECRET"
""")
    env = {"GW_SRS_SECRET": SECRET}
    r = await run_cli_async("account", "add", "shop", "-c", str(conf), input="pw\n", env=env)
    assert r.returncode == 0, r.stderr
    r = await run_cli_async("account", "domain", "add", "shop", "shop.example", "--approve", "-c", str(conf),
                            env=env)
    assert r.returncode == 0, r.stderr
    r = await run_cli_async("account", "forwarding", "allow", "shop", "--identity", "info@shop.example",
                            "-c", str(conf), env=env)
    assert r.returncode == 0 and "from info@shop.example" in r.stdout, r.stderr
    r = await run_cli_async("account", "show", "shop", "-c", str(conf), env=env)
    assert "  forwarding: allowed for info@shop.example (SRS)" in r.stdout
    r = await run_cli_async("account", "forwarding", "allow", "shop", "--identity", "x@other.example",
                            "-c", str(conf), env=env)
    assert r.returncode != 0 and "other.example is not a sender domain" in r.stderr
    r = await run_cli_async("account", "forwarding", "deny", "shop", "-c", str(conf), env=env)
    assert r.returncode == 0, r.stderr
    r = await run_cli_async("account", "show", "shop", "-c", str(conf), env=env)
    assert "  forwarding: -" in r.stdout
    # a config with no SRS secret is refused before anything is changed
    bad = tmp_path / "bad.toml"
    bad.write_text(conf.read_text().replace('srs_secret = "env:GW_SRS_SECRET"\n', ""))
    r = await run_cli_async("check-config", str(bad))
    assert r.returncode != 0 and "forwarding.srs_secret" in r.stderr


# ------------------------------------------------------------------ SMTP end to end
def third_party_message(*, top: bytes = b"Delivered-To: info@shop.example\r\n", extra: bytes = b"",
                        message_id: bool = True) -> bytes:
    """A list message of a third party as the customer's MTA forwards it."""
    if message_id:
        extra = b"Message-ID: <" + str(time.time_ns()).encode() + b"@lists.author.example>\r\n" + extra
    return (top +
            b"Received: from mx.example.org (mx.example.org [192.0.2.7])\r\n"
            b"\tby mx.shop.example (Postfix) with ESMTPS id 4QaB1c; " + email.utils.formatdate().encode() + b"\r\n"
            b"From: \"support@bank.example\" <news@lists.author.example>\r\n"
            b"To: info@shop.example\r\n"
            b"Subject: Re: your weekly news\r\n"
            b"Date: " + email.utils.formatdate().encode() + b"\r\n"
            b"List-Id: Weekly news <weekly.lists.author.example>\r\n"
            b"List-Unsubscribe: <https://lists.author.example/u/123>\r\n"
            b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
            b"Precedence: list\r\n"
            + extra +
            b"MIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"\r\n"
            b"This week's news.\r\n.a line with a leading dot\r\n")


def dkim_signed(message: bytes) -> tuple[bytes, bytes]:
    """(signed message, TXT record): a real RSA DKIM signature of lists.author.example."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    head, _, _ = message.partition(b"From: ")
    body = message[len(head):]
    sig = dkim.sign(body, b"sel", b"lists.author.example", pem,
                    include_headers=[b"from", b"to", b"subject", b"date", b"list-id", b"list-unsubscribe",
                                     b"message-id"])
    return head + sig + body, b"v=DKIM1; k=rsa; p=" + base64.b64encode(pub)


def dkim_ok(data: bytes, txt: bytes) -> bool:
    return dkim.verify(data, dnsfunc=lambda name, timeout=5: txt)


def split_trace(data: bytes) -> tuple[bytes, bytes]:
    """(the gateway's trace on top, the rest): the trace is its Received and X-Gateway-Trace fields."""
    end = data.index(b"X-Gateway-Trace: ")
    end = data.index(b"\r\n", end) + 2
    return data[:end], data[end:]


async def forwarding_gateway(gateway_factory, sink, *, identities=(), account_level=True, certs=None,
                             **sections):
    sections.setdefault("forwarding", FORWARDING)
    h = await gateway_factory(sink, certs, **sections)
    await h.add_account("alice", "s3cret", domains=("shop.example",))
    if account_level:
        await h.gw.accounts.allow_forwarding("alice")
    for identity in identities:
        await h.gw.accounts.allow_forwarding("alice", identity)
    return h


async def test_forwarded_list_mail_is_relayed_byte_for_byte_with_srs0(gateway_factory, sink):
    h = await forwarding_gateway(gateway_factory, sink)
    # no Message-ID: the gateway adds none to forwarded mail (DKIM signed it as absent)
    msg, txt = dkim_signed(third_party_message(message_id=False))
    assert dkim_ok(msg, txt)
    r = await send(h.port(), msg, mail_from="bounces+123@example.org", rcpt="someone@gmail.example")
    assert r.startswith(b"250 2.0.0 OK: relayed"), r
    await sink.wait_for(1)
    got = sink.messages[0]
    local, _, domain = got.mail_from.rpartition("@")
    assert domain == SRS_DOMAIN and local.startswith("SRS0=") and local.endswith("=example.org=bounces+123")
    assert srs().reverse(local) == ("bounces+123", "example.org")
    assert got.rcpt_tos == ["someone@gmail.example"]
    trace, rest = split_trace(got.data)
    assert rest == msg                                    # every byte of the customer's message
    assert trace.startswith(b"Received: from client.test") and b"Message-ID" not in trace
    assert dkim_ok(got.data, txt)                         # the author's signature still verifies
    rec = h.log_records()[-1]
    assert rec["decision"] == "relayed"
    assert rec["forwarded"] == {"kind": "forward", "state": "confirmed",
                                "original_sender": "bounces+123@example.org",
                                "rewritten_sender": got.mail_from,
                                "evidence": "Delivered-To: info@shop.example"}
    ledger = {o["check"]: o for o in rec["ledger"]}
    assert "forwarding candidate" in ledger["mail_sender_auth"]["detail"]
    for check in ("data_headers", "data_sender_auth", "data_from_domain", "data_listmail", "data_subject"):
        assert ledger[check]["result"] == "skip", (check, ledger[check])
    for check in ("data_size", "data_wire", "data_trace", "mail_domain_exists"):
        assert ledger[check]["result"] == "pass", (check, ledger[check])


async def test_forwarded_mail_still_gets_wire_and_trace_checks(gateway_factory, sink):
    h = await forwarding_gateway(gateway_factory, sink)
    smuggled = third_party_message().replace(b"This week's news.\r\n", b"This week\n.\nMAIL FROM:<x@y>\r\n")
    r = await send(h.port(), smuggled, mail_from="news@example.org", rcpt="someone@gmail.example")
    assert r.startswith(b"550 5.6.0"), r
    forged = third_party_message(top=b"Delivered-To: info@shop.example\r\n"
                                     b"Received: from x by gw.test; Thu, 3 Dec 2026 10:00:00 +0000\r\n")
    r = await send(h.port(), forged, mail_from="news@example.org", rcpt="someone@gmail.example")
    assert r.startswith(b"550 5.7.1 P-PATH"), r
    assert sink.messages == []


async def test_candidate_without_evidence_is_refused_at_data(gateway_factory, sink):
    h = await forwarding_gateway(gateway_factory, sink)
    reader, writer = await session(h.port())
    try:
        assert (await cmd(reader, writer, b"MAIL FROM:<news@example.org>")).startswith(b"250")
        assert (await cmd(reader, writer, b"RCPT TO:<someone@gmail.example>")).startswith(b"250")
        assert (await cmd(reader, writer, b"DATA")).startswith(b"354")
        writer.write(dot_stuff(third_party_message(top=b"")) + b".\r\n")
        await writer.drain()
        r = (await reply(reader)).decode()
    finally:
        writer.close()
    assert r.startswith("550 5.7.1 P-FORGE Sender domain not authorized for this account: example.org is not "
                        "a sender domain of this account, and the message carries no forwarding evidence"), r
    assert "naming an address in shop.example" in r
    rec = h.log_records()[-1]
    assert rec["decision"] == "refused" and "forwarded" not in rec
    assert sink.messages == []


async def test_foreign_sender_without_permission_is_refused_at_mail(gateway_factory, sink):
    h = await forwarding_gateway(gateway_factory, sink, account_level=False)
    r = await send(h.port(), third_party_message(), mail_from="news@example.org", rcpt="someone@gmail.example")
    assert r == b"550 5.7.1 P-FORGE Sender domain not authorized for this account: " \
                b"example.org is not a sender domain of this account"


async def test_forwarding_without_an_srs_domain_is_refused_with_the_reason(gateway_factory, sink):
    h = await forwarding_gateway(gateway_factory, sink, forwarding={})
    r = await send(h.port(), third_party_message(), mail_from="news@example.org", rcpt="someone@gmail.example")
    assert r.startswith(b"550 5.7.1 P-FORGE") and b"[forwarding] srs_domain" in r, r


async def test_identity_level_permission(gateway_factory, sink):
    h = await forwarding_gateway(gateway_factory, sink, account_level=False, identities=("info@shop.example",))
    other = third_party_message(top=b"Delivered-To: sales@shop.example\r\n")
    r = await send(h.port(), other, mail_from="news@example.org", rcpt="someone@gmail.example")
    assert r.startswith(b"550 5.7.1 P-FORGE") and r.endswith(b"naming info@shop.example"), r
    ok = third_party_message(top=b"X-Original-To: info@shop.example\r\nDelivered-To: info@shop.example\r\n")
    r = await send(h.port(), ok, mail_from="news@example.org", rcpt="someone@gmail.example")
    assert r.startswith(b"250 2.0.0 OK: relayed"), r
    await sink.wait_for(1)
    assert sink.messages[0].mail_from.startswith("SRS0=")
    assert h.log_records()[-1]["forwarded"]["evidence"] == "X-Original-To: info@shop.example"
    # the account's own mail is still judged as before
    own = (b"From: Info <info@shop.example>\r\nTo: x@example.org\r\nSubject: Re: hi\r\n"
           b"Date: " + email.utils.formatdate().encode() + b"\r\nMessage-ID: <a1@shop.example>\r\n\r\nhi\r\n")
    r = await send(h.port(), own.replace(b"From: Info <info@shop.example>", b"From: PayPal <pp@paypal.example>"),
                   mail_from="info@shop.example", rcpt="x@example.org")
    assert r.startswith(b"550 5.7.1 P-FORGE Header From domain not authorized"), r


async def test_own_envelope_forwarding_keeps_the_envelope(gateway_factory, sink):
    """The customer's MTA rewrote the envelope already (its own SRS): no second rewrite."""
    h = await forwarding_gateway(gateway_factory, sink)
    msg = third_party_message(top=b"Delivered-To: info@shop.example\r\n")
    r = await send(h.port(), msg, mail_from="SRS0=ab12=XY=example.org=news@shop.example",
                   rcpt="someone@gmail.example")
    assert r.startswith(b"250"), r
    await sink.wait_for(1)
    assert sink.messages[0].mail_from == "SRS0=ab12=XY=example.org=news@shop.example"
    assert split_trace(sink.messages[0].data)[1] == msg
    assert h.log_records()[-1]["forwarded"]["rewritten_sender"] == "SRS0=ab12=XY=example.org=news@shop.example"


def dsn_message() -> bytes:
    return (b"From: Mail Delivery System <MAILER-DAEMON@mx.example.org>\r\n"
            b"To: someone@gmail.example\r\n"
            b"Subject: Undelivered Mail Returned to Sender\r\n"
            b"Date: " + email.utils.formatdate().encode() + b"\r\n"
            b"MIME-Version: 1.0\r\n"
            b"Content-Type: multipart/report; report-type=delivery-status; boundary=\"b\"\r\n\r\n"
            b"--b\r\nContent-Type: text/plain\r\n\r\nNot delivered.\r\n"
            b"--b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example.org\r\n\r\n"
            b"Final-Recipient: rfc822; someone@gmail.example\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n--b--\r\n")


async def bounce(port: int, rcpts: list[str], mail_from: str = "", data: bytes | None = None) -> list[bytes]:
    """An unauthenticated MX-style session: MAIL, each RCPT, DATA when one was taken; every reply."""
    reader, writer = await session(port, auth=False)
    out = []
    try:
        out.append(await cmd(reader, writer, f"MAIL FROM:<{mail_from}>".encode()))
        taken = 0
        for rcpt in rcpts:
            r = await cmd(reader, writer, f"RCPT TO:<{rcpt}>".encode())
            out.append(r)
            taken += r.startswith(b"250")
        if taken and data is not None:
            assert (await cmd(reader, writer, b"DATA")).startswith(b"354")
            writer.write(dot_stuff(data) + b".\r\n")
            await writer.drain()
            out.append(await reply(reader))
        await cmd(reader, writer, b"QUIT")
    finally:
        writer.close()
    return [r.strip() for r in out]


async def test_srs_bounce_is_relayed_to_the_original_sender(gateway_factory, sink):
    h = await forwarding_gateway(gateway_factory, sink)
    r = await send(h.port(), third_party_message(), mail_from="news@example.org", rcpt="someone@gmail.example")
    assert r.startswith(b"250"), r
    await sink.wait_for(1)
    srs_addr = sink.messages[0].mail_from
    replies_ = await bounce(h.port(), [srs_addr.lower()], data=dsn_message())   # case folded on the way back
    assert replies_[0].startswith(b"250") and replies_[1].startswith(b"250"), replies_
    assert replies_[2].startswith(b"250 2.0.0 OK: relayed"), replies_
    await sink.wait_for(2)
    back = sink.messages[1]
    assert back.mail_from == "<>" and back.rcpt_tos == ["news@example.org"]
    assert split_trace(back.data)[1] == dsn_message()
    rec = h.log_records()[-1]
    assert rec["forwarded"]["kind"] == "bounce"
    assert rec["rcpts"][0]["to"] == srs_addr.lower() and rec["rcpts"][0]["srs_to"] == "news@example.org"
    assert any(o["check"] == "forwarding" and "SRS bounce" in o["detail"] for o in rec["ledger"])


async def test_srs1_bounce_goes_to_the_first_forwarder(gateway_factory, sink):
    h = await forwarding_gateway(gateway_factory, sink)
    first = srs(secret="first-forwarder-secret-xyz", domain="example.net")
    srs0 = first.forward("news", "example.org")
    r = await send(h.port(), third_party_message(), mail_from=srs0, rcpt="someone@gmail.example")
    assert r.startswith(b"250"), r
    await sink.wait_for(1)
    srs1 = sink.messages[0].mail_from
    assert srs1.startswith("SRS1=") and "=example.net==" in srs1
    replies_ = await bounce(h.port(), [srs1], data=dsn_message())
    assert replies_[-1].startswith(b"250"), replies_
    await sink.wait_for(2)
    assert sink.messages[1].rcpt_tos == [srs0]


async def test_srs_domain_is_no_open_relay(gateway_factory, sink):
    now = [time.time()]
    h = await forwarding_gateway(gateway_factory, sink, clock=lambda: now[0])
    good = srs().forward("news", "example.org")
    local = good.rpartition("@")[0]
    parts = local.split("=")
    parts[1] = "AAAAAA" if parts[1].upper() != "AAAAAA" else "BBBBBB"
    bad_hash = "=".join(parts) + "@" + SRS_DOMAIN
    expired = srs(clock=lambda: now[0] - 30 * DAY).forward("news", "example.org")
    tampered = local.replace("example.org", "example.com") + "@" + SRS_DOMAIN
    cases = {
        bad_hash: b"550 5.7.1 P-RELAY SRS address does not verify (bad hash)",
        tampered: b"550 5.7.1 P-RELAY SRS address does not verify (bad hash)",
        expired: b"550 5.1.1 P-RELAY SRS address has expired: the SRS0 address is 30 days old (at most 21)",
        f"postmaster@{SRS_DOMAIN}": b"550 5.1.1 P-RELAY No such address: not an SRS address of this gateway",
        f"bob@{SRS_DOMAIN}": b"550 5.1.1 P-RELAY No such address: not an SRS address of this gateway",
        f"bob%example.org@{SRS_DOMAIN}": b"554 5.7.1 P-RELAY Address form not accepted (relay trick)",
        f"@{SRS_DOMAIN}:bob@example.org": b"554 5.7.1 P-RELAY Address form not accepted (relay trick)",
        "bob@example.org": b"554 5.7.1 P-RELAY Relay access denied",
    }
    for rcpt, want in cases.items():
        got = await bounce(h.port(), [rcpt])
        assert got[1].startswith(want), (rcpt, got)
    # a valid SRS address, but not a bounce
    got = await bounce(h.port(), [good], mail_from="spammer@example.com")
    assert got[1].startswith(b"550 5.7.1 P-RELAY SRS addresses take bounces only"), got
    # a valid SRS address does not open the door for other recipients
    got = await bounce(h.port(), [good, "victim@example.com"], data=dsn_message())
    assert got[1].startswith(b"250") and got[2].startswith(b"452 4.5.3 P-RELAY SRS bounces need"), got
    await sink.wait_for(1)
    assert [m.rcpt_tos for m in sink.messages] == [["news@example.org"]]


async def test_non_null_bounces_when_allowed(gateway_factory, sink):
    h = await forwarding_gateway(gateway_factory, sink, forwarding={**FORWARDING, "accept_non_null_bounces": True})
    good = srs().forward("news", "example.org")
    auto = (b"From: someone@example.com\r\nTo: news@example.org\r\nSubject: Auto: out of office\r\n"
            b"Date: " + email.utils.formatdate().encode() + b"\r\nAuto-Submitted: auto-replied\r\n\r\naway\r\n")
    got = await bounce(h.port(), [good], mail_from="someone@example.com", data=auto)
    assert got[-1].startswith(b"250"), got
    await sink.wait_for(1)
    assert sink.messages[0].mail_from == "someone@example.com"
    assert sink.messages[0].rcpt_tos == ["news@example.org"]


# ------------------------------------------------------------------ a real Postfix forwarding through the gateway
@pytest.mark.timeout(120)
async def test_postfix_virtual_alias_forwards_through_the_gateway_with_srs(sink, gateway_factory, certs,
                                                                           postfix_factory):
    """The customer's Postfix takes a third party's DKIM-signed list message for
    info@shop.example on its SMTP port, a virtual alias sends it on to an
    outside address, and Postfix relays it through the gateway (STARTTLS, SASL)
    as its relayhost. It reaches the upstream with an SRS0 envelope sender,
    the third party's bytes intact under the two Received fields, and a DKIM
    signature that still verifies."""
    h = await forwarding_gateway(gateway_factory, sink, account_level=False, identities=("info@shop.example",),
                                 certs=certs, listeners=[SUBMISSION])
    mx_port = free_port()
    pf = await postfix_factory(relay_port=h.port("submission"), ca_file=certs.ca_file, sasl=("alice", "s3cret"),
                               smtpd_port=mx_port, virtual={"info@shop.example": "someone@gmail.example"})
    msg, txt = dkim_signed(third_party_message(top=b""))
    reader, writer = await session(mx_port, auth=False)     # the third party's MX delivering to the customer
    try:
        for line in (b"MAIL FROM:<bounces+77@example.org>", b"RCPT TO:<info@shop.example>"):
            r = await cmd(reader, writer, line)
            assert r.startswith(b"250"), (line, r, pf.log_tail())
        assert (await cmd(reader, writer, b"DATA")).startswith(b"354")
        writer.write(dot_stuff(msg) + b".\r\n")
        await writer.drain()
        r = await reply(reader)
        assert r.startswith(b"250"), r
        await cmd(reader, writer, b"QUIT")
    finally:
        writer.close()
    await sink.wait_for(1, timeout=30)
    await pf.wait_empty()
    got = sink.messages[0]
    local, _, domain = got.mail_from.rpartition("@")
    assert domain == SRS_DOMAIN and local.startswith("SRS0="), got.mail_from
    assert srs().reverse(local) == ("bounces+77", "example.org")
    assert got.rcpt_tos == ["someone@gmail.example"]
    trace, rest = split_trace(got.data)
    # Postfix's own Received (naming the mailbox it took the message for), then the third party's bytes
    assert rest.startswith(b"Received: from ") and b"for <info@shop.example>" in rest.split(b"\r\n\r\n")[0]
    assert rest.endswith(msg), rest[:600]
    assert rest[:-len(msg)].count(b"Received: ") == 1
    assert dkim_ok(got.data, txt)
    rec = h.log_records()[-1]
    assert rec["forwarded"]["evidence"] == "Received for: info@shop.example"
    assert rec["forwarded"]["original_sender"] == "bounces+77@example.org"


async def test_forwarded_header_block_is_the_authors(gateway_factory, sink):
    """data_headers judges a block the account wrote: a forwarded one with an old
    Date and no Message-ID is relayed as it is (ordinary mail would be refused)."""
    h = await forwarding_gateway(gateway_factory, sink)
    old = email.utils.formatdate(time.time() - 30 * DAY).encode()
    msg = third_party_message(message_id=False).replace(b"Date: ", b"Date: " + old + b"\r\nX-Old-Date: ", 1)
    r = await send(h.port(), msg, mail_from="news@example.org", rcpt="someone@gmail.example")
    assert r.startswith(b"250"), r
    await sink.wait_for(1)
    assert split_trace(sink.messages[0].data)[1] == msg
    # the same block as the account's own mail is judged (and refused)
    own = msg.replace(b"Delivered-To: info@shop.example\r\n", b"").replace(
        b"From: \"support@bank.example\" <news@lists.author.example>", b"From: info@shop.example")
    r = await send(h.port(), own, mail_from="info@shop.example", rcpt="someone@gmail.example")
    assert r.startswith(b"550 5.6.0 P-HDR"), r


async def test_candidate_with_a_too_long_srs_address_keeps_its_sender(gateway_factory, sink):
    h = await forwarding_gateway(gateway_factory, sink)
    sender = "a-rather-long-mailbox-name-of-a-newsletter@example.org"
    r = await send(h.port(), third_party_message(), mail_from=sender, rcpt="someone@gmail.example")
    assert r.startswith(b"250"), r
    await sink.wait_for(1)
    assert sink.messages[0].mail_from == sender
    rec = h.log_records()[-1]
    assert rec["forwarded"]["rewritten_sender"] == sender and "not rewritten" in rec["forwarded"]["note"]
    mail = next(o for o in rec["ledger"] if o["check"] == "mail_sender_auth")
    assert mail["result"] == "flag" and "SRS not applied" in mail["detail"]
