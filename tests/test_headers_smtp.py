"""The header checks of issue 5 over real SMTP: client -> gateway -> sink.

For every finding id of ``gateway.message.findings.RULES`` one good and one
violating message, built here from the current time (the gateway's clock is
the real one, and the Date window is 7 days back .. 15 minutes ahead). The
violating one gets the exact reply; the good one reaches the sink byte for
byte, with only the gateway's trace headers (Received, X-Gateway-Trace) in
front. Rules that only flag by default are switched to ``reject`` for their
case. Then real-world shaped mail (multipart/alternative, attachments, long
folded headers, UTF-8 with SMTPUTF8, mailing-list headers, a forward, a
reply) must pass unchanged with the default settings.
"""
from __future__ import annotations

import base64
import email.utils
import itertools
import re
import time
from dataclasses import dataclass, field

import pytest

from gateway.config import DEFAULT_CHECKS
from gateway.message.findings import RULES
from smtp_client import send

_ids = itertools.count(1)


# ------------------------------------------------------------------ building messages
def now_date(offset: float = 0.0) -> bytes:
    return email.utils.formatdate(time.time() + offset).encode()


def build(*, replace: dict[bytes, bytes | None] | None = None, extra: bytes = b"",
          body: bytes = b"Hello Bob,\r\n\r\nthe figures are attached.\r\n\r\nAlice\r\n") -> bytes:
    """A plain message from alice@example.com to bob@example.org.

    ``replace`` maps a header name to a new value (None drops it); ``extra``
    is raw header lines added after the standard ones.
    """
    fields: list[tuple[bytes, bytes]] = [
        (b"From", b"Alice <alice@example.com>"),
        (b"To", b"Bob <bob@example.org>"),
        (b"Subject", b"Quarterly report"),
        (b"Date", now_date()),
        (b"Message-ID", b"<%d.%d@example.com>" % (time.time_ns(), next(_ids))),
    ]
    replace = replace or {}
    out = b""
    for name, value in fields:
        if name in replace:
            value = replace[name]
            if value is None:
                continue
        out += name + b": " + value + b"\r\n"
    return out + extra + b"\r\n" + body


# ------------------------------------------------------------------ SMTP (smtp_client.send)
_TRACE = re.compile(
    rb"Received: from client\.test \(\[127\.0\.0\.1\]\)\r\n"
    rb"\t\(authenticated account alice\)\r\n"
    rb"\tby gw\.test with (?:ESMTPA|UTF8SMTPA) id (?P<id>[A-Za-z0-9_-]+)\r\n"
    rb"\tfor <[^>\r\n]+>; [^\r\n]+\r\n"
    rb"X-Gateway-Trace: (?P=id)\r\n")
_RELAYED = re.compile(rb"250 2\.0\.0 OK: relayed, trace id (?P<id>[A-Za-z0-9_-]+) \(")


def assert_relayed_unchanged(r: bytes, received: bytes, sent: bytes, added: bytes | None = None) -> None:
    """``received`` is the trace the gateway adds, then ``sent`` byte for byte."""
    m = _RELAYED.match(r)
    assert m, r
    t = _TRACE.match(received)
    assert t, received[:400]
    assert t["id"] == m["id"]
    rest = received[t.end():]
    if added is not None:
        a = re.match(added, rest)
        assert a, rest[:200]
        rest = rest[a.end():]
    assert rest == sent


# ------------------------------------------------------------------ one good and one bad message per rule
@dataclass
class Case:
    good: bytes
    bad: bytes
    reply: str
    good_params: str = ""
    bad_params: str = ""
    config: dict = field(default_factory=dict)


def _line_of(data: bytes, offset: int) -> int:
    return data[:offset].count(b"\n") + 1


def _reject(rule: str, **headers) -> dict:
    return {"headers": {"actions": {rule: "reject"}, **headers}}


# List-like mail (Precedence: bulk, List-*) from a list that is not in the
# registry is refused by data_listmail (P-OPTIN, issue 4), and registered list
# mail gets unsubscribe headers injected. These tests are about the header
# rules and byte-for-byte relaying, so list-like cases run without that check.
NO_LISTMAIL = {"checks": {"data": [c for c in DEFAULT_CHECKS["data"] if c != "data_listmail"]}}


def cases() -> dict[str, Case]:
    c: dict[str, Case] = {}

    bad = build(body=b"line one\nline two\r\n")
    off = bad.index(b"line one\n") + 8
    c["wire.bare_lf"] = Case(
        build(body=b"line one\r\nline two\r\n"), bad,
        f"550 5.6.0 P-HDR Bare LF in message data (SMTP smuggling): bare LF at line {_line_of(bad, off)} "
        f"(offset {off}) [wire.bare_lf]")

    bad = build(body=b"carriage\rreturn\r\n")
    off = bad.index(b"\rreturn")
    c["wire.bare_cr"] = Case(
        build(body=b"carriage\r\nreturn\r\n"), bad,
        f"550 5.6.0 P-HDR Bare CR in message data (SMTP smuggling): bare CR at line {_line_of(bad, off)} "
        f"(offset {off}) [wire.bare_cr]")

    bad = build(body=b"nul\x00byte\r\n")
    off = bad.index(b"\x00")
    c["wire.nul"] = Case(
        build(body=b"nul byte\r\n"), bad,
        f"550 5.6.0 P-HDR NUL byte in message data: NUL byte at line {_line_of(bad, off)} (offset {off}) "
        f"[wire.nul]")

    bad = build(body=b"x" * 999 + b"\r\n")
    c["wire.line_length"] = Case(
        build(body=b"x" * 998 + b"\r\n"), bad,
        f"550 5.6.0 P-HDR Line longer than 998 octets: line {_line_of(bad, bad.index(b'xxx'))} is 999 octets, "
        f"limit 998 [wire.line_length]")

    utf8_body = "Grüße aus Köln\r\n".encode()
    bad = build(body=utf8_body)
    c["wire.8bit"] = Case(
        build(body=utf8_body), bad,
        f"550 5.6.7 P-STD 8-bit data without BODY=8BITMIME or SMTPUTF8: 8-bit byte in the body at line "
        f"{_line_of(bad, bad.index('ü'.encode()))} without BODY=8BITMIME or SMTPUTF8 [wire.8bit]",
        good_params=" BODY=8BITMIME")

    subject = "Grüße".encode()
    bad = build(replace={b"Subject": subject})
    c["wire.8bit_header"] = Case(
        build(replace={b"Subject": subject}), bad,
        f"550 5.6.7 P-STD Non-ASCII header without SMTPUTF8: 8-bit byte in the header at line "
        f"{_line_of(bad, bad.index(subject))} without SMTPUTF8 [wire.8bit_header]",
        good_params=" SMTPUTF8 BODY=8BITMIME", bad_params=" BODY=8BITMIME", config=_reject("wire.8bit_header"))

    c["hdr.field_name"] = Case(
        build(extra=b"X-Mailer-Info: fine\r\n"), build(extra=b"NoColonHere\r\n"),
        "550 5.6.0 P-HDR Invalid header: header line 6 has no colon: 'NoColonHere' [hdr.field_name]")

    c["hdr.folding"] = Case(
        build(replace={b"Subject": b"Quarterly\r\n report\r\n\tfor Q3"}),
        build(replace={b"Subject": b"Quarterly\r\n \r\n report"}),
        "550 5.6.0 P-HDR Invalid header: folded line 4 of Subject holds only white space [hdr.folding]")

    bad = build(replace={b"Subject": "café ".encode() + b"\xff"})
    off = bad.index(b"\xff")
    c["hdr.utf8"] = Case(
        build(replace={b"Subject": "café".encode()}), bad,
        f"550 5.6.0 P-HDR Invalid header: header bytes are not UTF-8 at offset {off} [hdr.utf8]",
        good_params=" SMTPUTF8 BODY=8BITMIME", bad_params=" SMTPUTF8 BODY=8BITMIME")

    c["hdr.required"] = Case(
        build(), build(replace={b"From": None}),
        "550 5.6.0 P-HDR Invalid header: missing From header [hdr.required]")

    c["hdr.date_missing"] = Case(
        build(), build(replace={b"Date": None}),
        "550 5.6.0 P-HDR Date header required: no Date header [hdr.date_missing]",
        config={"headers": {"date": "refuse"}})

    c["hdr.duplicate"] = Case(
        build(extra=b"Keywords: report\r\nKeywords: finance\r\nComments: one\r\nComments: two\r\n"),
        build(extra=b"Subject: Second subject\r\n"),
        "550 5.6.0 P-HDR Invalid header: duplicate Subject header [hdr.duplicate]")

    two = b"Alice <alice@example.com>, Carol <carol@example.com>"
    c["hdr.from_sender"] = Case(
        build(replace={b"From": two}, extra=b"Sender: Alice <alice@example.com>\r\n"),
        build(replace={b"From": two}),
        "550 5.6.0 P-HDR Invalid header: From holds 2 mailboxes and there is no Sender [hdr.from_sender]")

    c["hdr.address"] = Case(
        build(replace={b"To": b'"Bob, the Builder" <bob@example.org>, team: carol@example.org, '
                              b'dave@example.org;, (comment) erin@example.org'}),
        build(replace={b"To": b"Bob <bob@example.org"}),
        "550 5.6.0 P-HDR Invalid header: To header does not parse: expected '>', found 'end' [hdr.address]")

    c["hdr.date"] = Case(
        build(replace={b"Date": email.utils.formatdate(time.time(), usegmt=True).encode()}),
        build(replace={b"Date": b"31 Feb 2026 10:00:00 +0000"}),
        "550 5.6.0 P-HDR Invalid header: Date '31 Feb 2026 10:00:00 +0000': impossible date "
        "(day is out of range for month) [hdr.date]")

    # 6 days old: a customer's MTA retried it from its queue (Postfix keeps 5 days)
    c["hdr.date_window"] = Case(
        build(replace={b"Date": now_date(-6 * 86400)}), build(replace={b"Date": now_date(-8 * 86400)}),
        "550 5.6.0 P-HDR Date header outside the allowed window: Date is 8.0 days in the past "
        "(limit 7.0 days) [hdr.date_window]")

    c["hdr.message_id"] = Case(
        build(replace={b"Message-ID": b'<"odd but valid"@example.com>'}),
        build(replace={b"Message-ID": b"not-an-id"}),
        "550 5.6.0 P-HDR Invalid header: Message-ID 'not-an-id' is not <left@right> [hdr.message_id]")

    c["hdr.message_id_missing"] = Case(
        build(), build(replace={b"Message-ID": None}),
        "550 5.6.0 P-HDR Message-ID header required: no Message-ID header [hdr.message_id_missing]",
        config={"headers": {"message_id": "refuse"}})

    mixed = (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n")
    parts = (b"--b1\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nSee attachment.\r\n"
             b"--b1\r\nContent-Type: text/csv; name=\"q3.csv\"\r\nContent-Transfer-Encoding: base64\r\n"
             b"Content-Disposition: attachment; filename=\"q3.csv\"\r\n\r\n"
             + base64.encodebytes(b"quarter,revenue\r\nQ3,42\r\n").replace(b"\n", b"\r\n"))
    c["hdr.mime"] = Case(
        build(extra=mixed, body=parts + b"--b1--\r\n"),
        build(extra=b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed\r\n", body=parts + b"--b1--\r\n"),
        "550 5.6.3 P-STD Invalid MIME structure: multipart/mixed in message has no boundary parameter [hdr.mime]")

    c["hdr.mime_close"] = Case(
        build(extra=mixed, body=parts + b"--b1--\r\n"), build(extra=mixed, body=parts),
        "550 5.6.3 P-STD Invalid MIME structure: multipart/mixed in message: closing boundary 'b1' not found "
        "[hdr.mime_close]", config=_reject("hdr.mime_close"))

    c["hdr.encoded_word"] = Case(
        build(replace={b"Subject": b"=?utf-8?q?Gr=C3=BC=C3=9Fe?= =?iso-8859-1?b?YXVzIEv2bG4=?="}),
        build(replace={b"Subject": b"=?utf-8?B?!!!?="}),
        "550 5.6.0 P-HDR Invalid header: Subject: bad base64 in encoded-word '=?utf-8?B?!!!?=' [hdr.encoded_word]")

    c["trace.forged_received"] = Case(
        build(extra=b"Received: from laptop.example.com ([192.0.2.7]) by mail.example.com with ESMTPSA id 1;\r\n"
                    b"\t" + now_date(-60) + b"\r\n"),
        build(extra=b"Received: from laptop.example.com ([192.0.2.7]) by gw.test with ESMTPSA id 1;\r\n"
                    b"\t" + now_date(-60) + b"\r\n"),
        "550 5.7.1 P-PATH Forged trace header: Received header claims by gw.test, a host of this gateway "
        "[trace.forged_received]")

    c["trace.forged_header"] = Case(
        build(extra=b"X-Trace-Note: from the CRM\r\n"), build(extra=b"X-Gateway-Trace: 1234abcd\r\n"),
        "550 5.7.1 P-PATH Forged trace header: client supplied the gateway's own X-Gateway-Trace header "
        "[trace.forged_header]")

    c["subj.fake_reply"] = Case(
        build(replace={b"Subject": b"Re: Quarterly report"}, extra=b"In-Reply-To: <q3@example.org>\r\n"),
        build(replace={b"Subject": b"Re: Quarterly report"}),
        "550 5.7.1 P-SUBJ Misleading subject: reply marker without a thread: message Subject starts with 'Re:' "
        "but has no In-Reply-To, References or Thread-Index and quotes no earlier message [subj.fake_reply]",
        config=_reject("subj.fake_reply"))

    c["subj.fake_reply_bulk"] = Case(
        build(replace={b"Subject": b"RE: your order"},
              extra=b"Precedence: bulk\r\nReferences: <order-7@example.com>\r\n"),
        build(replace={b"Subject": b"RE: your order"}, extra=b"Precedence: bulk\r\n"),
        "550 5.7.1 P-SUBJ Misleading subject: reply marker without a thread: list/bulk mail Subject starts with "
        "'RE:' but has no In-Reply-To, References or Thread-Index and quotes no earlier message "
        "[subj.fake_reply_bulk]", config=NO_LISTMAIL)

    c["subj.display_name"] = Case(
        build(replace={b"From": b'"Alice at Example.com" <alice@example.com>'}),
        build(replace={b"From": b'"support@example.net" <alice@example.com>'}),
        "550 5.7.1 P-FORGE Misleading From display name: From display name shows an address in example.net but "
        "the address is in example.com [subj.display_name]")

    c["subj.display_domain"] = Case(
        build(replace={b"From": b'"Example.com News" <alice@example.com>'}),
        build(replace={b"From": b'"CNET News.com Daily Dispatch" <alice@example.com>'}),
        "550 5.7.1 P-FORGE Misleading From display name: From display name shows the domain name news.com but "
        "the address is in example.com [subj.display_domain]", config=_reject("subj.display_domain"))

    c["subj.brand"] = Case(
        build(replace={b"From": b'"Alice Paypalooza" <alice@example.com>'}),
        build(replace={b"From": b'"PayPal Service" <alice@example.com>'}),
        "550 5.7.1 P-FORGE Misleading From display name: From display name names PayPal (would impersonate "
        "paypal.com) but the address is in example.com [subj.brand]",
        config=_reject("subj.brand", brand_domains={"PayPal": "paypal.com"}))

    c["subj.reply_to_domain"] = Case(
        build(extra=b"Precedence: bulk\r\nReply-To: Sales <sales@example.com>\r\n"),
        build(extra=b"Precedence: bulk\r\nReply-To: Sales <sales@example.net>\r\n"),
        "550 5.7.1 P-SUBJ Reply-To in another domain than From: list/bulk mail with Reply-To in example.net, "
        "From in example.com [subj.reply_to_domain]", config={**_reject("subj.reply_to_domain"), **NO_LISTMAIL})

    c["subj.obfuscated"] = Case(
        build(replace={b"Subject": b"=?utf-8?b?" + base64.b64encode("Rechnung März".encode()) + b"?="}),
        build(replace={b"Subject": b"=?utf-8?b?" + base64.b64encode("Invoice \u202efdp.exe".encode()) + b"?="}),
        "550 5.7.1 P-SUBJ Obfuscated subject: Subject decodes to control or bidi character U+202E "
        "[subj.obfuscated]")
    return c


CASES = cases()


def test_every_rule_has_a_case():
    assert set(CASES) == set(RULES)


@pytest.mark.parametrize("rule", list(CASES))
async def test_rule_good_relayed_unchanged_bad_refused(sink, gateway_factory, rule):
    case = cases()[rule]  # fresh Dates and Message-IDs
    h = await gateway_factory(sink, **case.config)
    await h.add_account()
    r = await send(h.port(), case.bad, params=case.bad_params)
    assert r.decode("utf-8", "replace") == case.reply
    r = await send(h.port(), case.good, params=case.good_params)
    await sink.wait_for(1)
    assert len(sink.messages) == 1
    assert_relayed_unchanged(r, sink.messages[0].data, case.good)
    # the transaction log names the finding, with the action that refused
    refused = [rec for rec in h.log_records() if rec.get("decision") == "refused"]
    assert len(refused) == 1
    assert {"id": rule, "action": "reject"}.items() <= refused[0]["findings"][-1].items()


async def test_missing_message_id_is_added_in_front_by_default(sink, gateway_factory):
    h = await gateway_factory(sink)
    await h.add_account()
    sent = build(replace={b"Message-ID": None})
    r = await send(h.port(), sent)
    await sink.wait_for(1)
    assert_relayed_unchanged(r, sink.messages[0].data, sent,
                             added=rb"Message-ID: <\d{14}\.[0-9a-f]{16}\.[A-Za-z0-9_-]+@gw\.test>\r\n")


async def test_missing_date_and_message_id_added_below_the_trace_for_an_account(sink, gateway_factory):
    """RFC 6409 8: the submission server adds what the script left out; both
    headers go directly below the gateway's trace headers, the message's own
    bytes follow unchanged, and the log line names them with their values."""
    t = float(int(time.time()))  # the gateway's clock, injected (it stands still)
    h = await gateway_factory(sink, clock=lambda: t)
    await h.add_account()
    sent = build(replace={b"Date": None, b"Message-ID": None})
    r = await send(h.port(), sent)
    await sink.wait_for(1)
    date = email.utils.formatdate(t)[:-5] + "+0000"
    assert_relayed_unchanged(
        r, sink.messages[0].data, sent,
        added=re.escape(f"Date: {date}\r\n".encode())
        + rb"Message-ID: <" + time.strftime("%Y%m%d%H%M%S", time.gmtime(t)).encode()
        + rb"\.[0-9a-f]{16}\.[A-Za-z0-9_-]+@gw\.test>\r\n")
    # the Received of the trace carries the same clock
    assert f"; {email.utils.formatdate(t)}\r\nX-Gateway-Trace: ".encode() in sink.messages[0].data
    rec, = [x for x in h.log_records() if x.get("event") == "transaction"]
    assert rec["decision"] == "relayed"
    mid = re.search(rb"\r\nMessage-ID: (<[^>]+>)\r\n", sink.messages[0].data)[1].decode()
    assert rec["headers_added"] == [{"name": "Date", "value": date}, {"name": "Message-ID", "value": mid}]
    assert [(f["id"], f["action"]) for f in rec["findings"]] == [("hdr.date_missing", "add"),
                                                                  ("hdr.message_id_missing", "add")]


async def test_missing_date_added_for_a_client_network_account(sink, gateway_factory):
    """A client network is an account too (no AUTH): its mail is submission."""
    h = await gateway_factory(sink)
    await h.add_account("webhost", domains=("example.com",), networks=("127.0.0.0/8",))
    sent = build(replace={b"Date": None})
    r = await send(h.port(), sent, mail_from="alice@example.com", rcpt="bob@example.org", auth=False)
    assert _RELAYED.match(r), r
    await sink.wait_for(1)
    got = sink.messages[0].data
    m = re.match(rb"Received: from client\.test \(\[127\.0\.0\.1\]\)\r\n\t\(client network of account webhost\)\r\n"
                 rb"\tby gw\.test with ESMTP id (?P<id>[A-Za-z0-9_-]+)\r\n\tfor <bob@example\.org>; [^\r\n]+\r\n"
                 rb"X-Gateway-Trace: (?P=id)\r\nDate: (?P<date>[^\r\n]+ \+0000)\r\n", got)
    assert m, got[:400]
    assert got[m.end():] == sent
    rec, = [x for x in h.log_records() if x.get("event") == "transaction"]
    assert rec["auth"] == "client-network"
    assert rec["headers_added"] == [{"name": "Date", "value": m["date"].decode()}]


async def test_complete_message_gets_nothing_added_and_logs_none(sink, gateway_factory):
    h = await gateway_factory(sink)
    await h.add_account()
    sent = build()
    r = await send(h.port(), sent)
    await sink.wait_for(1)
    assert_relayed_unchanged(r, sink.messages[0].data, sent)
    rec, = [x for x in h.log_records() if x.get("event") == "transaction"]
    assert rec["decision"] == "relayed" and "headers_added" not in rec


async def test_without_an_account_nothing_is_added_and_a_missing_date_refused(sink, gateway_factory, tmp_path):
    """A session without an account reaches the service mailboxes only. The gateway
    is no submission server for it, so it adds nothing (as Postfix adds headers only
    for local_header_rewrite_clients): no Date is refused (RFC 5322 3.6 requires
    one), no Message-ID (RFC 5322: SHOULD) is recorded as a flag and stored as sent."""
    from gateway.relay.maildir import MaildirWriter

    box = tmp_path / "svc"
    h = await gateway_factory(sink, smtp={"service_mailboxes": ["postmaster@gw.test"], "service_maildir": str(box)})
    r = await send(h.port(), build(replace={b"Date": None}), mail_from="someone@example.net", rcpt="postmaster@gw.test", auth=False)
    assert r.decode() == "550 5.6.0 P-HDR Date header required: no Date header [hdr.date_missing]"
    sent = build(replace={b"Message-ID": None})
    r = await send(h.port(), sent, mail_from="someone@example.net", rcpt="postmaster@gw.test", auth=False)
    assert r.startswith(b"250 "), r
    stored = MaildirWriter(box)
    data, = [stored.get_bytes(k) for k in stored.keys()]
    trace = re.match(rb"Received: from client\.test \(\[127\.0\.0\.1\]\)\r\n"
                     rb"\tby gw\.test with ESMTP id (?P<id>[A-Za-z0-9_-]+)\r\n\tfor <postmaster@gw\.test>; [^\r\n]+\r\n"
                     rb"X-Gateway-Trace: (?P=id)\r\n", data)
    assert trace, data[:300]
    assert data[trace.end():] == sent
    refused, stored_rec = [x for x in h.log_records() if x.get("event") == "transaction"]
    assert refused["decision"] == "refused" and "headers_added" not in refused
    assert stored_rec["decision"] == "local" and "headers_added" not in stored_rec
    assert [(f["id"], f["action"]) for f in stored_rec["findings"]] == [("hdr.message_id_missing", "flag")]
    assert sink.messages == []


# ------------------------------------------------------------------ real-world shaped good mail
def _b64(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


def real_world() -> dict[str, tuple[bytes, str, str]]:
    """name -> (message, MAIL FROM, MAIL parameters)."""
    out: dict[str, tuple[bytes, str, str]] = {}

    html = (b"<!DOCTYPE html>\r\n<html><body><p>Hello Bob,</p>\r\n"
            b"<p>the <b>Q3 figures</b> are =E2=82=AC&nbsp;42k.</p></body></html>\r\n")
    out["multipart/alternative"] = (build(
        replace={b"Subject": b"Q3 figures"},
        extra=b"MIME-Version: 1.0\r\n"
              b"Content-Type: multipart/alternative;\r\n boundary=\"----=_Part_1234_5678.1700000000000\"\r\n"
              b"X-Mailer: Microsoft Outlook 16.0\r\n",
        body=b"------=_Part_1234_5678.1700000000000\r\n"
             b"Content-Type: text/plain; charset=UTF-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
             b"Hello Bob,\r\n\r\nthe Q3 figures are =E2=82=AC 42k. A long line that is soft-wrapped by quoted-=\r\n"
             b"printable encoding.\r\n\r\n"
             b"------=_Part_1234_5678.1700000000000\r\n"
             b"Content-Type: text/html; charset=UTF-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
             + html + b"\r\n------=_Part_1234_5678.1700000000000--\r\n"), "alice@example.com", "")

    pdf = b"%PDF-1.4\n" + bytes(range(256)) * 40 + b"\n%%EOF\n"
    out["attachments"] = (build(
        replace={b"Subject": b"Invoice 2024-117 and photo"},
        extra=b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"outer\"\r\n",
        body=b"This is a multi-part message in MIME format.\r\n"
             b"--outer\r\nContent-Type: multipart/alternative; boundary=\"inner\"\r\n\r\n"
             b"--inner\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nInvoice attached.\r\n"
             b"--inner\r\nContent-Type: text/html; charset=us-ascii\r\n\r\n<p>Invoice attached.</p>\r\n"
             b"--inner--\r\n\r\n"
             b"--outer\r\nContent-Type: application/pdf; name=\"invoice-2024-117.pdf\"\r\n"
             b"Content-Transfer-Encoding: base64\r\n"
             b"Content-Disposition: attachment;\r\n filename*=UTF-8''Rechnung%20M%C3%A4rz.pdf\r\n\r\n"
             + _b64(pdf) +
             b"--outer\r\nContent-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n"
             b"Content-Disposition: inline; filename=\"dot.png\"\r\nContent-ID: <dot@example.com>\r\n\r\n"
             + _b64(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64) +
             b"--outer--\r\n"), "alice@example.com", "")

    refs = b"\r\n ".join(b"<thread-%d.%d@mail.example.org>" % (i, 10_000_000 + i) for i in range(40))
    recipients = b",\r\n\t".join(b'"Team Member %d" <member%d@example.org>' % (i, i) for i in range(30))
    out["long folded headers"] = (build(
        replace={b"Subject": b"Re: =?utf-8?q?Planung_f=C3=BCr_das_n=C3=A4chste_Quartal_und_die_Verteilung?=\r\n"
                             b" =?utf-8?q?_der_Aufgaben_im_Team_=E2=80=93_bitte_bis_Freitag_r=C3=BCckmelden?=",
                 b"To": recipients},
        extra=b"In-Reply-To: <thread-39.10000039@mail.example.org>\r\nReferences: " + refs + b"\r\n"
              b"Thread-Topic: Planung\r\nThread-Index: AQHZ" + b"A" * 60 + b"==\r\n"
              b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.com; s=sel1;\r\n"
              b"\th=from:to:subject:date:message-id; bh=" + b"x" * 43 + b"=;\r\n"
              b"\tb=" + b"\r\n\t ".join([b"Y" * 70] * 5) + b"\r\n"),
        "alice@example.com", "")

    out["UTF-8 with SMTPUTF8"] = (build(
        replace={b"From": "Jörg Müller <jörg@bücher.example>".encode(),
                 b"To": "Zoë <zoë@example.org>".encode(),
                 b"Subject": "Grüße aus Köln – 東京 🚀".encode(),
                 b"Message-ID": b"<utf8-%d@xn--bcher-kva.example>" % time.time_ns()},
        extra=b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=UTF-8\r\n"
              b"Content-Transfer-Encoding: 8bit\r\n",
        body="Hallo Zoë,\r\n\r\nviele Grüße aus Köln, und 東京 ist schön.\r\n".encode()),
        "jörg@bücher.example", " SMTPUTF8 BODY=8BITMIME")

    out["mailing-list headers"] = (build(
        replace={b"From": b"Example News <news@example.com>", b"Subject": b"Example News, issue 12"},
        extra=b"List-Id: Example News <news.example.com>\r\n"
              b"List-Unsubscribe: <mailto:unsubscribe@example.com?subject=unsubscribe>,\r\n"
              b" <https://example.com/unsubscribe?u=abc123&l=news>\r\n"
              b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
              b"List-Archive: <https://example.com/news/archive>\r\n"
              b"List-Help: <mailto:news-help@example.com>\r\n"
              b"Precedence: list\r\nReply-To: Example Editors <editors@example.com>\r\n"
              b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii; format=flowed\r\n",
        body=b"Issue 12 of Example News.\r\n\r\n.. and a line that starts with a dot.\r\n.\r\n"
             b"-- \r\nUnsubscribe: https://example.com/unsubscribe?u=abc123&l=news\r\n"),
        "bounces+news=example.org@example.com", "")

    # Sun/iPlanet Messaging Server and Oracle mailers: parentheses inside the quoted boundary
    sun = b"Boundary_(ID_xjiotMI3LbV/zJ0Zs39NiA)"
    out["Sun/iPlanet boundary"] = (build(
        extra=b"MIME-version: 1.0\r\nX-Mailer: iPlanet Messenger Express 5.2 HotFix 2.14 (built Aug  8 2006)\r\n"
              b"Content-type: multipart/mixed; boundary=\"" + sun + b"\"\r\n",
        body=b"This is a multi-part message in MIME format.\r\n\r\n"
             b"--" + sun + b"\r\nContent-type: text/plain; charset=us-ascii\r\nContent-transfer-encoding: 7BIT\r\n\r\n"
             b"The minutes are attached.\r\n\r\n"
             b"--" + sun + b"\r\nContent-type: text/plain; name=minutes.txt\r\n"
             b"Content-disposition: attachment; filename=minutes.txt\r\n\r\n1. (Budget) approved\r\n\r\n"
             b"--" + sun + b"--\r\n"), "alice@example.com", "")

    # RFC 2231 continuations, the second section %-encoded
    out["RFC 2231 boundary"] = (build(
        extra=b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed;\r\n boundary*0=\"=_7f3a91c2e4\";\r\n"
              b" boundary*1*=%2Epart%2D1\r\n",
        body=b"--=_7f3a91c2e4.part-1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nSee the file.\r\n"
             b"--=_7f3a91c2e4.part-1\r\nContent-Type: text/plain;\r\n name*=utf-8''Notizen%20M%C3%A4rz.txt\r\n"
             b"Content-Disposition: attachment;\r\n filename*0*=utf-8''Notizen%20M%C3;\r\n filename*1*=%A4rz.txt\r\n\r\n"
             b"Notes.\r\n--=_7f3a91c2e4.part-1--\r\n"), "alice@example.com", "")

    inner = build(replace={b"From": b"Carol <carol@example.org>", b"To": b"Alice <alice@example.com>",
                           b"Subject": b"Original question"})
    out["forward (message/rfc822)"] = (build(
        replace={b"Subject": b"Fwd: Original question"},
        extra=b"References: <orig-1@example.org>\r\nMIME-Version: 1.0\r\n"
              b"Content-Type: multipart/mixed; boundary=\"fwd\"\r\n",
        body=b"--fwd\r\nContent-Type: text/plain\r\n\r\nSee below.\r\n"
             b"--fwd\r\nContent-Type: message/rfc822\r\nContent-Disposition: inline\r\n\r\n" + inner +
             b"--fwd--\r\n"), "alice@example.com", "")
    return out


REAL = list(real_world())


@pytest.mark.parametrize("name", REAL)
async def test_real_world_mail_relayed_byte_for_byte(sink, gateway_factory, name):
    data, mail_from, params = real_world()[name]
    h = await gateway_factory(sink, **(NO_LISTMAIL if name == "mailing-list headers" else {}))
    await h.add_account(domains=("example.com", "xn--bcher-kva.example"))
    r = await send(h.port(), data, mail_from=mail_from, params=params)
    await sink.wait_for(1)
    got = sink.messages[0]
    assert_relayed_unchanged(r, got.data, data)
    assert got.rcpt_tos == ["bob@example.org"]
    if "SMTPUTF8" in params:
        assert "SMTPUTF8" in got.mail_options
