"""Identity inside an account (issue 12 point 2, docs/sender-auth.md
"Identities inside an account"), over real SMTP:

- a SASL sub-login ``alice/site7`` authenticates as alice, and the per-identity
  limit of rcpt_rate stops site7 while site8 of the same account keeps sending;
- wrong passwords under rotating sub-logins count against the account's
  failure limit (and lock out the plain login too);
- a malformed sub-login is refused with 535 5.7.8 before any password check;
- a trusted account's identity header names the identity and is removed from
  the relayed copy; an untrusted account's is removed and ignored;
- the transaction log names the identity, the Received header carries only
  its keyed hash."""
from __future__ import annotations

import aiosmtplib
import pytest

from conftest import MESSAGE, WindowClock, eventually
from test_bulk_smtp import LONG
from test_rcpt_rate import FrozenClock, limits
from gateway.accounts.identity import IdentityError, from_header, identity_secret, IdentitySettings, opaque, \
    split_login
from gateway.config import from_mapping
from gateway.configload import ConfigError
from gateway.core.transaction import Phase

KEY = "identity-test-key-0123456789abcdef"


async def connect(h, user: str, password: str = "s3cret") -> aiosmtplib.SMTP:
    c = aiosmtplib.SMTP(hostname="127.0.0.1", port=h.port(), timeout=10)
    await c.connect()
    await c.login(user, password)
    return c


async def send(c: aiosmtplib.SMTP, rcpt: str, message: bytes = MESSAGE) -> int:
    code, _ = await c.mail("alice@example.com")
    assert code == 250
    r = await c.execute_command(b"RCPT", f"TO:<{rcpt}>".encode())
    if r.code != 250:
        await c.rset()
        return r.code
    try:
        return (await c.data(message))[0]
    except (aiosmtplib.SMTPDataError, aiosmtplib.SMTPResponseException) as exc:
        return exc.code


async def auth_plain(h, login: str, password: str) -> tuple[int, str]:
    """One AUTH PLAIN on a fresh connection: (code, text)."""
    import base64
    c = aiosmtplib.SMTP(hostname="127.0.0.1", port=h.port(), timeout=10)
    await c.connect()
    try:
        await c.ehlo()
        blob = base64.b64encode(b"\0" + login.encode() + b"\0" + password.encode()).decode()
        r = await c.execute_command(b"AUTH", b"PLAIN", blob.encode())
        return r.code, r.message
    finally:
        c.close()


def head_of(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[0] + b"\r\n"


# ------------------------------------------------------------------ units
def test_split_login():
    assert split_login("alice") == ("alice", None)
    assert split_login("alice/Site7") == ("alice", "site7")      # lower-cased: one site, one key
    assert split_login("alice/example.com/blog") == ("alice", "example.com/blog")
    for bad in ("alice/", "alice/a b", "alice/x\x00", "alice/" + "a" * 65, "alice/é"):
        with pytest.raises(IdentityError):
            split_login(bad)


def test_from_header_normalizes_php_script():
    assert from_header("example.com/wp-content/plugins/x.php for 1.2.3.4") == "example.com/wp-content/plugins/x.php"
    assert from_header("EXAMPLE.com/a.php for 2001:db8::1") == "example.com/a.php"
    assert from_header("/var/www/site/mail.php?id=7 for 10.0.0.1") == "var/www/site/mail.php"
    assert from_header("site 7 <weird>") == "site_7_weird"
    assert from_header("   ") is None
    assert len(from_header("a" * 500, 64) or "") == 64


def test_identity_key_and_opaque():
    s = IdentitySettings(secret=KEY)
    assert identity_secret(s, None) == KEY.encode()
    derived = identity_secret(IdentitySettings(), b"registry")
    assert derived != b"registry" and derived == identity_secret(IdentitySettings(), b"registry")
    h = opaque(KEY.encode(), "alice", "site7")
    assert len(h) == 16 and h != opaque(KEY.encode(), "alice", "site8") and "site7" not in h


@pytest.mark.parametrize("section,key,problem", [
    ({"headers": ["X Bad"]}, "identity.headers", "not a header field name"),
    ({"headers": ["Received"]}, "identity.headers", "standard field"),
    ({"trusted_accounts": ["no/slash"]}, "identity.trusted_accounts", "not an account name"),
    ({"headers": [], "trusted_accounts": ["alice"]}, "identity.trusted_accounts", "no identity header"),
    ({"max_length": 0}, "identity.max_length", "1..255"),
])
def test_config_errors_name_key(tmp_path, section, key, problem):
    from conftest import base_config
    data = base_config(tmp_path, None, identity=section)
    with pytest.raises(ConfigError) as err:
        from_mapping(data, "<test>")
    assert err.value.key == key and problem in str(err.value)


# ------------------------------------------------------------------ SASL sub-logins
async def test_sub_login_is_charged_to_its_identity(gateway_factory, sink):
    h = await gateway_factory(sink, clock=FrozenClock(), limits=limits(identity_recipients_per_minute=2),
                              identity={"secret": KEY})
    await h.add_account()
    site7 = await connect(h, "alice/site7")
    site8 = await connect(h, "alice/site8")
    try:
        assert [await send(site7, f"r{i}@example.org") for i in range(3)] == [250, 250, 451]
        # the same account, another identity: its own budget
        assert [await send(site8, f"s{i}@example.org") for i in range(2)] == [250, 250]
    finally:
        site7.close()
        site8.close()
    await eventually(lambda: len(h.log_records()) >= 5, "five transaction lines")
    relayed = [r for r in h.log_records() if r.get("event") == "transaction" and r["decision"] == "relayed"]
    assert sorted(r["identity"] for r in relayed) == ["site7", "site7", "site8", "site8"]
    assert all(r["account"] == "alice" for r in relayed)
    refused = [r for r in h.log_records() if r.get("event") == "transaction" and r["decision"] != "relayed"]
    assert [r["identity"] for r in refused] == ["site7"]
    # the relayed copy: the identity's keyed hash, never its name
    assert len(sink.messages) == 4
    for m in sink.messages:
        head = head_of(m.data)
        who = "site7" if m.rcpt_tos[0].startswith("r") else "site8"
        assert f"\t(identity {opaque(KEY.encode(), 'alice', who)})\r\n".encode() in head
        assert b"site7" not in head and b"site8" not in head


async def test_plain_login_has_no_identity(gateway_factory, sink):
    h = await gateway_factory(sink)
    await h.add_account()
    c = await connect(h, "alice")
    try:
        assert await send(c, "bob@example.org") == 250
    finally:
        c.close()
    await eventually(lambda: any(r.get("decision") == "relayed" for r in h.log_records()), "the log line")
    rec = next(r for r in h.log_records() if r.get("decision") == "relayed")
    assert "identity" not in rec
    assert b"(identity " not in head_of(sink.messages[0].data)


async def test_sub_login_failures_count_against_the_account(gateway_factory, sink):
    # base config: 5 failures per account; per IP out of the way
    h = await gateway_factory(sink, auth={"max_failures_per_ip": 100})
    await h.add_account()
    for i in range(5):   # an attacker rotating sub-logins
        code, _ = await auth_plain(h, f"alice/site{i}", "wrong")
        assert code == 535
    for login in ("alice/site99", "alice"):   # now even the right password: the account is locked
        code, text = await auth_plain(h, login, "s3cret")
        assert (code, text.split()[0]) == (454, "4.7.0"), (login, code, text)


async def test_bad_sub_login_refused(gateway_factory, sink):
    h = await gateway_factory(sink)
    await h.add_account()
    for login in ("alice/", "alice/a b", "alice/" + "x" * 65):
        code, text = await auth_plain(h, login, "s3cret")
        assert code == 535 and text.startswith("5.7.8") and "identity after the account name" in text, text
    # not a password guess: the account is not locked by them
    code, _ = await auth_plain(h, "alice/ok", "s3cret")
    assert code == 235


# ------------------------------------------------------------------ identity headers
PHP = b"X-PHP-Script: example.com/wp-content/plugins/x.php for 203.0.113.9\r\n"


async def test_trusted_header_sets_identity_and_is_removed(gateway_factory, sink):
    h = await gateway_factory(sink, clock=FrozenClock(), identity={"trusted_accounts": ["alice"], "secret": KEY},
                              limits=limits())
    await h.add_account()
    c = await connect(h, "alice")
    try:
        assert await send(c, "bob@example.org", PHP + MESSAGE) == 250
    finally:
        c.close()
    await eventually(lambda: any(r.get("decision") == "relayed" for r in h.log_records()), "the log line")
    rec = next(r for r in h.log_records() if r.get("decision") == "relayed")
    assert rec["identity"] == "example.com/wp-content/plugins/x.php"
    assert any(o["check"] == "data_identity" and o["result"] == "pass" for o in rec["ledger"]), rec["ledger"]
    data = sink.messages[0].data
    assert b"X-PHP-Script" not in data and b"203.0.113.9" not in data and b"wp-content" not in data
    assert data.endswith(MESSAGE)
    digest = opaque(KEY.encode(), "alice", "example.com/wp-content/plugins/x.php")
    assert f"\t(identity {digest})\r\n".encode() in head_of(data)


async def test_untrusted_header_is_removed_and_ignored(gateway_factory, sink):
    h = await gateway_factory(sink, identity={"trusted_accounts": ["carol"], "secret": KEY})
    await h.add_account()
    c = await connect(h, "alice")
    try:
        assert await send(c, "bob@example.org", b"X-AuthUser: victim-site\r\n" + PHP + MESSAGE) == 250
    finally:
        c.close()
    await eventually(lambda: any(r.get("decision") == "relayed" for r in h.log_records()), "the log line")
    rec = next(r for r in h.log_records() if r.get("decision") == "relayed")
    assert "identity" not in rec
    data = sink.messages[0].data
    assert b"X-AuthUser" not in data and b"X-PHP-Script" not in data and b"(identity " not in data
    assert data.endswith(MESSAGE)


async def test_duplicate_header_not_believed(gateway_factory, sink):
    h = await gateway_factory(sink, identity={"trusted_accounts": ["alice"], "secret": KEY})
    await h.add_account()
    c = await connect(h, "alice/site7")
    try:
        forged = b"X-AuthUser: other-site\r\nX-AuthUser: site9\r\n"
        assert await send(c, "bob@example.org", forged + MESSAGE) == 250
    finally:
        c.close()
    await eventually(lambda: any(r.get("decision") == "relayed" for r in h.log_records()), "the log line")
    rec = next(r for r in h.log_records() if r.get("decision") == "relayed")
    assert rec["identity"] == "site7"     # the session's sub-login, not either field
    assert any(o["check"] == "data_identity" and o["result"] == "flag" for o in rec["ledger"]), rec["ledger"]
    assert b"X-AuthUser" not in sink.messages[0].data


async def test_auth_login_mechanism_and_the_log_name_the_full_login(gateway_factory, sink):
    import base64
    h = await gateway_factory(sink, identity={"secret": KEY})
    await h.add_account()
    c = aiosmtplib.SMTP(hostname="127.0.0.1", port=h.port(), timeout=10)
    await c.connect()
    try:
        await c.ehlo()
        r = await c.execute_command(b"AUTH", b"LOGIN", base64.b64encode(b"alice/Blog.Example"))
        assert r.code == 334
        r = await c.execute_command(base64.b64encode(b"s3cret"))
        assert r.code == 235, r
        assert await send(c, "bob@example.org") == 250
    finally:
        c.close()
    await eventually(lambda: any(r.get("decision") == "relayed" for r in h.log_records()), "the log line")
    rec = next(r for r in h.log_records() if r.get("decision") == "relayed")
    assert rec["identity"] == "blog.example" and rec["account"] == "alice"
    auth = next(o for o in rec["ledger"] if o["check"] == "auth")
    assert auth["item"] == "alice/Blog.Example" and "identity blog.example" in auth["detail"]
    digest = opaque(KEY.encode(), "alice", "blog.example")
    assert f"(identity {digest})".encode() in head_of(sink.messages[0].data)


async def test_header_identity_is_what_data_bulk_counts(gateway_factory, sink):
    """data_bulk runs after data_identity and counts per (account, identity)
    beside the account: its detail names the header's identity and that
    identity's own count. (data_bulk decides on the larger of the two counts,
    so the account's other site is held by the account's count: its call.)"""
    h = await gateway_factory(sink, checks={"data": ["data_size", "data_identity", "data_bulk"],
                                            "modes": {"data_bulk": "enforce"}},
                              bulk={"recipients_threshold": 2}, identity={"trusted_accounts": ["alice"]})
    await h.add_account()
    text = MESSAGE + LONG     # enough text for a fingerprint
    c = await connect(h, "alice")
    try:
        site_a = [await send(c, f"a{i}@example.org", b"X-AuthUser: site-a\r\n" + text) for i in range(3)]
        site_b = await send(c, "b0@example.org", b"X-AuthUser: site-b\r\n" + text)
    finally:
        c.close()
    assert site_a == [250, 250, 451] and site_b in (451, 550)
    await eventually(lambda: len([r for r in h.log_records() if r.get("event") == "transaction"]) >= 4, "4 lines")
    recs = [r for r in h.log_records() if r.get("event") == "transaction"]
    bulk = [next(o for o in r["ledger"] if o["check"] == "data_bulk") for r in recs]
    assert [r["identity"] for r in recs] == ["site-a"] * 3 + ["site-b"]
    assert "(identity site-a: 3)" in bulk[2]["detail"], bulk[2]
    assert "(identity site-b: 1)" in bulk[3]["detail"], bulk[3]
    assert not any(b"X-AuthUser" in m.data for m in sink.messages) and len(sink.messages) == 2


# ------------------------------------------------------------------ the check alone
async def test_data_identity_check_paths(check_kit):
    from gateway.core.transaction import ForwardingDecision, Result
    svc = check_kit.services(identity=IdentitySettings(trusted_accounts=["alice"], headers=["X-AuthUser",
                                                                                           "X-PHP-Script"]))
    check = check_kit.build("data_identity", svc)
    both = b"X-PHP-Script: example.com/x.php for 192.0.2.9\r\nX-AuthUser: Site7\r\n" + MESSAGE

    tx = check_kit.transaction(both, account=check_kit.account("alice"))
    out = await check.run(tx)
    assert (out.result, tx.identity) == (Result.PASS, "site7")     # X-AuthUser first: the configured order
    assert tx.charged_to == ("alice", "site7")

    tx = check_kit.transaction(both, account=check_kit.account("bob"))
    out = await check.run(tx)
    assert (out.result, tx.identity) == (Result.SKIP, None)          # untrusted account

    tx = check_kit.transaction(both, account=check_kit.account("alice"))
    tx.forwarding = ForwardingDecision("forward", original="someone@example.net")
    out = await check.run(tx)
    assert (out.result, tx.identity) == (Result.SKIP, None)          # the original author's header block

    tx = check_kit.transaction(b"X-AuthUser: ???\r\n" + MESSAGE, account=check_kit.account("alice"))
    out = await check.run(tx)
    assert (out.result, tx.identity) == (Result.FLAG, None)

    tx = check_kit.transaction(MESSAGE, account=None)
    assert (await check.run(tx)).result is Result.SKIP


def test_finalize_strips_identity_fields_except_forwarded():
    from gateway.core.transaction import ForwardingDecision, SessionInfo, Transaction
    from gateway.delivery.finalize import Finalizer
    fin = Finalizer("gw.test", "X-Gateway-Trace", strip_fields=frozenset({"x-authuser", "x-php-script"}),
                    identity_key=KEY.encode())
    tx = Transaction(SessionInfo("s1", "plain", "192.0.2.1", 1))
    tx.message = b"x-authuser: a\r\nX-PHP-Script: b\r\n\tfolded\r\n" + MESSAGE
    out = fin.finalize(tx)
    assert out.endswith(MESSAGE) and b"x-authuser" not in out.lower() and b"folded" not in out
    tx.message = MESSAGE
    assert fin.finalize(tx).endswith(MESSAGE)
    fwd = Transaction(SessionInfo("s2", "plain", "192.0.2.1", 1))
    fwd.forwarding = ForwardingDecision("forward", original="someone@example.net", state="confirmed")
    fwd.message = b"X-AuthUser: a\r\n" + MESSAGE
    assert fin.finalize(fwd).endswith(fwd.message)       # forwarded: the author's bytes stay intact


def test_from_header_php_originating_script():
    assert from_header("1001:mailer.php") == "1001_mailer.php"
    assert IdentitySettings().field_names == {"x-authuser", "x-php-script", "x-php-originating-script"}


async def test_harvest_guard_per_sub_login(gateway_factory, sink):
    """rcpt_harvest's per-identity count through the real AUTH path: site7's
    refused recipients defer site7's next RCPTs, site8 of the same account
    keeps sending, and the Violation names the identity."""
    from gateway.core.events import Violation
    h = await gateway_factory(sink, clock=WindowClock(3600.0), checks={"modes": {"rcpt_harvest": "enforce"}},
                              harvest={"max_refused_per_session": 0, "tarpit_delay": 0, "window": 3600.0,
                                       "max_refused_per_ip": 0, "max_refused_per_account": 0,
                                       "max_refused_per_identity": 2})
    await h.add_account()
    seen: list[Violation] = []
    h.gw.events.subscribe(Violation, seen.append)
    for i in range(3):
        sink.refuse_rcpt[f"nobody{i}@example.org"] = "550 5.1.1 No such user"
    site7 = await connect(h, "alice/site7")
    site8 = await connect(h, "alice/site8")
    try:
        assert [await send(site7, f"nobody{i}@example.org") for i in range(3)] == [550, 550, 550]
        assert await send(site7, "bob@example.org") == 451
        assert await send(site8, "bob@example.org") == 250
    finally:
        site7.close()
        site8.close()
    assert [(v.rule, v.account, v.identity) for v in seen] == [("P-HARVEST", "alice", "site7")]


# ------------------------------------------------------------------ data_rate: a header identity's own limits

def _as(site: str) -> bytes:
    return f"X-AuthUser: {site}\r\n".encode() + MESSAGE


async def send_to(c: aiosmtplib.SMTP, rcpts: list[str], message: bytes) -> int:
    code, _ = await c.mail("alice@example.com")
    assert code == 250
    for r in rcpts:
        assert (await c.execute_command(b"RCPT", f"TO:<{r}>".encode())).code == 250
    try:
        return (await c.data(message))[0]
    except (aiosmtplib.SMTPDataError, aiosmtplib.SMTPResponseException) as exc:
        return exc.code


async def test_a_header_identity_is_held_to_its_own_limits_at_data(gateway_factory, sink):
    """identity_recipients_per_hour = 3 and identity_messages_per_hour = 2 for
    identities named by X-AuthUser: site7 spends them, its next message is
    deferred naming the limit, site8 and the account's own mail go on; a message
    the upstream defers is refunded."""
    h = await gateway_factory(sink, clock=FrozenClock(), identity={"trusted_accounts": ["alice"], "secret": KEY},
                              limits=limits(identity_recipients_per_hour=3, identity_messages_per_hour=2))
    await h.add_account()
    c = await connect(h, "alice")
    try:
        assert await send_to(c, ["a@example.org", "b@example.org"], _as("site7")) == 250
        sink.data_reply = "451 4.3.0 try later"              # deferred upstream: refunded
        assert await send_to(c, ["c@example.org"], _as("site7")) == 451
        sink.data_reply = None
        rate = next(ch for ch in h.gw.pipeline.checks(Phase.DATA) if ch.name == "data_rate")
        await eventually(lambda: not rate._open, "the deferred transaction's refund")
        await rate.settled()
        assert await send_to(c, ["d@example.org", "e@example.org"], _as("site7")) == 451, "4 recipients > 3"
        assert await send_to(c, ["d@example.org"], _as("site7")) == 250                 # 3 of 3, message 2 of 2
        r = await c.execute_command(b"MAIL", b"FROM:<alice@example.com>")
        assert r.code == 250
        assert (await c.execute_command(b"RCPT", b"TO:<f@example.org>")).code == 250
        with pytest.raises(aiosmtplib.SMTPDataError) as exc:
            await c.data(_as("site7"))
        assert exc.value.code == 451 and "4.7.1" in exc.value.message
        assert "identity_recipients_per_hour exceeded" in exc.value.message
        assert await send_to(c, ["g@example.org", "h@example.org", "i@example.org"], _as("site8")) == 250
        assert await send_to(c, ["j@example.org"] * 1, MESSAGE) == 250, "no header: the account, not limited"
    finally:
        c.close()
    relayed = [m.rcpt_tos for m in sink.messages]
    assert relayed == [["a@example.org", "b@example.org"], ["d@example.org"],
                       ["g@example.org", "h@example.org", "i@example.org"], ["j@example.org"]]
