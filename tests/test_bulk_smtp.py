"""The bulk and repeat detectors (checks/data_bulk.py, P-UCE) over real SMTP:
a real gateway (gateway_factory), the test upstream (sink), one account,
``data_bulk`` in enforce mode, one recipient per transaction.

- 200 near-identical messages (bench/bulk_eval.py's copies of a real corpus
  message: personalized names, tracking links, reordered paragraphs) to 200
  recipients: the first ones pass, then they are deferred (451 4.7.1 P-UCE),
  then refused (550 5.7.1 P-UCE) with a Violation(kind="bulk");
- 200 different genuine corpus messages, each to its own recipient: none is
  deferred or refused;
- registered list mail to confirmed subscribers is not counted;
- the same message again to one recipient under another Message-ID is
  refused (kind="repeat"); its resend under the same Message-ID after the
  upstream's 4xx is relayed.

The corpora (../shared/corpora) are required: skipped visibly without them,
failed under CI=true."""
from __future__ import annotations

import re

from conftest import need
from smtp_client import cmd, reply, session
from bench.bulk_eval import bulk_copies, genuine_sample
from bench.ham_refusals import default_corpora
from gateway.core.events import Violation
from test_listmail_smtp import _confirmed, _list_message, _start

# data_bulk alone beside data_size (the other data checks have their own tests and would refuse
# corpus mail for their own reasons: foreign From domains, list headers)
CHECKS = {"data": ["data_size", "data_bulk"], "modes": {"data_bulk": "enforce"}}
SMTP = {"max_message_size": 5_000_000, "max_recipients": 5}


LONG = (b"\r\nThis month we released the new version of our garden planner, with a calendar that\r\n"
        b"knows your region's frost dates and reminds you when to sow, plant out and harvest.\r\n\r\n"
        b"Our readers asked for printable seed lists and a shared plan for allotment groups:\r\n"
        b"both are in, and the help pages explain how to invite the other members of a group.\r\n")


def _stuffed(data: bytes) -> bytes:
    data = re.sub(rb"(?m)^\.", b"..", data)
    return data if data.endswith(b"\r\n") else data + b"\r\n"


async def _send(reader, writer, rcpt: str, data: bytes, mail_from: str = "alice@example.com") -> str:
    """One transaction; the reply that ended it (RCPT's if refused, else DATA's)."""
    params = ""
    if not data.isascii():
        params += " BODY=8BITMIME"
        if not data.split(b"\r\n\r\n", 1)[0].isascii():
            params += " SMTPUTF8"
    got = await cmd(reader, writer, f"MAIL FROM:<{mail_from}>{params}".encode())
    assert got.startswith(b"250"), got
    got = await cmd(reader, writer, f"RCPT TO:<{rcpt}>".encode())
    if not got.startswith(b"250"):
        await cmd(reader, writer, b"RSET")
        return got.decode()
    assert (await cmd(reader, writer, b"DATA")).startswith(b"354")
    writer.write(_stuffed(data) + b".\r\n")
    await writer.drain()
    return (await reply(reader)).decode()


async def _gateway(gateway_factory, sink, **bulk):
    h = await gateway_factory(sink, checks=CHECKS, smtp=SMTP, **({"bulk": bulk} if bulk else {}))
    await h.add_account("alice", domains=("example.com",))
    seen: list[Violation] = []
    h.gw.events.subscribe(Violation, seen.append)
    return h, seen


async def _gateway_on(gateway_factory, sink, counters: dict, where):
    """A gateway of its own (database, log) on the given counters, threshold 2."""
    where.mkdir()
    h = await gateway_factory(sink, checks=CHECKS, smtp=SMTP, counters=counters, bulk={"recipients_threshold": 2},
                              storage={"url": f"sqlite+aiosqlite:///{where / 'gw.db'}"},
                              log={"transactions": str(where / "transactions.jsonl")})
    await h.add_account("alice", domains=("example.com",))
    seen: list[Violation] = []
    h.gw.events.subscribe(Violation, seen.append)
    return h, seen


def _corpora():
    corpora = default_corpora()
    need(corpora.is_dir(), f"the shared corpora are not at {corpora}")
    return corpora


async def test_200_near_identical_messages_are_deferred_then_refused(gateway_factory, sink):
    copies = bulk_copies(_corpora(), "spamassassin-t-data/t/data/spam/001")
    h, seen = await _gateway(gateway_factory, sink)
    reader, writer = await session(h.port())
    answers = [await _send(reader, writer, f"user{i}@example.org", d) for i, d in enumerate(copies)]
    writer.close()
    codes = [a[:3] for a in answers]
    passed, deferred, refused = codes.count("250"), codes.count("451"), codes.count("550")
    print(f"200 copies: passed {passed}, deferred {deferred}, refused {refused}")
    assert passed + deferred + refused == 200
    assert all("P-UCE" in a for a in answers if not a.startswith("250")), answers
    first_caught = next(i for i, c in enumerate(codes) if c != "250")
    assert codes[first_caught] == "451" and answers[first_caught].startswith("451 4.7.1 P-UCE")
    assert first_caught >= 50                      # the threshold: 50 recipients may get it
    assert "550" not in codes[:first_caught + 50]  # deferred before refused (refused past 100)
    assert passed <= 60 and refused >= 80, (passed, deferred, refused)
    assert all(a.startswith("550 5.7.1 P-UCE") for a in answers if a.startswith("550"))
    assert len(sink.messages) == passed
    assert [v.kind for v in seen] == ["bulk"] * refused and {(v.rule, v.account) for v in seen} == {("P-UCE", "alice")}


async def test_200_different_genuine_messages_are_not_caught(gateway_factory, sink):
    genuine = genuine_sample(_corpora())
    assert len(genuine) == 200
    h, seen = await _gateway(gateway_factory, sink)
    reader, writer = await session(h.port())
    answers = [(name, await _send(reader, writer, f"person{i}@example.org", d))
               for i, (name, d) in enumerate(genuine)]
    writer.close()
    caught = [(n, a) for n, a in answers if "P-UCE" in a]
    assert caught == [] and seen == []
    assert all(a.startswith("250") for _, a in answers), [x for x in answers if not x[1].startswith("250")][:5]


async def test_registered_list_mail_is_not_counted(gateway_factory, sink):
    checks = {**CHECKS, "data": ["data_size", "data_listmail", "data_bulk"]}
    h, _ = await _start(gateway_factory, sink, checks=checks, smtp=SMTP, bulk={"recipients_threshold": 2})
    seen: list[Violation] = []
    h.gw.events.subscribe(Violation, seen.append)
    lst = await h.gw.registry.create_list("alice", name="News", list_id="news.example.com",
                                          senders=["news@example.com"], confirm_from="confirm@example.com")
    readers = [f"reader{i}@example.org" for i in range(6)]
    await _confirmed(h, sink, lst.id, readers)
    reader, writer = await session(h.port())
    message = _list_message() + LONG      # a real text: a weak fingerprint would only be flagged
    for r in readers:                              # 6 copies of one message, threshold 2: all relayed
        got = await _send(reader, writer, r, message, mail_from="news@example.com")
        assert got.startswith("250"), (r, got)
    # the same text without the list (a plain copy) is counted from zero: 2 pass, the third is deferred
    plain = re.sub(rb"(?m)^(List-[^\r\n]*|Precedence: bulk|X-Campaign: 42)\r\n( [^\r\n]*\r\n)?", b"", message)
    # (sent from another address of the account: the list's sender address makes it list mail)
    got = [await _send(reader, writer, f"other{i}@example.org", plain)
           for i in range(3)]
    writer.close()
    assert [g[:3] for g in got] == ["250", "250", "451"], got
    assert seen == []


async def test_repeat_refused_resend_after_a_4xx_relayed(gateway_factory, sink):
    copies = bulk_copies(_corpora(), "spamassassin-t-data/t/data/nice/001", n=3)
    h, seen = await _gateway(gateway_factory, sink)
    reader, writer = await session(h.port())
    assert (await _send(reader, writer, "bob@example.org", copies[0])).startswith("250")
    sink.data_reply = "451 4.3.0 Try again later"  # the upstream defers carol's copy
    first = await _send(reader, writer, "carol@example.org", copies[1])
    assert first.startswith("451") and "P-UCE" not in first, first
    sink.data_reply = None
    again = await _send(reader, writer, "carol@example.org", copies[1])   # the client's retry: same Message-ID
    assert again.startswith("250"), again
    repeat = await _send(reader, writer, "bob@example.org", copies[2])   # a new copy to bob: a repeat
    writer.close()
    assert repeat.startswith("550 5.7.1 P-UCE"), repeat
    assert [(v.kind, v.account) for v in seen] == [("repeat", "alice")]
    assert [m.rcpt_tos for m in sink.messages] == [["bob@example.org"], ["carol@example.org"]]


async def test_counts_in_redis_shared_by_two_gateways(gateway_factory, sink, tmp_path):
    """[counters] backend = "redis": two gateways on one Redis (a random key
    prefix, deleted after) count the same recipients: copies sent through A
    and B add up, and a repeat through B of what went through A is caught."""
    import secrets

    import redis.asyncio as redis

    from conftest import tcp_reachable
    need(tcp_reachable("127.0.0.1", 6379), "Redis is not reachable at 127.0.0.1:6379")
    prefix = f"test-bulk-{secrets.token_hex(6)}:"
    counters = {"backend": "redis", "redis_url": "redis://127.0.0.1:6379/0", "key_prefix": prefix, "timeout": 2.0}
    copies = bulk_copies(_corpora(), "spamassassin-t-data/t/data/spam/005", n=6)
    client = redis.from_url("redis://127.0.0.1:6379/0")
    try:
        a, seen_a = await _gateway_on(gateway_factory, sink, counters, tmp_path / "a")
        b, seen_b = await _gateway_on(gateway_factory, sink, counters, tmp_path / "b")
        ra, wa = await session(a.port())
        rb, wb = await session(b.port())
        got = []
        for i, d in enumerate(copies[:5]):
            r, w = (ra, wa) if i % 2 == 0 else (rb, wb)
            got.append((await _send(r, w, f"user{i}@example.org", d))[:3])
        assert got == ["250", "250", "451", "451", "550"], got      # threshold 2, refused past 4: the sum
        repeat = await _send(rb, wb, "user0@example.org", copies[5])  # user0 got copy 0 through A
        wa.close()
        wb.close()
        assert repeat.startswith("550 5.7.1 P-UCE"), repeat
        assert [v.kind for v in seen_a + seen_b] == ["bulk", "repeat"]
        assert not a.gw.counters.fallback and not b.gw.counters.fallback
        assert [k async for k in client.scan_iter(match=prefix + "d:*")]
    finally:
        keys = [k async for k in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
