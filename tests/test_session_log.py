"""Every session leaves at least one JSON line: failed and suspended AUTH,
refused HELO, a client that only connected. A session whose transaction
line already carried its ledger writes no second line; outcomes no line
carried yet (an AUTH failure after the last transaction) get one."""
from __future__ import annotations

import asyncio
import base64

from gateway.accounts.model import AccountStatus

from conftest import MESSAGE
from smtp_client import AUTH, cmd, raw_session, session


def plain(login: str, password: str) -> bytes:
    return b"AUTH PLAIN " + base64.b64encode(b"\0" + login.encode() + b"\0" + password.encode())


async def lines_of(h, sid_count: int, timeout: float = 5.0) -> list[dict]:
    """The log records once ``sid_count`` sessions have written one (bounded wait)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        records = h.log_records()
        if len({r["session"] for r in records}) >= sid_count or asyncio.get_running_loop().time() > deadline:
            return records
        await asyncio.sleep(0.05)


async def test_failed_auth_session_writes_a_line_without_the_password(sink, gateway_factory):
    h = await gateway_factory(sink)
    await h.add_account()
    reader, writer, _ = await raw_session(h.port())
    assert (await cmd(reader, writer, b"EHLO client.test")).startswith(b"250")
    assert (await cmd(reader, writer, plain("alice", "wrong-pw-xyz"))).startswith(b"535 5.7.8")
    assert (await cmd(reader, writer, plain("nobody", "other-pw-xyz"))).startswith(b"535 5.7.8")
    assert (await cmd(reader, writer, b"QUIT")).startswith(b"221")
    writer.close()
    records = await lines_of(h, 1)
    assert len(records) == 1, records
    line = records[0]
    assert line["event"] == "session" and line["ended"] == "quit"
    assert line["client_ip"] == "127.0.0.1" and line["listener"] == "plain" and line["helo"] == "client.test"
    assert line["transactions"] == 0 and "account" not in line
    auth = [o for o in line["ledger"] if o["check"] == "auth"]
    assert [(o["result"], o["item"], o["reply"]) for o in auth] == [("fail", "alice", "535 5.7.8"),
                                                                 ("fail", "nobody", "535 5.7.8")]
    raw = h.log_path.read_bytes()
    assert b"wrong-pw-xyz" not in raw and b"other-pw-xyz" not in raw


async def test_suspended_account_auth_writes_a_line(sink, gateway_factory):
    h = await gateway_factory(sink)
    await h.add_account()
    await h.gw.accounts.set_status("alice", AccountStatus.SUSPENDED)
    reader, writer, _ = await raw_session(h.port())
    await cmd(reader, writer, b"EHLO client.test")
    assert (await cmd(reader, writer, AUTH)).startswith(b"535 5.7.8 P-STRIKE")
    writer.close()  # no QUIT: a disconnect ends it
    line = (await lines_of(h, 1))[0]
    assert line["event"] == "session" and line["ended"] == "disconnect"
    assert [o["detail"] for o in line["ledger"] if o["check"] == "auth"] == ["account alice suspended"]


async def test_refused_helo_writes_a_line(sink, gateway_factory):
    h = await gateway_factory(sink)
    await h.gw.blocklist.add("hostname", "mx.bad.example", reason="botnet")
    reader, writer, _ = await raw_session(h.port())
    assert (await cmd(reader, writer, b"EHLO mx.bad.example")).startswith(b"554 5.7.1 P-BLOCK")
    await cmd(reader, writer, b"QUIT")
    writer.close()
    line = (await lines_of(h, 1))[0]
    assert line["event"] == "session"
    refused = [o for o in line["ledger"] if o["result"] == "fail"]
    assert refused and refused[0]["check"] == "helo_blocklist" and refused[0]["reply"] == "554 5.7.1"


async def test_connect_only_session_writes_a_line(sink, gateway_factory):
    h = await gateway_factory(sink)
    reader, writer, greeting = await raw_session(h.port())
    assert greeting.startswith(b"220")
    writer.close()
    line = (await lines_of(h, 1))[0]
    assert line["event"] == "session" and line["transactions"] == 0 and line["ended"] == "disconnect"


async def test_transaction_session_writes_one_line_and_later_outcomes_another(sink, gateway_factory):
    h = await gateway_factory(sink)
    await h.add_account()
    reader, writer = await session(h.port())  # EHLO + AUTH as alice
    assert (await cmd(reader, writer, b"MAIL FROM:<alice@example.com>")).startswith(b"250")
    assert (await cmd(reader, writer, b"RCPT TO:<bob@example.org>")).startswith(b"250")
    assert (await cmd(reader, writer, b"DATA")).startswith(b"354")
    body = MESSAGE.replace(b"\r\n.", b"\r\n..")
    assert (await cmd(reader, writer, body + b".")).startswith(b"250")
    assert (await cmd(reader, writer, b"QUIT")).startswith(b"221")
    writer.close()
    await sink.wait_for(1)
    records = await lines_of(h, 1)
    await asyncio.sleep(0.2)  # a second line of the same session would be written by now
    records = h.log_records()
    assert [r["event"] for r in records] == ["transaction"], records
    assert any(o["check"] == "auth" and o["result"] == "pass" for o in records[0]["ledger"])

    # A second session: one message, then a failed AUTH attempt in a fresh
    # session of the same client is its own line; and within one session an
    # outcome after the transaction line (a refused HELO) gets the end line.
    reader, writer = await session(h.port())
    assert (await cmd(reader, writer, b"MAIL FROM:<alice@example.com>")).startswith(b"250")
    assert (await cmd(reader, writer, b"RCPT TO:<bob@example.org>")).startswith(b"250")
    assert (await cmd(reader, writer, b"DATA")).startswith(b"354")
    assert (await cmd(reader, writer, body + b".")).startswith(b"250")
    await h.gw.blocklist.add("hostname", "late.bad.example")
    assert (await cmd(reader, writer, b"EHLO late.bad.example")).startswith(b"554 5.7.1")
    await cmd(reader, writer, b"QUIT")
    writer.close()
    records = await lines_of(h, 2)
    await asyncio.sleep(0.2)
    second = [r for r in h.log_records() if r["session"] != records[0]["session"]]
    assert [r["event"] for r in second] == ["transaction", "session"], second
    end = second[1]
    assert [o["check"] for o in end["ledger"]] == ["helo_blocklist"]  # only what no line carried yet
    assert end["transactions"] == 1 and end["account"] == "alice"
