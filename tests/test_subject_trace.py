"""Trace integrity (P-PATH) and misleading headers (P-SUBJ / P-FORGE), issue 5.3 and 5.5."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from gateway.checks import data_subject, data_trace
from gateway.message.headers import check_subject, check_trace, display_domains, parse_headers, parse_received
from gateway.message.settings import HeaderSettings
from gateway.smtp.transaction import Result, SessionInfo, Transaction

from conftest import CI, CORPORA
DATE = "Mon, 06 May 2024 13:59:00 +0200"
BASE = ("From: Alice <alice@example.com>", "To: bob@example.org", f"Date: {DATE}", "Message-ID: <1@example.com>")


def msg(*headers: str, body: str = "hi\r\n") -> bytes:
    return ("\r\n".join(headers) + "\r\n\r\n" + body).encode("utf-8")


def make_tx(message: bytes, **extra) -> Transaction:
    tx = Transaction(SessionInfo("s1", "submission", "192.0.2.1", 40000))
    tx.message = message
    tx.extra.update(extra)
    return tx


def services(settings: HeaderSettings | None = None, hostname: str = "gw.example.net"):
    cfg = SimpleNamespace(headers=settings or HeaderSettings(), smtp=SimpleNamespace(hostname=hostname, trace_header="X-Gateway-Trace"))
    return SimpleNamespace(config=cfg, clock=lambda: 0.0)


def subj_ids(*headers: str, settings: HeaderSettings | None = None, **extra) -> list[str]:
    return [f.id for f in check_subject(parse_headers(msg(*headers)), settings or HeaderSettings(), extra)]


# --- trace ---------------------------------------------------------------------------------------


def trace_ids(*headers: str, settings: HeaderSettings | None = None, trace_header: str = "X-Gateway-Trace"
              ) -> list[str]:
    s = settings or HeaderSettings(own_hostnames=["relay1.example.net"])
    return [f.id for f in check_trace(parse_headers(msg(*headers)), s, ["gw.example.net", *s.own_hostnames],
                                      trace_header)]


@pytest.mark.parametrize("received,forged", [
    ("from client.example (client.example [192.0.2.7]) by mx.customer.example with ESMTP id 1; " + DATE, False),
    ("from client.example (client.example [192.0.2.7]) by gw.example.net with ESMTPSA id abc; " + DATE, True),
    ("from x by GW.EXAMPLE.NET. with ESMTP; " + DATE, True),
    ("from relay1.example.net ([192.0.2.9]) by mx.example.org; " + DATE, True),
    ("from laptop (helo=gw.example.net) by mx.example.org; " + DATE, True),
    ("from gw.example.network by mx.example.org; " + DATE, False),
    ("(qmail 10681 invoked by uid 404); 14 Nov 2003 08:05:52 -0000", False),
])
def test_forged_received(received, forged):
    assert trace_ids(*BASE, f"Received: {received}") == (["trace.forged_received"] if forged else [])


def test_own_trace_header_from_client_is_forged():
    assert trace_ids(*BASE, "X-Gateway-Trace: abc") == ["trace.forged_header"]
    # the name comes from smtp.trace_header, the one the gateway itself adds
    assert trace_ids(*BASE, "X-Gateway-Trace: abc", trace_header="X-Our-Trace") == []
    assert trace_ids(*BASE, "x-our-trace: abc", trace_header="X-Our-Trace") == ["trace.forged_header"]


async def test_trace_check_refuses_with_p_path():
    check = data_trace.build(services())
    tx = make_tx(msg("Received: from a by gw.example.net; " + DATE, *BASE))
    out = await check.run(tx)
    assert out.result is Result.FAIL
    assert out.reply.render(out.detail).startswith("550 5.7.1 P-PATH Forged trace header: ")
    assert tx.extra["findings"][0]["id"] == "trace.forged_received"
    assert (await check.run(make_tx(msg(*BASE)))).result is Result.PASS


RCVD = CORPORA / "spamassassin-t-data" / "rcvd_parser_vectors.json"


@pytest.mark.skipif(not RCVD.exists() and not CI, reason="corpora not mounted")
def test_received_vectors_parse():
    vectors = json.loads(RCVD.read_text())
    assert len(vectors) == 144
    s = HeaderSettings()
    for v in vectors:
        r = parse_received(v["received"])  # never raises
        check_trace(parse_headers(f"Received: {v['received']}\r\n\r\n".encode()), s, ["gw.example.net"])
        if v["verdict"] == "relay" and v["fields"]["by"]:
            assert r["by"].lower() == v["fields"]["by"].lower(), v["received"]
        if v["verdict"] == "relay" and v["fields"]["ip"] and "ip" in r:
            assert r["ip"].lower() in v["received"].lower()
    # a Received naming any of these hosts as "by" claims to be that host
    for v in vectors:
        if v["verdict"] == "relay" and v["fields"]["by"]:
            by = v["fields"]["by"]
            found = check_trace(parse_headers(f"Received: {v['received']}\r\n\r\n".encode()), s, [by])
            assert [f.id for f in found] == ["trace.forged_received"]


# --- fake replies ---------------------------------------------------------------------------------


@pytest.mark.parametrize("subject", ["Re: hi", "RE: hi", "Fwd: hi", "FW: hi", "fw:hi", "AW: hi", "Antw: hi", "TR: hi",
                                     "Re[2]: hi", "  re : hi", "=?utf-8?q?Re=3A_hi?="])
def test_fake_reply_flagged_for_ordinary_mail(subject):
    assert subj_ids(*BASE, f"Subject: {subject}") == ["subj.fake_reply"]


@pytest.mark.parametrize("subject", ["Regarding lunch", "Reply needed", "Fwdx", "Tram: x", "Are: x", "hi Re: x"])
def test_not_a_reply_marker(subject):
    assert subj_ids(*BASE, f"Subject: {subject}") == []


def test_real_replies_pass():
    assert subj_ids(*BASE, "Subject: Re: hi", "In-Reply-To: <0@example.com>") == []
    assert subj_ids(*BASE, "Subject: Fwd: hi", "References: <0@example.com>") == []


@pytest.mark.parametrize("how", [{"list": SimpleNamespace(id="0123456789abcdef", list_id="news.example.com")},
                                 {"bulk": True}])
def test_fake_reply_refused_for_list_and_bulk(how):
    assert subj_ids(*BASE, "Subject: Re: offer", **how) == ["subj.fake_reply_bulk"]


@pytest.mark.parametrize("header", ["List-Id: <news.example.com>", "List-Unsubscribe: <mailto:u@example.com>",
                                    "Precedence: bulk", "Precedence: list"])
def test_message_says_it_is_list_mail(header):
    assert subj_ids(*BASE, "Subject: Re: offer", header) == ["subj.fake_reply_bulk"]
    assert subj_ids(*BASE, "Subject: Re: offer", "Precedence: junk") == ["subj.fake_reply"]


async def test_subject_check_outcomes():
    check = data_subject.build(services())
    tx = make_tx(msg(*BASE, "Subject: Re: offer"))
    out = await check.run(tx)
    assert out.result is Result.FLAG and "[subj.fake_reply]" in out.detail
    assert tx.extra["findings"][0]["action"] == "flag"
    tx = make_tx(msg(*BASE, "Subject: Re: offer"),
                 list=SimpleNamespace(id="0123456789abcdef", list_id="news.example.com"))
    out = await check.run(tx)
    assert out.result is Result.FAIL
    assert out.reply.render(out.detail).startswith("550 5.7.1 P-SUBJ ")


# --- obfuscation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("subject,bad", [
    ("=?utf-8?q?Invoice_=E2=80=AEfdp.exe?=", True),   # RIGHT-TO-LEFT OVERRIDE
    ("=?utf-8?b?aGkNCkJjYzogeEBleGFtcGxlLmNvbQ==?=", True),  # CRLF: header injection attempt
    ("=?utf-8?q?a=07b?=", True),
    ("=?utf-8?q?=E2=81=A6x?=", True),                   # LEFT-TO-RIGHT ISOLATE
    ("=?utf-8?q?caf=C3=A9_=D7=A9=D7=9C=D7=95=D7=9D?=", False),  # plain RTL text is fine
    ("tab\there", False),
])
def test_obfuscated_subject(subject, bad):
    assert subj_ids(*BASE, f"Subject: {subject}") == (["subj.obfuscated"] if bad else [])


# --- display names --------------------------------------------------------------------------------


@pytest.mark.parametrize("from_,bad", [
    ('"service@paypal.com" <x@evil.example>', True),
    ('"PayPal.com Support" <x@evil.example>', True),
    ("=?utf-8?q?paypal=2Ecom?= <x@evil.example>", True),
    ("x@evil.example (support@bank.com)", True),
    ('"support@example.com" <support@example.com>', False),
    ('"Booking.com" <noreply@mail.booking.com>', False),
    ('"Shop.co.uk" <a@news.shop.co.uk>', False),
    ('"Dr. J.R.R. Tolkien" <jrr@example.com>', False),
    ('"St.Louis office" <x@example.com>', False),
    ("Alice <alice@example.com>", False),
])
def test_display_name(from_, bad):
    base = [h for h in BASE if not h.startswith("From")]
    assert subj_ids(f"From: {from_}", *base) == (["subj.display_name"] if bad else [])


def test_display_domains():
    assert display_domains("Amazon.com Support") == ["amazon.com"]
    assert display_domains("mail me at a@b.example or www.x.de") == ["b.example", "www.x.de"]
    assert display_domains("v1.2 release") == []


HARAKA = CORPORA / "haraka-plugin-headers-vectors" / "header_check_vectors.json"


@pytest.mark.skipif(not HARAKA.exists() and not CI, reason="corpora not mounted")
def test_haraka_display_name_impersonation_vectors():
    """Haraka's from_phish vectors, with its brand list as our brand_domains."""
    vectors = json.loads(HARAKA.read_text())["from_phish_display_name_impersonation"]
    brands = {"Amazon": "amazon.com", "Costco": "costco.com", "PayPal": "paypal.com", "Chase": "chase.com"}
    checked = 0
    for v in vectors:
        if "dkim_pass" in v:
            continue  # decided by DKIM alignment in Haraka, not by names
        settings = HeaderSettings(brand_domains={} if v.get("phish_targets") == [] else brands)
        found = subj_ids(f"From: {v['From']}", "To: x@example.org", settings=settings)
        expect_bad = v["expect"] in ("fail", "reject")
        assert (found == ["subj.brand"]) is expect_bad, (v, found)
        if "msg_contains" in v and expect_bad and v["msg_contains"] != "impersonate":
            fs = check_subject(parse_headers(msg(f"From: {v['From']}")), settings, {})
            assert v["msg_contains"] in fs[0].detail
        checked += 1
    assert checked >= 13


def test_brand_check_inactive_without_brands():
    assert subj_ids('From: "PayPal Security" <x@evil.example>') == []


# --- Reply-To for list/bulk ---------------------------------------------------------------------


def test_reply_to_domain_only_for_bulk():
    assert subj_ids(*BASE, "Reply-To: x@other.example") == []
    assert subj_ids(*BASE, "Reply-To: x@other.example", bulk=True) == ["subj.reply_to_domain"]
    assert subj_ids(*BASE, "Reply-To: list@lists.example.com", bulk=True) == []
