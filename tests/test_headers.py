"""RFC 5322 header parsing and the structural header rules (issue 5.2)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest

from gateway.accounts.model import Account, AccountStatus
from gateway.checks import data_headers
from gateway.message.findings import DEFAULT_ACTIONS, RULES
from gateway.message.parse import (HeaderSyntaxError, decode_words, parse_address_list, parse_content_type, parse_date,
                                   parse_headers, valid_message_id)
from gateway.message.rules import check_structure
from gateway.message.settings import HeaderSettings
from gateway.core.transaction import Result, SessionInfo, Transaction
from gateway.services import Services

import checkkit

NOW = datetime(2024, 5, 6, 12, 0, 0, tzinfo=timezone.utc).timestamp()
DATE = "Mon, 06 May 2024 13:59:00 +0200"


def msg(*headers: str, body: str = "hello\r\n") -> bytes:
    return ("\r\n".join(headers) + "\r\n\r\n" + body).encode("utf-8")


BASE = ("From: Alice <alice@example.com>", "To: bob@example.org", f"Date: {DATE}",
        "Subject: lunch", "Message-ID: <1.2@example.com>")


def ids(data: bytes, settings: HeaderSettings | None = None, now: float | None = NOW) -> list[str]:
    return [f.id for f in check_structure(data, parse_headers(data), settings or HeaderSettings(), now)]


ALICE = Account(1, "alice", AccountStatus.ACTIVE)


def make_tx(message: bytes, account: Account | None = ALICE) -> Transaction:
    """A transaction of a session with an account (SMTP AUTH), or with ``account=None``
    one without (it can reach the service mailboxes only)."""
    tx = Transaction(SessionInfo("s1", "submission", "192.0.2.1", 40000, account=account,
                                 auth_method="smtp-auth" if account is not None else None))
    tx.message = message
    return tx


def services(settings: HeaderSettings | None = None, now: float = NOW) -> Services:
    return checkkit.services(headers=settings or HeaderSettings(), clock=lambda: now)


# --- parsing ---------------------------------------------------------------------------------


def test_parse_headers_unfolds_and_keeps_order():
    p = parse_headers(b"Subject: a\r\n  long\r\n\tline\r\nX-A: 1\r\nx-a: 2\r\n\r\nbody")
    assert p.fields == [("Subject", "a  long\tline"), ("X-A", "1"), ("x-a", "2")]
    assert p.get_all("X-a") == ["1", "2"] and p.count("x-A") == 2
    assert p.body_start == len(b"Subject: a\r\n  long\r\n\tline\r\nX-A: 1\r\nx-a: 2\r\n\r\n")
    assert p.defects == []


def test_parse_headers_without_body_and_empty_header_block():
    assert parse_headers(b"A: b\r\n").fields == [("A", "b")]
    p = parse_headers(b"\r\nonly body")
    assert p.fields == [] and p.body_start == 2


@pytest.mark.parametrize("block,fid", [
    (b"Subject x\r\n", "hdr.field_name"),
    (b": x\r\n", "hdr.field_name"),
    (b"Sub ject: x\r\n", "hdr.field_name"),
    (b"Subject : x\r\n", "hdr.field_name"),
    ("Subj\u00e9ct: x\r\n".encode(), "hdr.field_name"),
    (b" leading: continuation\r\n", "hdr.folding"),
    (b"Subject: a\r\n   \r\n", "hdr.folding"),
    (b"Subject: \xe9t\xe9\r\n", "hdr.utf8"),
])
def test_header_block_defects(block, fid):
    assert fid in [d.id for d in parse_headers(block + b"\r\nbody").defects]


@pytest.mark.parametrize("value,addrs", [
    ("a@example.com", ["a@example.com"]),
    ("Alice <a@example.com>", ["a@example.com"]),
    ('"Doe, John" <j@example.com>, b@example.org', ["j@example.com", "b@example.org"]),
    ("undisclosed-recipients:;", []),
    ("team: a@example.com, B <b@example.com>;, c@example.com", ["a@example.com", "b@example.com", "c@example.com"]),
    ("a@example.com (Alice (the first))", ["a@example.com"]),
    ("<@route.example:a@example.com>", ["a@example.com"]),
    ("Mr. J. Doe <j@example.com>", ["j@example.com"]),
    ('"quoted local"@example.com', ['"quoted local"@example.com']),
    ("x@[192.0.2.1]", ["x@[192.0.2.1]"]),
    ("J\u00f6rg <j\u00f6rg@b\u00fccher.example>", ["j\u00f6rg@b\u00fccher.example"]),  # RFC 6532
    ("=?utf-8?q?J=C3=B6rg?= <j@example.com>", ["j@example.com"]),
    ("a@example.com,, b@example.com", ["a@example.com", "b@example.com"]),  # obs-addr-list
    ("a . b @ example . com", ["a.b@example.com"]),  # obs CFWS around dots
])
def test_address_list_parses(value, addrs):
    assert [b.addr for b in parse_address_list(value)] == addrs


@pytest.mark.parametrize("value", [
    "alice@example.com <bob@example.com>",  # unquoted @ in display name
    "john..doe@example.com", "john.@example.com", "a@b@example.com", "a@", "@example.com",
    "Alice <a@example.com", '"unterminated <a@example.com>', "a@example.com (open", "<>",
    "a b@example.com", "a@example..com",
])
def test_address_list_refuses(value):
    with pytest.raises(HeaderSyntaxError):
        parse_address_list(value)


def test_group_not_allowed_in_from():
    with pytest.raises(HeaderSyntaxError):
        parse_address_list("team: a@example.com;", allow_group=False)


def test_display_name_and_comment_kept():
    b = parse_address_list('"Bob \\"B\\" Smith" <b@example.com>')[0]
    assert b.display == 'Bob "B" Smith'
    c = parse_address_list("b@example.com (Bob)")[0]
    assert c.comment == "Bob" and c.display == ""


@pytest.mark.parametrize("value,iso", [
    ("Mon, 31 Oct 2005 18:44:29 -0800", "2005-10-31T18:44:29-08:00"),
    ("31 Oct 2005 18:44 +0000", "2005-10-31T18:44:00+00:00"),
    ("Wed, 28 Sep 2005 16:24:49 +0800 (CST)", "2005-09-28T16:24:49+08:00"),
    ("Sun, 8 Jan 06 13:12:04 EST", "2006-01-08T13:12:04-05:00"),
    ("  mon,  8 jan 2006 13:12:04 gmt", "2006-01-08T13:12:04+00:00"),
])
def test_dates_parse(value, iso):
    assert parse_date(value).isoformat() == iso


@pytest.mark.parametrize("value", [
    "Mon, 20 Sep 2004 21:43:60 -0700", "Mon, 31 Sep 2004 21:43:57 -0700", "Sun, 29 Feb 2006 21:43:57 -0800",
    "Fri, 7 Dec 2001 07:01:03", "18 Feb 01 12:29:13 AM", "2024-05-06T12:00:00Z", "yesterday",
    "Mon, 20 Sep 2004 21:43:00 +0099",
])
def test_dates_refused(value):
    with pytest.raises(ValueError):
        parse_date(value)


@pytest.mark.parametrize("value,ok", [
    ("<1.2@example.com>", True), ("  <a.b.c@[192.0.2.1]> (comment)", True), ('<"q x"@example.com>', True),
    ("<abc>", False), ("abc@example.com", False), ("<a@b> <c@d>", False), ("<a..b@example.com>", False),
])
def test_message_id(value, ok):
    assert valid_message_id(value) is ok


def test_encoded_words():
    assert decode_words("=?utf-8?q?caf=C3=A9?= =?ISO-8859-1?B?Y2Fm6Q==?=") == "caf\u00e9caf\u00e9"
    assert decode_words("x =?utf-8?b?w6k?= y") == "x \u00e9 y"  # missing padding tolerated
    assert decode_words("=?gb2312?B?0rvH0A==?=") == "\u4e00\u5207"
    assert decode_words("=?utf-8?q?a=C5?= =?utf-8?q?=A1b?=") == "a\u0161b"  # split character
    for bad in ("=?utf-8?q?=C5?=", "=?nosuchcharset?q?x?=", "=?utf-8?b?!!!!?="):
        with pytest.raises(ValueError):
            decode_words(bad)


def test_content_type():
    assert parse_content_type('multipart/mixed; boundary="a b"; charset=x') == (
        "multipart/mixed", {"boundary": "a b", "charset": "x"})
    assert parse_content_type("text plain") is None


@pytest.mark.parametrize("value,params", [
    # Sun/iPlanet and Oracle mailers: parentheses inside a quoted string are ordinary characters
    ('multipart/mixed; boundary="Boundary_(ID_xjiotMI3LbV/zJ0Zs39NiA)"',
     {"boundary": "Boundary_(ID_xjiotMI3LbV/zJ0Zs39NiA)"}),
    ('multipart/mixed;\tboundary="(" ; x=")"', {"boundary": "(", "x": ")"}),
    ('multipart/mixed; boundary=")(("', {"boundary": ")(("}),
    # real comments outside quoted strings are still comments, nested ones too
    ('multipart/mixed (a comment); boundary="b(1)" (one (nested) more); charset=us-ascii',
     {"boundary": "b(1)", "charset": "us-ascii"}),
    ("text/plain; charset=us-ascii (Plain text)", {"charset": "us-ascii"}),
    ("multipart/mixed; boundary=abc(comment)", {"boundary": "abc"}),
    ('multipart/mixed; boundary=(before) "b" ', {"boundary": "b"}),
    ("text/plain; a=(com\\)ment) b", {"a": "b"}),  # quoted-pair ")" inside a comment
    # quoted-pairs inside quotes: an escaped quote does not end the string
    ('text/plain; name="say \\"hi\\" (x)"; charset=utf-8', {"name": 'say "hi" (x)', "charset": "utf-8"}),
    ('text/plain; name="back\\\\slash"', {"name": "back\\slash"}),
    # RFC 2231 3: continuations, in order, without charset
    ("multipart/mixed; boundary*0=abc; boundary*1=def", {"boundary": "abcdef"}),
    ('multipart/mixed; boundary*1="def"; boundary*0="abc"', {"boundary": "abcdef"}),
    # RFC 2231 4: charset and language, %-encoding
    ("multipart/mixed; boundary*=us-ascii'en-us'b%3D_1", {"boundary": "b=_1"}),
    ("application/pdf; name*=UTF-8''Rechnung%20M%C3%A4rz.pdf", {"name": "Rechnung M\u00e4rz.pdf"}),
    ("text/plain; title*=iso-8859-1'de'K%F6ln", {"title": "K\u00f6ln"}),
    # RFC 2231 4.1: encoded and unencoded sections mixed; only section 0 names the charset
    ("application/pdf; filename*0*=utf-8''M%C3; filename*1*=%A4rz; filename*2=.pdf",
     {"filename": "M\u00e4rz.pdf"}),
    ("message/external-body; access-type=URL; URL*0=\"ftp://\"; URL*1=\"cs.utk.edu/pub/moore/bulk-mailer/bulk-mailer.tar\"",
     {"access-type": "URL", "url": "ftp://cs.utk.edu/pub/moore/bulk-mailer/bulk-mailer.tar"}),
    ("multipart/report; report-type*=''delivery-status; boundary*0*=''x%2Dy", {"report-type": "delivery-status", "boundary": "x-y"}),
    # the RFC 2231 form wins over a plain fallback of the same name
    ('application/pdf; name="fallback.pdf"; name*=utf-8\'\'%E2%82%AC.pdf', {"name": "\u20ac.pdf"}),
    # malformed RFC 2231 is read leniently, never an error
    ("text/plain; a*=no-apostrophes%41", {"a": "no-apostrophesA"}),
    ("text/plain; a*=utf-8''%ZZ%4", {"a": "%ZZ%4"}),
    ("text/plain; a*=x-no-such-charset''%E2%82%AC", {"a": "\u20ac"}),
    ("text/plain; a*=utf-8''%FF", {"a": "\ufffd"}),
    ("text/plain; a*0=x; a*2=z", {"a": "xz"}),
    ("text/plain; a*0=x; a*0=y", {"a": "x"}),
    ("text/plain; a**=x; b*x=y", {"a**": "x", "b*x": "y"}),
])
def test_content_type_parameters(value, params):
    assert parse_content_type(value) == (value.split(";")[0].split("(")[0].strip().lower(), params)


# --- structural rules --------------------------------------------------------------------------


def test_clean_message():
    assert ids(msg(*BASE)) == []


@pytest.mark.parametrize("drop,fid", [("From", "hdr.required"), ("Date", "hdr.date_missing"),
                                      ("Message-ID", "hdr.message_id_missing")])
def test_required(drop, fid):
    assert ids(msg(*[h for h in BASE if not h.startswith(drop)])) == [fid]


@pytest.mark.parametrize("extra", ["Subject: again", "To: c@example.org", "From: c@example.org",
                                   "Date: " + DATE, "Message-ID: <3@example.com>", "Cc: a@example.com\r\nCC: b@example.com",
                                   "Reply-To: a@example.com\r\nreply-to: b@example.com", "References: <a@b>\r\nReferences: <c@d>"])
def test_duplicates(extra):
    found = check_structure(msg(*BASE, extra), parse_headers(msg(*BASE, extra)), HeaderSettings(), NOW)
    assert [f.id for f in found] == ["hdr.duplicate"]
    assert found[0].detail.startswith("duplicate ") and found[0].detail.endswith(" header")


def test_duplicate_detail_text():
    found = check_structure(msg(*BASE, "Subject: x"), parse_headers(msg(*BASE, "Subject: x")), HeaderSettings(), NOW)
    assert found[0].detail == "duplicate Subject header"


def test_received_and_resent_may_repeat():
    assert ids(msg("Received: from a by b; " + DATE, "Received: from c by d; " + DATE, *BASE,
                   "Resent-From: x@example.com", "Resent-From: y@example.com")) == []


def test_from_with_several_mailboxes_needs_sender():
    two = "From: a@example.com, b@example.com"
    base = [h for h in BASE if not h.startswith("From")]
    assert ids(msg(two, *base)) == ["hdr.from_sender"]
    assert ids(msg(two, "Sender: a@example.com", *base)) == []
    assert ids(msg(two, "Sender: a@example.com, b@example.com", *base)) == ["hdr.address"]


@pytest.mark.parametrize("header", ["To: alice@example.com <bob@example.com>", "Cc: john..doe@example.com",
                                    "Reply-To: <a@example.com", "To:", "From: team: a@example.com;"])
def test_bad_address_headers(header):
    base = [h for h in BASE if not (h.startswith("To") and header.startswith("To"))
            and not (h.startswith("From") and header.startswith("From"))]
    assert "hdr.address" in ids(msg(header, *base))


def test_empty_bcc_is_fine():
    assert ids(msg(*BASE, "Bcc:")) == []


def _dated(offset: float) -> bytes:
    """BASE with a Date ``offset`` seconds from NOW (negative = in the past)."""
    when = datetime.fromtimestamp(NOW + offset, timezone(timedelta(hours=2)))
    return msg(f"Date: {format_datetime(when)}", *[h for h in BASE if not h.startswith("Date")])


def test_date_window_uses_injected_clock():
    base = [h for h in BASE if not h.startswith("Date")]
    assert ids(msg("Date: Mon, 06 May 2024 12:14:00 +0000", *base)) == []
    assert ids(msg("Date: Mon, 06 May 2024 12:16:00 +0000", *base)) == ["hdr.date_window"]
    assert ids(msg("Date: Mon, 29 Apr 2024 12:01:00 +0000", *base)) == []
    assert ids(msg("Date: Mon, 29 Apr 2024 11:59:00 +0000", *base)) == ["hdr.date_window"]
    assert ids(msg("Date: Mon, 29 Apr 2024 11:59:00 +0000", *base), now=None) == []
    narrow = HeaderSettings(date_past_seconds=2 * 86400)
    assert ids(msg("Date: Sat, 04 May 2024 11:59:00 +0000", *base), narrow) == ["hdr.date_window"]
    assert ids(msg("Date: Mon, 31 Sep 2024 11:59:00 +0000", *base)) == ["hdr.date"]


@pytest.mark.parametrize("offset,ok", [
    (-6 * 86400, True),            # retried from a customer's queue (Postfix keeps 5 days)
    (-8 * 86400, False),
    (-7 * 86400, True),            # the edges are inside the window
    (-7 * 86400 - 1, False),
    (15 * 60, True),
    (15 * 60 + 1, False),
])
def test_default_date_window_outlasts_mta_queue_lifetimes(offset, ok):
    assert ids(_dated(offset)) == ([] if ok else ["hdr.date_window"])


def test_date_window_detail_names_age_and_limit():
    found = check_structure(_dated(-8 * 86400), parse_headers(_dated(-8 * 86400)), HeaderSettings(), NOW)
    assert [f.detail for f in found] == ["Date is 8.0 days in the past (limit 7.0 days)"]


def test_bad_message_id_and_encoded_word():
    base = [h for h in BASE if not h.startswith(("Message-ID", "Subject"))]
    assert ids(msg("Message-ID: <nope>", "Subject: x", *base)) == ["hdr.message_id"]
    assert ids(msg("Message-ID: <a@b>", "Subject: =?utf-8?b?/w==?=", *base)) == ["hdr.encoded_word"]


MULTI = ("MIME-Version: 1.0", 'Content-Type: multipart/mixed; boundary="XX"')


@pytest.mark.parametrize("headers,body,expected", [
    (MULTI, "pre\r\n--XX\r\nContent-Type: text/plain\r\n\r\nhi\r\n--XX--\r\n", []),
    (MULTI, "--XX\r\n\r\nno part headers\r\n--XX--\r\n", []),
    (MULTI, "--XXY\r\n\r\nnot our boundary\r\n--XXY--\r\n", ["hdr.mime"]),
    (("Content-Type: multipart/mixed",), "--XX\r\n\r\nhi\r\n--XX--\r\n", ["hdr.mime"]),
    (MULTI, "--XX\r\n\r\nhi\r\n", ["hdr.mime_close"]),
    (MULTI, "--XX\r\nContent-Transfer-Encoding: rot13\r\n\r\nhi\r\n--XX--\r\n", ["hdr.mime"]),
    (MULTI, "--XX\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\nhi\r\n--XX--\r\n", []),
    (MULTI, '--XX\r\nContent-Type: multipart/alternative;\r\n boundary="in"\r\n\r\n--in\r\n\r\na\r\n--in--\r\n--XX--\r\n', []),
    (MULTI, '--XX\r\nContent-Type: multipart/alternative; boundary="in"\r\n\r\n--nope\r\n--XX--\r\n', ["hdr.mime"]),
    (MULTI, "--XX\r\nContent-Type: message/rfc822\r\n\r\nContent-Type: multipart/mixed\r\n\r\nx\r\n--XX--\r\n", ["hdr.mime"]),
    (("Content-Type: text/plain", "Content-Transfer-Encoding: base64"), "aGk=\r\n", []),
    (("Content-Type: text",), "x\r\n", ["hdr.mime"]),
    (('Content-Type: multipart/mixed; boundary="Boundary_(ID_xjiotMI3LbV/zJ0Zs39NiA)"',),
     "--Boundary_(ID_xjiotMI3LbV/zJ0Zs39NiA)\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
     "--Boundary_(ID_xjiotMI3LbV/zJ0Zs39NiA)--\r\n", []),
    (("Content-Type: multipart/mixed;\r\n boundary*0=\"=_part_1\";\r\n boundary*1*=%2E2",),
     "--=_part_1.2\r\n\r\nhi\r\n--=_part_1.2--\r\n", []),
    (("Content-Type: multipart/mixed; boundary*=''%2D%2Dx",), "----x\r\n\r\nhi\r\n----x--\r\n", []),
    (("Content-Type: multipart/mixed; boundary*=''%2D%2Dx",), "--y\r\n\r\nhi\r\n--y--\r\n", ["hdr.mime"]),
])
def test_mime(headers, body, expected):
    assert ids(msg(*BASE, *headers, body=body)) == expected


def test_mime_nesting_limit():
    body = ""
    for i in range(5):
        body += f'--b{i}\r\nContent-Type: multipart/mixed; boundary="b{i + 1}"\r\n\r\n'
    s = HeaderSettings(mime_max_depth=3)
    m = msg(*BASE, 'Content-Type: multipart/mixed; boundary="b0"', body=body)
    assert "hdr.mime" in ids(m, s)


# --- settings ----------------------------------------------------------------------------------


def test_settings_defaults_and_validation():
    s = HeaderSettings()
    assert s.actions == DEFAULT_ACTIONS and set(s.actions) == set(RULES)
    assert (s.date_past_seconds, s.date_future_seconds, s.date, s.message_id) == (604800, 900, "add", "add")
    o = HeaderSettings(actions={"hdr.duplicate": "flag"})
    assert o.actions["hdr.duplicate"] == "flag" and o.actions["hdr.required"] == "reject"
    for bad in ({"actions": {"hdr.nope": "flag"}}, {"actions": {"hdr.duplicate": "drop"}},
                {"message_id": "maybe"}, {"date": "maybe"}, {"date": "flag"}, {"date_past_seconds": -1},
                {"own_hostnames": ["bad host"]}, {"brand_domains": {"PayPal": "not a domain"}},
                {"mime_max_depth": 0}):
        with pytest.raises(ValueError):
            HeaderSettings(**bad)


# --- the check module --------------------------------------------------------------------------


async def test_check_refusal_renders_rule_and_reason():
    check = data_headers.build(services())
    tx = make_tx(msg(*BASE, "Subject: again"))
    out = await check.run(tx)
    assert out.result is Result.FAIL
    assert out.reply.render(out.detail) == (
        "550 5.6.0 P-HDR Invalid header: duplicate Subject header [hdr.duplicate]")


async def test_check_records_flags_and_refuses_on_first_reject():
    s = HeaderSettings(actions={"hdr.duplicate": "flag"})
    check = data_headers.build(services(s))
    tx = make_tx(msg(*[h for h in BASE if not h.startswith("Date")], "Subject: again", "Date: 1 Jan 2000 00:00 +0000"))
    out = await check.run(tx)
    assert out.result is Result.FAIL and "[hdr.date_window]" in out.detail
    recorded = {(f["id"], f["action"]) for f in tx.findings}
    assert recorded == {("hdr.duplicate", "flag"), ("hdr.date_window", "reject")}


async def test_check_flag_only():
    check = data_headers.build(services(HeaderSettings(actions={"hdr.duplicate": "flag"})))
    tx = make_tx(msg(*BASE, "Subject: again"))
    out = await check.run(tx)
    assert out.result is Result.FLAG and out.detail == "duplicate Subject header [hdr.duplicate]"
    assert tx.findings == [{"id": "hdr.duplicate", "rule": "P-HDR", "action": "flag",
                                     "check": "data_headers", "detail": "duplicate Subject header",
                                     "reply": "550 5.6.0"}]


async def test_check_off_records_nothing():
    check = data_headers.build(services(HeaderSettings(actions={"hdr.duplicate": "off"})))
    tx = make_tx(msg(*BASE, "Subject: again"))
    assert (await check.run(tx)).result is Result.PASS
    assert tx.findings == []


async def test_missing_message_id_add_or_refuse():
    m = msg(*[h for h in BASE if not h.startswith("Message-ID")])
    tx = make_tx(m)
    out = await data_headers.build(services()).run(tx)
    assert out.result is Result.PASS
    (name, value), = tx.add_headers
    assert name == "Message-ID" and valid_message_id(value) and value.endswith("@gw.example.net>")
    assert tx.message == m
    assert tx.findings[0]["action"] == "add"
    tx = make_tx(m)
    out = await data_headers.build(services(HeaderSettings(message_id="refuse"))).run(tx)
    assert out.result is Result.FAIL and not tx.add_headers
    assert out.reply.render(out.detail).startswith("550 5.6.0 P-HDR Message-ID header required")


NO_DATE_NO_ID = msg(*[h for h in BASE if not h.startswith(("Date", "Message-ID"))])


async def test_missing_date_and_message_id_added_for_an_account():
    tx = make_tx(NO_DATE_NO_ID)
    out = await data_headers.build(services()).run(tx)
    assert out.result is Result.PASS
    (dname, dvalue), (mname, mvalue) = tx.add_headers
    # the gateway clock's time (the injected one), RFC 5322 form, UTC as +0000
    assert (dname, dvalue) == ("Date", "Mon, 06 May 2024 12:00:00 +0000")
    assert parse_date(dvalue).timestamp() == NOW
    assert mname == "Message-ID" and valid_message_id(mvalue) and mvalue.startswith("<20240506120000.")
    assert tx.message == NO_DATE_NO_ID
    assert [(f["id"], f["action"]) for f in tx.findings] == [
        ("hdr.date_missing", "add"), ("hdr.message_id_missing", "add")]
    # a second run over the same transaction adds nothing twice
    await data_headers.build(services()).run(tx)
    assert [n for n, _ in tx.add_headers] == ["Date", "Message-ID"]


async def test_missing_date_refused_for_an_account_with_date_refuse():
    tx = make_tx(NO_DATE_NO_ID)
    out = await data_headers.build(services(HeaderSettings(date="refuse"))).run(tx)
    assert out.result is Result.FAIL
    assert out.reply.render(out.detail) == "550 5.6.0 P-HDR Date header required: no Date header [hdr.date_missing]"
    # the Message-ID would still have been added (a refused message is never relayed)
    assert [n for n, _ in tx.add_headers] == ["Message-ID"]


async def test_without_an_account_nothing_is_added():
    # Date is required (RFC 5322 3.6): refused; a missing Message-ID is only flagged
    tx = make_tx(NO_DATE_NO_ID, account=None)
    out = await data_headers.build(services()).run(tx)
    assert out.result is Result.FAIL and not tx.add_headers
    assert out.reply.render(out.detail) == "550 5.6.0 P-HDR Date header required: no Date header [hdr.date_missing]"
    tx = make_tx(msg(*[h for h in BASE if not h.startswith("Message-ID")]), account=None)
    out = await data_headers.build(services()).run(tx)
    assert out.result is Result.FLAG and out.detail == "no Message-ID header [hdr.message_id_missing]"
    assert not tx.add_headers
    # the operator may let such mail through to the service mailboxes: still nothing added
    flag = HeaderSettings(actions={"hdr.date_missing": "flag"})
    tx = make_tx(NO_DATE_NO_ID, account=None)
    out = await data_headers.build(services(flag)).run(tx)
    assert out.result is Result.FLAG and not tx.add_headers


async def test_date_missing_off_adds_nothing():
    tx = make_tx(NO_DATE_NO_ID)
    off = HeaderSettings(actions={"hdr.date_missing": "off"})
    out = await data_headers.build(services(off)).run(tx)
    assert out.result is Result.PASS
    assert [n for n, _ in tx.add_headers] == ["Message-ID"]
    assert [f["id"] for f in tx.findings] == ["hdr.message_id_missing"]


def test_missing_from_is_still_refused():
    found = ids(msg(*[h for h in BASE if not h.startswith(("From", "Date"))]))
    assert found == ["hdr.required", "hdr.date_missing"]
    assert RULES["hdr.required"].default == "reject"


def test_non_ascii_inside_encoded_word_is_a_finding_not_a_crash():
    from gateway.message.parse import EncodedWordError, decode_words
    with pytest.raises(EncodedWordError):
        decode_words("=?utf-8?q?caf\u00e9?=")
    with pytest.raises(EncodedWordError):
        decode_words("=?utf-8?b?Y2Fm\u00e9?=")
