"""Wire hygiene of the raw DATA bytes (issue 5.1)."""
from __future__ import annotations

import time

import pytest

from gateway.checks import data_wire
from gateway.message.settings import HeaderSettings
from gateway.message.wire import check_wire, header_end
from gateway.core.transaction import Result, SessionInfo, Transaction
from gateway.services import Services

import checkkit

GOOD = (b"From: a@example.com\r\nTo: b@example.org\r\nDate: Mon, 31 Oct 2005 18:44:29 -0800\r\n"
        b"Subject: hi\r\n\r\nbody line\r\n.. dot-stuffed line came back unstuffed\r\n")


def ids(data: bytes, body_8bit: bool = False, smtputf8: bool = False) -> list[str]:
    return [f.id for f in check_wire(data, body_8bit=body_8bit, smtputf8=smtputf8)]


def make_tx(message: bytes, **params) -> Transaction:
    tx = Transaction(SessionInfo("s1", "submission", "192.0.2.1", 40000))
    tx.mail_params = dict(params)
    tx.message = message
    return tx


def services(settings: HeaderSettings | None = None) -> Services:
    return checkkit.services(headers=settings or HeaderSettings(), clock=time.time)


def test_clean_message_has_no_findings():
    assert ids(GOOD) == []


@pytest.mark.parametrize("payload,expected", [
    # the CVE-2023-51764 family: end-of-data variants a lax receiver would honour
    (b"x\r\n\n.\n\r\nMAIL FROM:<evil@example.com>\r\n", ["wire.bare_lf"]),
    (b"x\r\n.\n", ["wire.bare_lf"]),
    (b"x\n.\r\n", ["wire.bare_lf"]),
    (b"x\r\n\r.\r\r\n", ["wire.bare_cr"]),
    (b"x\r.\r\n", ["wire.bare_cr"]),
    (b"x\r\n.\r", ["wire.bare_cr"]),
    (b"x\n\r.\r\n", ["wire.bare_lf", "wire.bare_cr"]),
    (b"x\x00y\r\n", ["wire.nul"]),
])
def test_smuggling_and_nul(payload, expected):
    assert ids(GOOD + payload) == expected


def test_bare_lf_location_is_reported():
    f = check_wire(b"a\r\nb\nc\r\n", body_8bit=False, smtputf8=False)[0]
    assert f.id == "wire.bare_lf" and "line 2" in f.detail


def test_line_length_boundary():
    assert ids(GOOD + b"x" * 998 + b"\r\n") == []
    found = check_wire(GOOD + b"x" * 999 + b"\r\n", body_8bit=False, smtputf8=False)
    assert [f.id for f in found] == ["wire.line_length"]
    assert "999 octets" in found[0].detail
    assert ids(b"x" * 1200) == ["wire.line_length"]  # last line without CRLF
    assert ids(b"Subject: " + b"y" * 1000 + b"\r\n\r\n") == ["wire.line_length"]


def test_8bit_needs_declaration():
    body8 = GOOD + "caf\u00e9\r\n".encode()
    assert ids(body8) == ["wire.8bit"]
    assert ids(body8, body_8bit=True) == []
    assert ids(body8, smtputf8=True) == []
    head8 = "Subject: caf\u00e9\r\n\r\nx\r\n".encode()
    assert ids(head8) == ["wire.8bit"]
    assert ids(head8, body_8bit=True) == ["wire.8bit_header"]  # RFC 6532 needs SMTPUTF8
    assert ids(head8, smtputf8=True) == []


def test_header_end():
    assert header_end(b"A: b\r\n\r\nbody") == 6
    assert header_end(b"\r\nbody") == 0
    assert header_end(b"A: b\r\n") == 6  # no body at all
    assert header_end(b"A: b\n\nbody") == 5


def test_big_messages_scan_clean():
    # (their cost per MiB at 1, 5 and 25 MiB is measured by bench/bench_headers.py)
    line = b"y" * 997 + b"\r\n"
    for mib in (1, 8):
        data = GOOD + line * (mib * 1024 * 1024 // len(line))
        assert ids(data, body_8bit=True) == []


async def test_check_refuses_with_rule_id_and_records_finding():
    check = data_wire.build(services())
    tx = make_tx(GOOD + b"evil\n.\n")
    out = await check.run(tx)
    assert out.result is Result.FAIL
    line = out.reply.render(out.detail)
    assert line.startswith("550 5.6.0 P-HDR ") and "bare LF" in line and "[wire.bare_lf]" in line
    assert tx.findings[0]["id"] == "wire.bare_lf"
    assert tx.findings[0]["action"] == "reject"


async def test_check_8bit_reply_and_flag_mode():
    check = data_wire.build(services())
    out = await check.run(make_tx(GOOD + b"\xff\r\n"))
    assert out.reply.render(out.detail).startswith("550 5.6.7 P-STD ")
    flagged = data_wire.build(services(HeaderSettings(actions={"wire.8bit": "flag"})))
    tx = make_tx(GOOD + b"\xff\r\n")
    out = await flagged.run(tx)
    assert out.result is Result.FLAG and "[wire.8bit]" in out.detail
    assert tx.findings[0]["action"] == "flag"


async def test_check_passes_clean_and_declared_8bit():
    check = data_wire.build(services())
    assert (await check.run(make_tx(GOOD))).result is Result.PASS
    out = await check.run(make_tx("Subject: caf\u00e9\r\n\r\nx\r\n".encode(), BODY="8BITMIME"))
    assert out.result is Result.FLAG  # 8-bit header without SMTPUTF8 is flagged by default
    out = await check.run(make_tx("Subject: caf\u00e9\r\n\r\nx\r\n".encode(), BODY="8BITMIME", SMTPUTF8=True))
    assert out.result is Result.PASS
    assert (await check.run(make_tx(None))).result is Result.SKIP  # type: ignore[arg-type]
