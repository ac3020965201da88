"""The event bus (gateway/core/events.py) over real SMTP and a real upstream
sink: subscribers see outcomes, refusals (ours and the upstream's, per
recipient), the end of every transaction and of every session, also one that
never reached MAIL; a subscriber that raises changes no reply and relays
nothing twice."""
from __future__ import annotations

import asyncio
import base64

from gateway.core.events import Authenticated, OutcomeRecorded, Refusal, SessionEnded, TransactionEnded
from gateway.accounts.model import AccountStatus
from gateway.core.transaction import Phase

from conftest import MESSAGE
from smtp_client import cmd, dot_stuff, raw_session, reply, session

KINDS = (OutcomeRecorded, Refusal, TransactionEnded, Authenticated, SessionEnded)


class Recorder:
    def __init__(self, events) -> None:
        self.seen: list = []
        for kind in KINDS:
            events.subscribe(kind, self.seen.append)

    def of(self, kind) -> list:
        return [e for e in self.seen if isinstance(e, kind)]

    async def sessions_ended(self, count: int, timeout: float = 5.0) -> list[SessionEnded]:
        """The SessionEnded events once ``count`` arrived (bounded wait: the
        gateway sees the client's close a moment after the client does it)."""
        async def wait() -> None:
            while len(self.of(SessionEnded)) < count:
                await asyncio.sleep(0.02)
        await asyncio.wait_for(wait(), timeout)
        return self.of(SessionEnded)


def plain(login: str, password: str) -> bytes:
    return b"AUTH PLAIN " + base64.b64encode(b"\0" + login.encode() + b"\0" + password.encode())


async def transaction(reader, writer, rcpts: list[str], data: bytes = MESSAGE) -> tuple[list[bytes], bytes | None]:
    """MAIL as alice, the RCPTs, and DATA if any was taken: (RCPT replies, DATA reply)."""
    assert (await cmd(reader, writer, b"MAIL FROM:<alice@example.com>")).startswith(b"250")
    answers = [await cmd(reader, writer, f"RCPT TO:<{r}>".encode()) for r in rcpts]
    if not any(a.startswith(b"250") for a in answers):
        return answers, None
    assert (await cmd(reader, writer, b"DATA")).startswith(b"354")
    writer.write(dot_stuff(data) + b".\r\n")
    await writer.drain()
    return answers, await reply(reader)


async def test_a_raising_subscriber_changes_no_reply_and_relays_nothing_twice(sink, gateway_factory, caplog):
    sink.refuse_rcpt["nobody@example.org"] = "550 5.1.1 mailbox unknown"
    h = await gateway_factory(sink)
    await h.add_account()
    calls: dict[str, int] = {}

    def broken(event) -> None:
        calls[type(event).__name__] = calls.get(type(event).__name__, 0) + 1
        raise RuntimeError("subscriber bug")

    for kind in KINDS:
        h.gw.events.subscribe(kind, broken)
    recorder = Recorder(h.gw.events)       # subscribed after the broken one: still called

    reader, writer = await session(h.port())
    answers, final = await transaction(reader, writer, ["bob@example.org", "nobody@example.org"])
    assert answers[0].startswith(b"250 2.1.5")
    assert answers[1].startswith(b"550 5.1.1"), answers[1]          # the upstream's own answer
    assert final is not None and final.startswith(b"250 2.0.0 OK: relayed"), final
    assert (await cmd(reader, writer, b"QUIT")).startswith(b"221")
    writer.close()
    await recorder.sessions_ended(1)

    await sink.wait_for(1)
    assert len(sink.messages) == 1 and sink.messages[0].rcpt_tos == ["bob@example.org"]
    assert {"OutcomeRecorded", "Refusal", "TransactionEnded", "SessionEnded"} <= set(calls), calls
    assert calls["TransactionEnded"] == 1
    assert [e.tx.decision for e in recorder.of(TransactionEnded)] == ["relayed"]
    assert "event subscriber" in caplog.text and "subscriber bug" in caplog.text
    # The transaction log is a subscriber too, and still wrote its line.
    lines = [r for r in h.log_records() if r["event"] == "transaction"]
    assert [r["decision"] for r in lines] == ["relayed"]
    assert len(sink.messages) == 1                                   # nothing relayed twice


async def test_subscribers_see_every_kind_of_event(sink, gateway_factory):
    sink.refuse_rcpt["nobody@example.org"] = "550 5.1.1 mailbox unknown"
    h = await gateway_factory(sink)
    await h.add_account()
    await h.gw.blocklist.add("hostname", "mx.bad.example", reason="botnet")
    rec = Recorder(h.gw.events)

    # 1. A session that fails AUTH and never reaches MAIL.
    reader, writer, _ = await raw_session(h.port())
    assert (await cmd(reader, writer, b"EHLO client.test")).startswith(b"250")
    assert (await cmd(reader, writer, plain("alice", "wrong-pw"))).startswith(b"535 5.7.8")
    writer.close()
    ended = await rec.sessions_ended(1)
    auth = [e for e in rec.of(Refusal) if e.outcome.phase is Phase.AUTH]
    assert len(auth) == 1 and auth[0].tx is None and auth[0].by == "gateway"
    assert auth[0].outcome.check == "auth" and auth[0].outcome.reply.code == 535
    assert ended[0].session is auth[0].session and ended[0].session.transactions == 0

    # 2. A refused HELO.
    reader, writer, _ = await raw_session(h.port())
    assert (await cmd(reader, writer, b"EHLO mx.bad.example")).startswith(b"554 5.7.1 P-BLOCK")
    assert (await cmd(reader, writer, b"QUIT")).startswith(b"221")
    writer.close()
    ended = await rec.sessions_ended(2)
    helo = [e for e in rec.of(Refusal) if e.outcome.phase is Phase.HELO]
    assert [e.outcome.check for e in helo] == ["helo_blocklist"] and helo[0].tx is None
    assert ended[1].session is helo[0].session and ended[1].session.ended == "quit"

    # 3. One relayed transaction with an upstream RCPT refusal, then one
    #    refused by our own check (an address literal is a relay trick).
    reader, writer = await session(h.port())
    answers, final = await transaction(reader, writer, ["bob@example.org", "nobody@example.org"])
    assert answers[1].startswith(b"550 5.1.1") and final.startswith(b"250 2.0.0 OK: relayed")
    answers, final = await transaction(reader, writer, ["carol@[192.0.2.1]"])
    assert answers[0].startswith(b"554 5.7.1 P-RELAY") and final is None
    assert (await cmd(reader, writer, b"QUIT")).startswith(b"221")
    writer.close()
    ended = await rec.sessions_ended(3)

    upstream = [e for e in rec.of(Refusal) if e.by == "upstream"]
    assert [(e.recipient, e.outcome.check, e.outcome.reply.code) for e in upstream] == [
        ("nobody@example.org", "relay_rcpt", 550)]
    ours = [e for e in rec.of(Refusal) if e.outcome.phase is Phase.RCPT and e.by == "gateway"]
    assert [e.recipient for e in ours] == ["carol@[192.0.2.1]"] and ours[0].tx is not None
    txs = rec.of(TransactionEnded)
    assert [e.tx.decision for e in txs] == ["relayed", "refused"]
    assert txs[0].tx.final_reply.code == 250 and ended[2].session.transactions == 2
    # Every outcome of every ledger was published: the checks' (pipeline),
    # the server's (syntax, AUTH) and delivery's (upstream answers, relay).
    published = {id(e.outcome) for e in rec.of(OutcomeRecorded)}
    ledgers = [e.tx.ledger for e in txs] + [e.session.ledger for e in ended]
    for ledger in ledgers:
        missing = [o.check for o in ledger if id(o) not in published]
        assert not missing, missing
    checks = {o.check for ledger in ledgers for o in ledger}
    assert {"auth", "helo_blocklist", "mail_syntax", "rcpt_relay", "relay_rcpt", "data_headers", "relay"} <= checks
    assert len(sink.messages) == 1
    # the one successful AUTH (session 3) is its own event, before its transactions
    authed = rec.of(Authenticated)
    assert [e.session for e in authed] == [ended[2].session]
    assert authed[0].session.account.name == "alice" and authed[0].session.auth_method == "smtp-auth"
    assert rec.seen.index(authed[0]) < rec.seen.index(txs[0])


async def test_auth_metrics_count_from_events(sink, gateway_factory):
    """gateway_auth_total counts each AUTH by outcome: success (Authenticated),
    failure, suspended and blocked (its Refusal's reply)."""
    h = await gateway_factory(sink, auth={"max_failures_per_ip": 2})
    await h.add_account()
    await h.add_account("sam", "pw-sam", domains=("sam.example",))
    await h.gw.accounts.set_status("sam", AccountStatus.SUSPENDED)
    for user, password, expect in (("alice", "s3cret", b"235"), ("sam", "pw-sam", b"535 5.7.8"),
                                   ("alice", "wrong", b"535 5.7.8"), ("alice", "wrong", b"535 5.7.8"),
                                   ("alice", "s3cret", b"454 4.7.0")):
        reader, writer, _ = await raw_session(h.port())
        assert (await cmd(reader, writer, b"EHLO client.test")).startswith(b"250")
        got = await cmd(reader, writer, plain(user, password))
        assert got.startswith(expect), (user, password, got)
        writer.close()
    text = h.gw.metrics.render().decode()
    assert 'gateway_auth_total{outcome="success"} 1.0' in text, text
    assert 'gateway_auth_total{outcome="failure"} 2.0' in text, text
    assert 'gateway_auth_total{outcome="suspended"} 1.0' in text, text
    assert 'gateway_auth_total{outcome="blocked"} 1.0' in text, text


async def test_a_session_refused_at_connect_is_published(sink, gateway_factory):
    h = await gateway_factory(sink, smtp={"max_connections": 1})
    rec = Recorder(h.gw.events)
    _r1, w1, g1 = await raw_session(h.port())
    assert g1.startswith(b"220 ")
    reader, writer, g2 = await raw_session(h.port())
    assert g2.startswith(b"421 4.7.0 P-LOAD"), g2
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    ended = await rec.sessions_ended(1)
    refused = rec.of(Refusal)
    assert [(e.outcome.phase, e.outcome.check, e.tx) for e in refused] == [(Phase.CONNECT, "connect_limits", None)]
    assert ended[0].session is refused[0].session and ended[0].session.ended == "closed with 421 4.7.0"
    w1.close()
    await rec.sessions_ended(2)
    assert rec.of(TransactionEnded) == []
