"""Trace integrity (P-PATH) and misleading headers (P-SUBJ / P-FORGE), issue 5.3 and 5.5."""
from __future__ import annotations

import base64
import email.utils
import json
import time

import pytest

from gateway.checks import data_subject, data_trace
from gateway.message.parse import parse_headers, parse_received
from gateway.message.rules import REPLY_BODY_PREFIX, check_subject, check_trace, display_domains
from gateway.message.settings import HeaderSettings
from gateway.core.transaction import Result, Transaction
from gateway.registry.model import MailingList
from gateway.services import Services

import checkkit

from conftest import CI, CORPORA
from smtp_client import send

DATE = "Mon, 06 May 2024 13:59:00 +0200"
BASE = ("From: Alice <alice@example.com>", "To: bob@example.org", f"Date: {DATE}", "Message-ID: <1@example.com>")


def msg(*headers: str, body: str = "hi\r\n") -> bytes:
    return ("\r\n".join(headers) + "\r\n\r\n" + body).encode("utf-8")


def make_tx(message: bytes, list: MailingList | None = None) -> Transaction:
    return checkkit.transaction(message, mailing_list=list)


def services(settings: HeaderSettings | None = None, hostname: str = "gw.example.net") -> Services:
    return checkkit.services(headers=settings or HeaderSettings(), hostname=hostname, clock=lambda: 0.0)


def subj_ids(*headers: str, settings: HeaderSettings | None = None, body: str = "hi\r\n",
             own: tuple[str, ...] = (), **extra) -> list[str]:
    data = msg(*headers, body=body)
    return [f.id for f in check_subject(data, parse_headers(data), settings or HeaderSettings(), extra, own)]


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
    assert tx.findings[0]["id"] == "trace.forged_received"
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


@pytest.mark.parametrize("subject", ["Re: hi", "RE: hi", "AW: hi", "Antw: hi", "Re[2]: hi", "Re(3): hi", "  re : hi",
                                     "=?utf-8?q?Re=3A_hi?=", "Re: Fwd: hi"])
def test_fake_reply_flagged_for_ordinary_mail(subject):
    assert subj_ids(*BASE, f"Subject: {subject}") == ["subj.fake_reply"]


@pytest.mark.parametrize("subject", ["Regarding lunch", "Reply needed", "Fwdx", "Tram: x", "Are: x", "hi Re: x"])
def test_not_a_reply_marker(subject):
    assert subj_ids(*BASE, f"Subject: {subject}") == []


# Forward markers of the clients: Fwd/Fw (English, Thunderbird, Gmail, Outlook), WG (German Outlook,
# "Weitergeleitet"), TR (French Outlook, "Transféré"), Doorst (Dutch Outlook, "Doorsturen"),
# RV (Spanish Outlook, "Reenviado"), I (Italian Outlook, "Inoltrato"). A forward starts a new
# thread: never a fake reply, not even as bulk mail.
@pytest.mark.parametrize("subject", ["Fwd: hi", "FW: hi", "fw:hi", "Fw: Re: hi", "WG: hi", "WG: AW: hi", "TR: hi",
                                     "TR: RE: hi", "Doorst: hi", "RV: hi", "I: hi", "Fwd[2]: hi"])
@pytest.mark.parametrize("how", [{}, {"bulk": True}])
def test_forwards_are_never_fake_replies(subject, how):
    assert subj_ids(*BASE, f"Subject: {subject}", **how) == []


def test_real_replies_pass():
    assert subj_ids(*BASE, "Subject: Re: hi", "In-Reply-To: <0@example.com>") == []
    assert subj_ids(*BASE, "Subject: Re: hi", "References: <0@example.com>") == []


@pytest.mark.parametrize("how", [{"list": checkkit.mailing_list()},
                                 {"bulk": True}])
def test_fake_reply_refused_for_list_and_bulk(how):
    assert subj_ids(*BASE, "Subject: Re: offer", **how) == ["subj.fake_reply_bulk"]


@pytest.mark.parametrize("header", ["List-Id: <news.example.com>", "List-Unsubscribe: <mailto:u@example.com>",
                                    "Precedence: bulk", "Precedence: list"])
def test_message_says_it_is_list_mail(header):
    assert subj_ids(*BASE, "Subject: Re: offer", header) == ["subj.fake_reply_bulk"]
    assert subj_ids(*BASE, "Subject: Re: offer", "Precedence: junk") == ["subj.fake_reply"]


def test_discussion_list_without_evidence_is_only_flagged():
    # List-Post: members post to the list, a terse reply from a client without thread headers is normal
    assert subj_ids(*BASE, "Subject: Re: meeting", "List-Id: <dev.lists.example.com>",
                    "List-Post: <mailto:dev@lists.example.com>") == ["subj.fake_reply"]
    # RFC 2369 "List-Post: NO": an announce-only list, no member replies
    assert subj_ids(*BASE, "Subject: Re: offer", "List-Id: <news.example.com>",
                    "List-Post: NO (posting not allowed on this list)") == ["subj.fake_reply_bulk"]


# One body of each form a client quotes the earlier message in; each alone is evidence.
QUOTES = {
    ">-quoted lines": "Yes, fine.\r\n\r\n> Shall we meet at ten?\r\n",
    "HTML-escaped > (Hotmail)": "<html>Yes.<br>\r\n&gt;From: Bob<br>\r\n&gt;Shall we meet?</html>\r\n",
    "Outlook Original Message": "Yes.\r\n\r\n-----Original Message-----\r\nFrom: Bob\r\nSent: Monday\r\n",
    "Outlook German": "Ja.\r\n\r\n-----Urspr=C3=BCngliche Nachricht-----\r\nVon: Bob\r\n",
    "Outlook From/Sent block": "Yes.\r\n\r\n________________________________\r\nFrom: Bob <bob@example.org>\r\n"
                               "Sent: Monday, May 6, 2024 10:00 AM\r\nTo: Alice\r\nSubject: meeting\r\n",
    "Outlook.com bold block": "Yes.\r\n\r\n*From:* Bob <bob@example.org>\r\n*Sent:* Monday, May 6, 2024\r\n",
    "Outlook HTML block": "<p>Yes.</p><hr><b>From:</b> Bob<br>\r\n<b>Sent:</b> Monday<br>\r\n",
    "Outlook French block": "Oui.\r\n\r\nDe : Bob\r\nEnvoy=C3=A9 : lundi 6 mai 2024 10:00\r\n",
    "On .. wrote:": "Yes.\r\n\r\nOn Mon, May 6, 2024 at 10:00 AM Bob <bob@example.org> wrote:\r\n\r\nShall we?\r\n",
    "AOL writes:": "Yes.\r\n\r\nIn a message dated 5/6/2024 10:00:00 AM Eastern Daylight Time, bob@example.org "
                   "writes:\r\n\r\n<< Shall we? >>\r\n",
    "Am .. schrieb": "Ja.\r\n\r\nAm 06.05.2024 um 10:00 schrieb Bob <bob@example.org>:\r\nTreffen wir uns?\r\n",
    "Le .. a écrit": "Oui.\r\n\r\nLe lun. 6 mai 2024 à 10:00, Bob <bob@example.org> a écrit :\r\nOn se voit ?\r\n",
    "Le .. a =C3=A9crit (QP)": "Oui.\r\n\r\nLe 6 mai 2024, Bob a =C3=A9crit=C2=A0:\r\n",
    "blockquote cite (Apple Mail)": '<html><body>Yes.<br><blockquote type=3D"cite">Shall we?</blockquote></body></html>\r\n',
    "divRplyFwdMsg (Outlook)": '<html><body><p>Yes.</p><div id=3D"divRplyFwdMsg" dir=3D"ltr">Bob</div></body></html>\r\n',
    "gmail_quote": '<div dir="ltr">Yes.</div><br><div class="gmail_quote"><div class="gmail_attr">Bob</div></div>\r\n',
}


@pytest.mark.parametrize("name", list(QUOTES))
def test_quoted_earlier_message_is_evidence_of_a_real_reply(name):
    assert subj_ids(*BASE, "Subject: Re: meeting", "Precedence: bulk", body=QUOTES[name]) == []


def test_thread_index_is_evidence_of_a_real_reply():
    # Outlook/Exchange threads with Thread-Index/Thread-Topic and writes no In-Reply-To
    assert subj_ids(*BASE, "Subject: RE: meeting", "Precedence: bulk", "Thread-Topic: meeting",
                    "Thread-Index: AdqfPq3EjzJ6tM8qS2ymcBvJfLhR1A==") == []
    # Thread-Topic alone is only the subject again
    assert subj_ids(*BASE, "Subject: RE: meeting", "Precedence: bulk",
                    "Thread-Topic: meeting") == ["subj.fake_reply_bulk"]


@pytest.mark.parametrize("body", [
    "Your invoice is ready. We wrote: nothing.\r\n",                 # "wrote:" not at a line end
    "Dear customer,\r\nFrom: the team\r\nWe sent you an offer.\r\n",  # no "Sent:" field
    "<html><blockquote>Special offer</blockquote></html>\r\n",        # a blockquote that is not type=cite
    "Offer\r\n" + "x" * 70 + "\r\n",
])
def test_things_that_only_look_like_quotes_still_refused(body):
    assert subj_ids(*BASE, "Subject: Re: your invoice", "Precedence: bulk", body=body) == ["subj.fake_reply_bulk"]


def test_only_a_bounded_body_prefix_is_read():
    filler = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit.\r\n" * 700)
    assert len(filler) > REPLY_BODY_PREFIX
    quote = "\r\n> Shall we meet?\r\n"
    assert subj_ids(*BASE, "Subject: Re: x", "Precedence: bulk", body="Yes." + quote + filler) == []
    assert subj_ids(*BASE, "Subject: Re: x", "Precedence: bulk", body=filler + quote) == ["subj.fake_reply_bulk"]


def _b64(text: str) -> str:
    return base64.encodebytes(text.encode()).decode().replace("\n", "\r\n")


def test_base64_text_is_decoded_before_it_is_searched():
    quoted = "Ja.\r\n\r\nAm 06.05.2024 um 10:00 schrieb Bob <bob@example.org>:\r\n> Treffen?\r\n"
    head = ("MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: base64")
    assert subj_ids(*BASE, "Subject: AW: Treffen", "Precedence: bulk", *head, body=_b64(quoted)) == []
    assert subj_ids(*BASE, "Subject: AW: Treffen", "Precedence: bulk", *head,
                    body=_b64("Angebot!\r\n")) == ["subj.fake_reply_bulk"]
    part = ("--b\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n{}"
            "--b\r\nContent-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\n{}--b--\r\n")
    multi = ("MIME-Version: 1.0", 'Content-Type: multipart/mixed; boundary="b"')
    assert subj_ids(*BASE, "Subject: AW: Treffen", "Precedence: bulk", *multi,
                    body=part.format(_b64(quoted), _b64("png"))) == []
    # decoded bytes of non-text parts are never read: an image may hold any byte sequence
    assert subj_ids(*BASE, "Subject: AW: Treffen", "Precedence: bulk", *multi,
                    body=part.format(_b64("Angebot!\r\n"), _b64("x\n> y\n"))) == ["subj.fake_reply_bulk"]


async def test_subject_check_outcomes():
    check = data_subject.build(services())
    tx = make_tx(msg(*BASE, "Subject: Re: offer"))
    out = await check.run(tx)
    assert out.result is Result.FLAG and "[subj.fake_reply]" in out.detail
    assert tx.findings[0]["action"] == "flag"
    tx = make_tx(msg(*BASE, "Subject: Re: offer"),
                 list=checkkit.mailing_list())
    out = await check.run(tx)
    assert out.result is Result.FAIL
    assert out.reply.render(out.detail) == (
        "550 5.7.1 P-SUBJ Misleading subject: reply marker without a thread: list/bulk mail Subject starts with "
        "'Re:' but has no In-Reply-To, References or Thread-Index and quotes no earlier message "
        "[subj.fake_reply_bulk]")


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


@pytest.mark.parametrize("from_,found", [
    ('"service@paypal.com" <x@evil.example>', "subj.display_name"),
    ("x@evil.example (support@bank.com)", "subj.display_name"),
    ('"Alice (alice@other.example)" <alice@example.com>', "subj.display_name"),
    # bare domain-like words: brands often look like domains, so only flagged
    ('"PayPal.com Support" <x@evil.example>', "subj.display_domain"),
    ("=?utf-8?q?paypal=2Ecom?= <x@evil.example>", "subj.display_domain"),
    ('"CNET News.com Daily Dispatch" <Online_Newsletters@newsletter.online.com>', "subj.display_domain"),
    ('"Amazon.de Kundenservice" <x@example.com>', "subj.display_domain"),
    ('"support@example.com" <support@example.com>', None),
    ('"Booking.com" <noreply@mail.booking.com>', None),
    ('"Shop.co.uk" <a@news.shop.co.uk>', None),
    ('"Dr. J.R.R. Tolkien" <jrr@example.com>', None),
    ('"St.Louis office" <x@example.com>', None),
    ("Alice <alice@example.com>", None),
])
def test_display_name(from_, found):
    base = [h for h in BASE if not h.startswith("From")]
    assert subj_ids(f"From: {from_}", *base) == ([found] if found else [])


@pytest.mark.parametrize("from_", ['"support@example.net" <alice@example.com>', '"Example.net team" <alice@example.com>',
                                   '"help@eu.example.net" <alice@example.com>'])
def test_display_name_of_the_accounts_own_domains_never_counts(from_):
    base = [h for h in BASE if not h.startswith("From")]
    assert subj_ids(f"From: {from_}", *base, own=("example.com", "example.net")) == []
    assert subj_ids(f"From: {from_}", *base, own=("example.com",)) != []


def test_display_domains():
    assert display_domains("Amazon.com Support") == ([], ["amazon.com"])
    assert display_domains("mail me at a@b.example or www.x.de") == (["b.example"], ["www.x.de"])
    assert display_domains("v1.2 release") == ([], [])


async def test_subject_check_takes_the_sessions_account_domains():
    class Accounts:  # the account cache: data_subject reads the fresh account, as data_sender_auth does
        def __init__(self, account):
            self.account = account

        def cached(self, name):
            return self.account if name == self.account.name else None

    def account(*domains):
        return checkkit.account("alice", *domains)

    data = msg('From: "billing@example.net" <alice@example.com>', *BASE[1:])
    stale = account(("example.com", True))
    for fresh, result in ((account(("example.com", True), ("example.net", True)), Result.PASS),
                          (account(("example.com", True), ("example.net", False)), Result.FAIL),  # pending: not own
                          (stale, Result.FAIL)):
        check = data_subject.SubjectCheck(HeaderSettings(), Accounts(fresh))
        tx = make_tx(data)
        tx.session.account = stale
        assert (await check.run(tx)).result is result


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
            data = msg(f"From: {v['From']}")
            fs = check_subject(data, parse_headers(data), settings, {})
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


# --- genuine replies and forwards of real clients, as list mail ---------------------------------------
#
# Each shape is the header and body layout the client writes (no In-Reply-To/References: these
# clients, or the list software in between, leave them out), sent as list mail (List-Id,
# List-Unsubscribe, Precedence: bulk, no List-Post), the case that was refused before. Each
# carries one piece of evidence of a real reply (or is a forward); the same message with the
# evidence removed must be refused, so every shape tests the evidence it names.

LIST_HEADERS = ("List-Id: Example members <members.lists.example.com>",
                "List-Unsubscribe: <mailto:members-leave@lists.example.com>", "Precedence: bulk")


def _alternative(boundary: str, plain: str, html: str, qp: bool = True) -> tuple[tuple[str, ...], str]:
    cte = "quoted-printable" if qp else "7bit"
    head = ("MIME-Version: 1.0", f'Content-Type: multipart/alternative;\r\n\tboundary="{boundary}"')
    body = (f"--{boundary}\r\nContent-Type: text/plain; charset=\"utf-8\"\r\nContent-Transfer-Encoding: {cte}\r\n\r\n"
            f"{plain}\r\n--{boundary}\r\nContent-Type: text/html; charset=\"utf-8\"\r\n"
            f"Content-Transfer-Encoding: {cte}\r\n\r\n{html}\r\n--{boundary}--\r\n")
    return head, body


def client_shapes() -> dict[str, tuple[str, tuple[str, ...], str]]:
    """name -> (Subject, client headers, body)."""
    out: dict[str, tuple[str, tuple[str, ...], str]] = {}
    head, body = _alternative(
        "----=_NextPart_000_0012_01DA9F5E.1A2B3C40",
        "Agreed, let's go with option B.\r\n\r\nAlice\r\n",
        "<html xmlns:o=3D\"urn:schemas-microsoft-com:office:office\"><head><meta name=3DGenerator content=3D"
        "\"Microsoft Word 15 (filtered medium)\"></head><body lang=3DEN-US><div class=3DWordSection1>"
        "<p class=3DMsoNormal>Agreed, let's go with option B.<o:p></o:p></p></div></body></html>")
    # the quote deleted by the user: Thread-Index is the only evidence
    out["Outlook/Exchange (Thread-Index)"] = ("RE: Budget 2025", (
        "Thread-Topic: Budget 2025", "Thread-Index: AdqfPq3EjzJ6tM8qS2ymcBvJfLhR1AAAbCdE",
        "X-MS-Has-Attach:", "X-MS-TNEF-Correlator:", "X-Mailer: Microsoft Outlook 16.0",
        "Content-Language: en-us", *head), body)
    out["AOL"] = ("Re: Picnic on Saturday", (
        "X-Mailer: AOL 9.0 for Windows US sub 5035", "MIME-Version: 1.0",
        'Content-Type: text/plain; charset="US-ASCII"', "Content-Transfer-Encoding: 7bit"),
        "Count me in, I'll bring the lemonade.\r\n\r\n"
        "In a message dated 5/6/2024 10:02:11 A.M. Eastern Daylight Time, bob@example.org writes:\r\n\r\n"
        "<< Who is coming on Saturday? >>\r\n")
    out["MSN/Hotmail"] = ("RE: printer driver", (
        "X-Originating-IP: [192.0.2.44]", "X-Originating-Email: [alice@example.com]",
        "X-Sender: alice@example.com", "MIME-Version: 1.0", "Content-Type: text/plain; format=flowed"),
        "It works now, thanks!\r\n\r\n\r\n>From: Bob <bob@example.org>\r\n>Reply-To: members@lists.example.com\r\n"
        ">To: members@lists.example.com\r\n>Subject: printer driver\r\n>Date: Mon, 6 May 2024 10:00:00 +0200\r\n"
        ">\r\n>Try the new driver from the vendor's site.\r\n\r\n"
        "_________________________________________________________________\r\n"
        "Get your FREE download of MSN Explorer at http://explorer.msn.com/intl.asp\r\n")
    head, body = _alternative(
        "----=_Part_2764419_1216466092.1715000000000",
        "I can make it on Thursday.\r\n\r\n\r\n    On Monday, May 6, 2024 at 10:00:00 AM GMT+2, Bob =\r\n"
        "<bob@example.org> wrote: =20\r\n\r\n Rehearsal moves to Thursday, 19:30.\r\n",
        "<html><head></head><body><div class=3D\"ydp2f0c yahoo-style-wrap\"><div>I can make it on Thursday.</div>"
        "</div><div id=3D\"yahoo_quoted_1234\" class=3D\"yahoo_quoted\"><div style=3D\"font-family:'Helvetica Neue'"
        "\"><div>On Monday, May 6, 2024 at 10:00:00 AM GMT+2, Bob &lt;bob@example.org&gt; wrote:</div><div>"
        "Rehearsal moves to Thursday, 19:30.</div></div></div></body></html>")
    out["webmail (Yahoo)"] = ("Re: Choir rehearsal", ("X-Mailer: WebService/1.1.22256 YMailNorrin", *head), body)
    out["Evolution"] = ("Re: [patch] fix the build on arm64", (
        "X-Mailer: Evolution 3.46.4-2", "MIME-Version: 1.0", 'Content-Type: text/plain; charset="UTF-8"',
        "Content-Transfer-Encoding: 7bit"),
        "On Mon, 2024-05-06 at 10:00 +0200, Bob wrote:\r\n> The build fails on arm64 since the last merge.\r\n\r\n"
        "Fixed in the attached patch, please test.\r\n\r\n-- \r\nAlice\r\n")
    head, body = _alternative(
        "Apple-Mail=_1B2C3D4E-5F60-4A1B-9C2D-3E4F5A6B7C8D",
        "Lovely, thank you!\r\n\r\n> On 6 May 2024, at 10:00, Bob <bob@example.org> wrote:\r\n> \r\n"
        "> Here are the photos from the trip.\r\n",
        "<html><head><meta http-equiv=3D\"content-type\" content=3D\"text/html; charset=3Dutf-8\"></head>"
        "<body style=3D\"overflow-wrap: break-word;\">Lovely, thank you!<br id=3D\"lineBreakAtBeginningOfMessage\">"
        "<div><br><blockquote type=3D\"cite\"><div>On 6 May 2024, at 10:00, Bob &lt;bob@example.org&gt; wrote:"
        "</div><br class=3D\"Apple-interchange-newline\"><div><div>Here are the photos from the trip.</div></div>"
        "</blockquote></div><br></body></html>")
    out["Apple Mail"] = ("Re: Photos from the trip", (
        "X-Mailer: Apple Mail (2.3774.500.171.1.1)", *head), body)
    out["forward WG: (German Outlook)"] = ("WG: Rechnung 2024-117", (
        "Thread-Topic: Rechnung 2024-117", "X-Mailer: Microsoft Outlook 16.0", "MIME-Version: 1.0",
        'Content-Type: text/plain; charset="utf-8"', "Content-Transfer-Encoding: quoted-printable"),
        "Zur Info.\r\n\r\n-----Urspr=C3=BCngliche Nachricht-----\r\nVon: Buchhaltung <buha@example.org>\r\n"
        "Gesendet: Montag, 6. Mai 2024 10:00\r\nAn: Alice <alice@example.com>\r\nBetreff: Rechnung 2024-117\r\n\r\n"
        "Anbei die Rechnung.\r\n")
    out["forward TR: (French Outlook)"] = ("TR: Planning de juin", (
        "X-Mailer: Microsoft Outlook 16.0", "MIME-Version: 1.0", 'Content-Type: text/plain; charset="utf-8"',
        "Content-Transfer-Encoding: quoted-printable"),
        "Pour info.\r\n\r\nDe : Bob <bob@example.org>\r\nEnvoy=C3=A9 : lundi 6 mai 2024 10:00\r\n"
        "=C3=80 : Alice <alice@example.com>\r\nObjet : Planning de juin\r\n\r\nVoici le planning.\r\n")
    out["forward Fwd: (Gmail)"] = ("Fwd: Tickets", ("MIME-Version: 1.0", 'Content-Type: text/plain; charset="UTF-8"'),
        "See below.\r\n\r\n---------- Forwarded message ---------\r\nFrom: Bob <bob@example.org>\r\n"
        "Date: Mon, 6 May 2024 at 10:00\r\nSubject: Tickets\r\nTo: Alice <alice@example.com>\r\n\r\n"
        "The tickets are booked.\r\n")
    return out


SHAPES = list(client_shapes())


def shape_message(name: str, date: str = DATE, evidence: bool = True) -> bytes:
    subject, head, body = client_shapes()[name]
    if not evidence:  # the same message with the thread evidence and quoted text removed
        head = tuple(h for h in head if not h.startswith(("Thread-Index", "MIME-Version", "Content-")))
        body = "Thanks, agreed.\r\n"
    return msg("From: Alice <alice@example.com>", "To: Example members <members@lists.example.com>",
               f"Subject: {subject}", f"Date: {date}", "Message-ID: <%d@example.com>" % abs(hash((name, date))),
               *LIST_HEADERS, *head, body=body)


@pytest.mark.parametrize("name", SHAPES)
def test_genuine_client_reply_or_forward_is_no_fake_reply(name):
    data = shape_message(name)
    assert [f.id for f in check_subject(data, parse_headers(data), HeaderSettings(), {})] == []
    stripped = shape_message(name, evidence=False)
    found = [f.id for f in check_subject(stripped, parse_headers(stripped), HeaderSettings(), {})]
    assert found == ([] if name.startswith("forward") else ["subj.fake_reply_bulk"])


# --- the same over SMTP ----------------------------------------------------------------------------------

def _now_date() -> str:
    return email.utils.formatdate(time.time())


@pytest.mark.parametrize("name", SHAPES)
async def test_genuine_client_reply_or_forward_relayed_over_smtp(sink, gateway_factory, name):
    from test_headers_smtp import NO_LISTMAIL, assert_relayed_unchanged
    h = await gateway_factory(sink, **NO_LISTMAIL)
    await h.add_account()
    data = shape_message(name, _now_date())
    r = await send(h.port(), data)
    await sink.wait_for(1)
    assert_relayed_unchanged(r, sink.messages[0].data, data)
    relayed = [rec for rec in h.log_records() if rec.get("decision") == "relayed"]
    assert len(relayed) == 1
    assert not [f for f in relayed[0].get("findings", []) if f["id"].startswith("subj.")]


async def test_fake_replies_still_refused_over_smtp(sink, gateway_factory):
    from test_headers_smtp import NO_LISTMAIL
    h = await gateway_factory(sink, **NO_LISTMAIL)
    await h.add_account()
    newsletter = msg("From: Shop <alice@example.com>", "To: bob@example.org", "Subject: Re: Your order #4711",
                     f"Date: {_now_date()}", "Message-ID: <n1@example.com>", "Precedence: bulk",
                     "List-Unsubscribe: <https://example.com/u?x=1>", "MIME-Version: 1.0",
                     'Content-Type: text/html; charset="utf-8"',
                     body="<html><body><h1>Only today: 50% off!</h1><p>Your order is waiting.</p></body></html>\r\n")
    r = await send(h.port(), newsletter)
    assert r.decode() == (
        "550 5.7.1 P-SUBJ Misleading subject: reply marker without a thread: list/bulk mail Subject starts with "
        "'Re:' but has no In-Reply-To, References or Thread-Index and quotes no earlier message "
        "[subj.fake_reply_bulk]")
    # a genuine client shape with its evidence removed is refused as well
    r = await send(h.port(), shape_message("Evolution", _now_date(), evidence=False))
    assert r.endswith(b"[subj.fake_reply_bulk]")
    assert sink.messages == []


async def test_display_names_over_smtp(sink, gateway_factory):
    h = await gateway_factory(sink)
    await h.add_account(domains=("example.com", "example.net"))

    def with_from(from_: str) -> bytes:
        return msg(f"From: {from_}", "To: bob@example.org", "Subject: Daily dispatch", f"Date: {_now_date()}",
                   "Message-ID: <%d@example.com>" % time.time_ns())

    # a brand that looks like a domain: flagged and relayed
    r = await send(h.port(), with_from('"CNET News.com Daily Dispatch" <alice@example.com>'))
    assert r.startswith(b"250 "), r
    # an address of the account's own other domain: relayed without a finding
    r = await send(h.port(), with_from('"billing@example.net" <alice@example.com>'))
    assert r.startswith(b"250 "), r
    # an address of another domain: refused
    r = await send(h.port(), with_from('"service@paypal.com" <alice@example.com>'))
    assert r.decode() == ("550 5.7.1 P-FORGE Misleading From display name: From display name shows an address "
                          "in paypal.com but the address is in example.com [subj.display_name]")
    await sink.wait_for(2)
    recs = [rec for rec in h.log_records() if rec.get("decision") == "relayed"]
    ids = [[f["id"] for f in rec.get("findings", []) if f["id"].startswith("subj.")] for rec in recs]
    assert ids == [["subj.display_domain"], []]
    assert [f["action"] for f in recs[0]["findings"] if f["id"] == "subj.display_domain"] == ["flag"]
