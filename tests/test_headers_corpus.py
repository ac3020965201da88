"""The message checks over real-world mail (SpamAssassin, mail-parser, Haraka vectors).

Rule shown here: no good message is refused for syntax it does not break.
Each ham message the default settings refuse is listed in HAM_REFUSED with
the RFC clause it really breaks; any other refusal of ham fails the test.
Old corpus mail is checked with the clock injected (``services.clock`` is
set just after the message's own Date), so the Date window stays active.
Ham is sent as authenticated submission (the gateway's normal case: a
missing Date or Message-ID is added) and again from a session without an
account (service mailboxes only: nothing is added, a missing Date refused).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.ham_refusals import ACCOUNT, run_all, to_wire
from gateway.message import rules as H
from gateway.message.findings import RULES
from gateway.message.parse import parse_date, parse_headers
from gateway.message.settings import HeaderSettings
from gateway.core.transaction import Result, SessionInfo, Transaction

import checkkit

from conftest import CI, CORPORA
SA = CORPORA / "spamassassin-t-data"
MP = CORPORA / "spamscope-mail-parser-mails"
HARAKA = CORPORA / "haraka-plugin-headers-vectors" / "header_check_vectors.json"

pytestmark = pytest.mark.skipif(not SA.exists() and not CI, reason="shared corpora not mounted")

# ham file -> refusing finding ids under default settings (authenticated submission), and why that is right.
# (nice/003 and nice/006 have no Date: refused until the gateway added one for an account, RFC 6409 8.)
HAM_REFUSED = {
    "nice/cjk/big5-base64.1": ({"hdr.utf8", "hdr.duplicate"}, "raw Big5 bytes in Subject/List-Id (not UTF-8, RFC 6532) and two Date headers"),
    "nice/cjk/gb2312.1": ({"hdr.utf8"}, "raw GB2312 bytes in a header (not UTF-8)"),
    "nice/dkim/AddedVtag_07": ({"hdr.address"}, "To holds s..palmer@enron.com (two dots in a row)"),
    "nice/dkim/BasicTest_01": ({"hdr.address"}, "s..palmer@enron.com"),
    "nice/dkim/MultipleAuthRes_10": ({"hdr.address"}, "s..palmer@enron.com"),
    "nice/dkim/MultipleReceived_08": ({"hdr.address"}, "s..palmer@enron.com"),
    "nice/dkim/MultipleSig_06": ({"hdr.address"}, "s..palmer@enron.com"),
    "nice/dkim/NonExistingHeader_09": ({"hdr.address"}, "s..palmer@enron.com"),
    "nice/dkim/Nowsp_03": ({"hdr.address"}, "s..palmer@enron.com"),
    "nice/dkim/Simple_02": ({"hdr.address"}, "s..palmer@enron.com"),
    "nice/mime8": ({"hdr.mime"}, "part Content-Type 'BINARY' has no subtype (RFC 2045 5.1)"),
    "nice/unicode2": ({"hdr.address", "hdr.date"}, "From/To without any address; Date without a zone"),
    "dkim/test-fail-04.msg": ({"hdr.duplicate"}, "two From headers (the DKIM test's point)"),
    "dkim/test-pass-08.msg": ({"hdr.duplicate"}, "To, Subject and Message-ID twice"),
}
# ... and from a session without an account, which gets no header added.
NO_DATE = {"nice/003", "nice/006"}
HAM_REFUSED_WITHOUT_ACCOUNT = {**HAM_REFUSED,
                               **{k: ({"hdr.date_missing"}, "no Date header (RFC 5322 3.6: Date is required)")
                                  for k in NO_DATE}}


def load(path: Path) -> bytes:
    """As an SMTP client would send the file: no mbox line, CRLF line endings."""
    return to_wire(path.read_bytes())


def files(sub: str) -> list:
    root = SA / "t" / "data"
    return [pytest.param(p, id=str(p.relative_to(root))) for p in sorted((root / sub).rglob("*")) if p.is_file()]


@pytest.mark.parametrize("account", [ACCOUNT, None], ids=["account", "no-account"])
@pytest.mark.parametrize("path", files("nice") + [p for p in files("dkim") if "test-pass" in p.id or "test-fail" in p.id])
async def test_ham_not_refused_for_syntax_it_does_not_break(path, account):
    key = str(path.relative_to(SA / "t" / "data"))
    tx, outcomes, refused = await run_all(load(path), account=account)
    expected = (HAM_REFUSED if account is not None else HAM_REFUSED_WITHOUT_ACCOUNT).get(key, (set(), ""))[0]
    assert refused == expected, [f for f in tx.findings if f["action"] == "reject"]
    for o in outcomes:
        assert o.result is not Result.ERROR
    added = [name for name, _ in tx.add_headers]
    assert ("Date" in added) is (key in NO_DATE and account is not None)


@pytest.mark.parametrize("path", files("spam"))
async def test_spam_never_crashes(path):
    tx, outcomes, refused = await run_all(load(path))
    assert all(o.result in (Result.PASS, Result.FLAG, Result.FAIL, Result.SKIP) for o in outcomes)
    for f in (tx.findings or []):
        assert f["id"] in RULES


async def test_spam_corpus_catches_known_defects():
    cases = {
        "spam/badctype1": "hdr.mime", "spam/badmime2.txt": "hdr.mime", "spam/badmime3.txt": "hdr.mime",
        "spam/002": "hdr.date", "spam/008": "hdr.duplicate", "spam/fromnamespoof/spoof1": "subj.display_name",
        "spam/013": "subj.display_name", "spam/015": "hdr.folding", "spam/bsmtp": "hdr.field_name",
    }
    for name, fid in cases.items():
        tx, _, _ = await run_all(load(SA / "t" / "data" / name))
        assert fid in {f["id"] for f in tx.findings}, name


async def test_raw_file_line_endings_are_bare_lf():
    # the corpus files themselves use LF: sent unconverted they are smuggling-shaped
    raw = (SA / "t" / "data" / "nice" / "001").read_bytes()
    _, outcomes, refused = await run_all(raw)
    assert "wire.bare_lf" in refused and outcomes[0].result is Result.FAIL


# --- mail-parser's malformed / phishing mails ------------------------------------------------


async def test_mail_parser_expectations():
    async def found(name: str, **kw) -> set[str]:
        tx, _, _ = await run_all(load(MP / name), **kw)
        return {f["id"] for f in tx.findings}

    # StartBoundaryNotFoundDefect + MultipartInvariantViolationDefect upstream
    assert "hdr.mime" in await found("mail_malformed_3.eml")
    # CloseBoundaryNotFoundDefect upstream: recorded as a flag
    f17 = await found("mail_test_17.eml")
    assert "hdr.mime_close" in f17 and "hdr.mime" not in f17
    # InvalidHeaderDefect / ObsoleteHeaderDefect upstream: "alice@example.com <bob@example.com>"
    assert "hdr.address" in await found("mail_test_19.eml")
    # raw 8-bit header: undeclared it is refused, with 8BITMIME only it is flagged (needs SMTPUTF8)
    assert "wire.8bit" in await found("mail_test_12.eml", params={})
    assert "wire.8bit_header" in await found("mail_test_12.eml", params={"BODY": "8BITMIME"})
    # Python reports StartBoundaryNotFound here only because it parses the text/rfc822-headers
    # part (headers of the bounced message, no body) as a message: the structure is fine
    assert not {"hdr.mime", "hdr.mime_close"} & await found("mail_malformed_2.eml")
    # GB2312-labelled GBK encoded-words decode, as in every reader
    assert "hdr.encoded_word" not in await found("mail_test_9.eml")


@pytest.mark.parametrize("path", [pytest.param(p, id=p.name) for p in sorted(MP.glob("*.eml"))] if MP.exists() else [])
async def test_mail_parser_never_crashes(path):
    _, outcomes, _ = await run_all(load(path))
    assert all(o.result is not Result.ERROR for o in outcomes)


# --- Haraka and SpamAssassin vectors ---------------------------------------------------------


@pytest.mark.skipif(not HARAKA.exists() and not CI, reason="corpora not mounted")
def test_haraka_required_and_singular_lists_match():
    ini = json.loads(HARAKA.read_text())["config_defaults_from_headers_ini"]
    assert {h.lower() for h in ini["required"]} == set(H.REQUIRED)
    assert {h.lower() for h in ini["singular"]} == set(H.SINGULAR)


def test_spamassassin_date_vectors():
    vectors = json.loads((SA / "date_vectors.json").read_text())
    assert len(vectors) == 14
    for v in vectors:
        if v["label"] == "valid":
            assert parse_date(v["date"]).timestamp() == v["epoch"], v
        else:
            with pytest.raises(ValueError):
                parse_date(v["date"])
            data = f"From: a@example.com\r\nDate: {v['date']}\r\nMessage-ID: <a@b>\r\n\r\nx\r\n".encode()
            ids = [f.id for f in H.check_structure(data, parse_headers(data), HeaderSettings(), None)]
            assert ids == ["hdr.date"]


async def test_date_window_refuses_old_corpus_mail_with_real_clock():
    data = load(SA / "t" / "data" / "nice" / "001")
    tx = Transaction(SessionInfo("s", "submission", "192.0.2.1", 1))
    tx.message = data
    check = checkkit.build("data_headers", checkkit.services(clock=lambda: 1_800_000_000.0))
    out = await check.run(tx)
    assert out.result is Result.FAIL and "[hdr.date_window]" in out.detail
    off = HeaderSettings(actions={"hdr.date_window": "off"})
    check = checkkit.build("data_headers", checkkit.services(headers=off, clock=lambda: 1_800_000_000.0))
    tx.findings, tx.add_headers, tx.parsed_headers = None, [], None
    assert (await check.run(tx)).result is not Result.FAIL


# Ham whose Date lies before its first hop's Received by more than the default 7 days:
# the DKIM test copies were re-sent four years later, the 1991 MIME samples collected months later.
FIRST_HOP_LATE = {"nice/dkim/AddedVtag_07", "nice/dkim/MultipleReceived_08", "nice/dkim/NonExistingHeader_09",
                  "nice/mime3", "nice/mime4", "nice/mime5"}
# ... and by 2 to 7 days: queued or resent mail, refused by the old 2-day window.
FIRST_HOP_DAYS = {"nice/dmarc/noneok.eml", "nice/dmarc/quarok.eml", "nice/dmarc/rejectok.eml",
                  "nice/dmarc/strictrejectok.eml", "nice/unicode1"}


def _first_hop(data: bytes) -> float | None:
    """The time the first MTA (the bottom Received) took the message."""
    for value in reversed(parse_headers(data).get_all("received")):
        try:
            return parse_date(value.rsplit(";", 1)[1]).timestamp()
        except (IndexError, ValueError):
            continue
    return None


async def test_date_window_at_the_first_hop_of_real_ham():
    """The clock set to when the first MTA received each ham message (as the
    gateway would see it): the 7-day window passes mail that waited days."""
    late, days, seen = set(), set(), 0
    for p in sorted((SA / "t" / "data" / "nice").rglob("*")):
        data = load(p) if p.is_file() else b""
        hop = _first_hop(data) if data else None
        if hop is None or not parse_headers(data).get("date"):
            continue
        seen += 1
        key = str(p.relative_to(SA / "t" / "data"))
        for settings, into in ((HeaderSettings(), late), (HeaderSettings(date_past_seconds=2 * 86400), days)):
            tx = Transaction(SessionInfo("s", "submission", "192.0.2.1", 1, account=ACCOUNT))
            tx.message = data
            svc = checkkit.services(headers=settings, clock=lambda hop=hop: hop)
            await checkkit.build("data_headers", svc).run(tx)
            if any(f["id"] == "hdr.date_window" for f in (tx.findings or [])):
                into.add(key)
    assert seen == 48
    assert late == FIRST_HOP_LATE
    assert days - late == FIRST_HOP_DAYS
