"""A real MTA as the customer's smarthost client (issue 2, "What must be shown").

Postfix (Debian package), started by each test in its own directory with no
listening port, relays through the gateway's STARTTLS listener with SASL AUTH
and the test CA. Mail the gateway accepts reaches the sink; mail it refuses
comes back to Postfix as a bounce (5xx) or stays deferred (4xx) with the
gateway's own reply text. Recipe: see tests/mta.py.
"""
from __future__ import annotations

import asyncio

import pytest

from conftest import MESSAGE, Sink, need
from mta import Postfix, postfix_missing

pytestmark = pytest.mark.timeout(120)

SUBMISSION = {"name": "submission", "address": "127.0.0.1", "port": 0, "tls": "starttls",
              "require_tls": True, "require_auth": True}
SMTPS = {"name": "smtps", "address": "127.0.0.1", "port": 0, "tls": "implicit", "require_auth": True}


@pytest.fixture
async def postfix_factory():
    reason = postfix_missing()
    need(reason is None, reason or "")
    instances: list[Postfix] = []

    async def make(**kw) -> Postfix:
        pf = Postfix(**kw)
        instances.append(pf)
        await pf.start()
        return pf

    yield make
    for pf in instances:
        try:
            await pf.stop()
        finally:
            leftover = pf._group_pids()
            pf.cleanup()
        assert not leftover, f"Postfix processes left running: {leftover}"


async def gateway(gateway_factory, sink, certs, **sections):
    sections.setdefault("listeners", [SUBMISSION])
    h = await gateway_factory(sink, certs, **sections)
    await h.add_account("alice", "s3cret", domains=("example.com",))
    return h


@pytest.mark.parametrize("listener,mechanism,tls_level,tls_match", [
    # STARTTLS, encrypted; the CA is configured but the chain is not required by "encrypt"
    ("starttls", "plain", "encrypt", None),
    # STARTTLS, verified against the test CA and the name "localhost"
    ("starttls", "login", "secure", "localhost"),
    # 465-style implicit TLS (Postfix smtp_tls_wrappermode), verified
    ("implicit", "plain", "secure", "localhost"),
])
async def test_postfix_relays_through_gateway(sink, gateway_factory, certs, postfix_factory,
                                              listener, mechanism, tls_level, tls_match):
    if listener == "implicit":
        h = await gateway(gateway_factory, sink, certs, listeners=[SMTPS])
        port = h.port("smtps")
        main = {"smtp_tls_wrappermode": "yes"}
    else:
        h = await gateway(gateway_factory, sink, certs)
        port = h.port("submission")
        main = {}
    pf = await postfix_factory(relay_port=port, ca_file=certs.ca_file,
                               sasl=("alice", "s3cret"), mechanisms=mechanism,
                               tls_level=tls_level, tls_match=tls_match, main=main)
    await pf.sendmail("alice@example.com", ["bob@example.org"], MESSAGE.replace(b"\r\n", b"\n"))
    await sink.wait_for(1, timeout=30)
    await pf.wait_empty()
    got = sink.messages[0]
    assert got.mail_from == "alice@example.com"
    assert got.rcpt_tos == ["bob@example.org"]
    head = got.data.split(b"\r\n\r\n", 1)[0]
    # The gateway's trace on top: Received naming the account, TLS and ESMTPSA, then X-Gateway-Trace.
    assert head.startswith(b"Received: from mta.customer.test ([127.0.0.1])"), head
    assert b"(authenticated account alice)" in head
    assert b"with ESMTPSA id " in head
    assert b"(using TLSv1." in head
    assert b"\r\nX-Gateway-Trace: " in head
    trace_id = head.split(b"X-Gateway-Trace: ", 1)[1].split(b"\r\n", 1)[0].decode()
    assert f"id {trace_id}".encode() in head
    # Postfix's own Received header comes below ours; the body is intact.
    assert b"by mta.customer.test (Postfix" in head, head
    assert got.data.endswith(b"Hello Bob,\r\n.leading dot line\r\nbye\r\n")
    log = await pf.wait_log("status=sent")
    assert f"relay=127.0.0.1[127.0.0.1]:{port}" in log
    assert f"250 2.0.0 OK: relayed, trace id {trace_id}" in log
    if tls_level == "secure":
        assert "Verified TLS connection established to 127.0.0.1" in log, pf.log_tail()
    else:
        assert "TLS connection established to 127.0.0.1" in log, pf.log_tail()
    # The gateway's transaction log names the account and the Postfix client.
    rec = [r for r in h.log_records() if r.get("trace_id") == trace_id]
    assert rec and rec[0]["account"] == "alice" and rec[0]["helo"] == "mta.customer.test", rec
    assert rec[0]["tls"]["version"].startswith("TLSv1.")
    auth = [o for o in rec[0]["ledger"] if o["check"] == "auth"]
    assert auth and auth[0]["detail"] == f"account alice via {mechanism.upper()}", rec[0]["ledger"]


async def test_postfix_bounces_on_gateway_5xx_with_our_text(sink, gateway_factory, certs, postfix_factory):
    """A message over smtp.max_message_size: the gateway answers 552 5.3.4 P-LOAD
    after DATA, and Postfix returns the message to its sender quoting that reply."""
    bounce_sink = await Sink().start()
    try:
        h = await gateway(gateway_factory, sink, certs, smtp={"max_message_size": 20_000})
        pf = await postfix_factory(
            relay_port=h.port("submission"), ca_file=certs.ca_file, sasl=("alice", "s3cret"),
            # Postfix must not honour the gateway's SIZE itself, or the bounce would be its own.
            main={"smtp_discard_ehlo_keywords": "size"},
            # the sender's domain is routed to a plain test sink, where the bounce is caught
            transports={"example.com": f"plainsmtp:[127.0.0.1]:{bounce_sink.port}"})
        big = MESSAGE.replace(b"\r\n", b"\n") + (b"x" * 70 + b"\n") * 400
        await pf.sendmail("alice@example.com", ["bob@example.org"], big)
        await bounce_sink.wait_for(1, timeout=30)
        await pf.wait_empty()
        dsn = bounce_sink.messages[0]
        assert dsn.mail_from in ("", "<>")  # aiosmtpd keeps the null path as "<>"
        assert dsn.rcpt_tos == ["alice@example.com"]
        raw = dsn.data.decode("utf-8", "replace")
        text = " ".join(raw.split())  # Postfix folds the long diagnostic lines
        assert "said: 552 5.3.4 P-LOAD Message size exceeds fixed maximum message size" in text, raw
        assert "Status: 5.3.4" in text
        assert "Diagnostic-Code: smtp; 552 5.3.4 P-LOAD Message size exceeds" in text, raw
        log = pf.log()
        assert "status=bounced" in log and "5.3.4 P-LOAD" in log
        assert sink.messages == []
    finally:
        await bounce_sink.stop()


async def test_postfix_defers_while_upstream_down_then_delivers(sink, gateway_factory, certs, postfix_factory):
    """Upstream unreachable: the gateway answers 451 4.4.1, the message waits in
    Postfix's deferred queue with that text, and goes out after the upstream is back."""
    h = await gateway(gateway_factory, sink, certs)
    port = sink.port
    await sink.stop()
    pf = await postfix_factory(relay_port=h.port("submission"), ca_file=certs.ca_file,
                               sasl=("alice", "s3cret"),
                               # no automatic retry during the test: only our flush
                               main={"minimal_backoff_time": "300s", "maximal_backoff_time": "600s"})
    await pf.sendmail("alice@example.com", ["bob@example.org"], MESSAGE.replace(b"\r\n", b"\n"))

    def deferred_with_reason(q):
        return any(e["queue_name"] == "deferred" and any("4.4.1" in r.get("delay_reason", "")
                                                        for r in e["recipients"]) for e in q)

    q = await pf.wait_queue(deferred_with_reason, what="deferral with 4.4.1")
    reason = q[0]["recipients"][0]["delay_reason"]
    assert reason == ("host 127.0.0.1[127.0.0.1] said: 451 4.4.1 Upstream relay unavailable, "
                      "try again later (in reply to RCPT TO command)"), reason
    assert q[0]["sender"] == "alice@example.com"

    back = Sink(port=port)
    await back.start()
    try:
        await pf.flush()
        await back.wait_for(1, timeout=30)
        await pf.wait_empty()
        assert back.messages[0].rcpt_tos == ["bob@example.org"]
        assert b"(authenticated account alice)" in back.messages[0].data
    finally:
        await back.stop()


async def test_postfix_defers_when_account_suspended(sink, gateway_factory, certs, postfix_factory):
    """AUTH refused (535 5.7.8 P-STRIKE): Postfix keeps the message deferred,
    quoting the gateway, and nothing is relayed."""
    from gateway.accounts.model import AccountStatus

    h = await gateway(gateway_factory, sink, certs)
    await h.gw.accounts.set_status("alice", AccountStatus.SUSPENDED)
    pf = await postfix_factory(relay_port=h.port("submission"), ca_file=certs.ca_file,
                               sasl=("alice", "s3cret"),
                               main={"minimal_backoff_time": "300s", "maximal_backoff_time": "600s"})
    await pf.sendmail("alice@example.com", ["bob@example.org"], MESSAGE.replace(b"\r\n", b"\n"))

    def deferred_with_reason(q):
        return any(e["queue_name"] == "deferred" and any("5.7.8" in r.get("delay_reason", "")
                                                        for r in e["recipients"]) for e in q)

    q = await pf.wait_queue(deferred_with_reason, what="deferral with 5.7.8")
    reason = q[0]["recipients"][0]["delay_reason"]
    assert "SASL authentication failed" in reason, reason
    assert "535 5.7.8 P-STRIKE Account suspended, contact your provider" in reason, reason
    assert sink.messages == []


async def test_postfix_refuses_gateway_certificate_from_unknown_ca(sink, gateway_factory, certs, postfix_factory,
                                                                   tmp_path):
    """smtp_tls_security_level=secure with a CA that did not sign the gateway's
    certificate: Postfix defers and never sends AUTH or mail."""
    import trustme

    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    h = await gateway(gateway_factory, sink, certs)
    pf = await postfix_factory(relay_port=h.port("submission"), ca_file=str(other_ca),
                               sasl=("alice", "s3cret"), tls_level="secure", tls_match="localhost",
                               main={"minimal_backoff_time": "300s", "maximal_backoff_time": "600s"})
    await pf.sendmail("alice@example.com", ["bob@example.org"], MESSAGE.replace(b"\r\n", b"\n"))
    q = await pf.wait_queue(lambda q: any(e["queue_name"] == "deferred" for e in q), what="deferral")
    reason = q[0]["recipients"][0]["delay_reason"]
    assert reason == "Server certificate not verified", reason
    assert sink.messages == []
    assert not any(r.get("account") == "alice" for r in h.log_records())


@pytest.mark.parametrize("recipient_limit", [None, 1])
async def test_postfix_sends_list_mail_one_recipient_per_transaction(sink, gateway_factory, certs, postfix_factory,
                                                                   recipient_limit):
    """List mail to three confirmed readers: the gateway takes one list
    recipient per transaction (452 4.5.3 for the others, docs/registry.md).
    Postfix as it comes sends the others again in the next round of the same
    delivery (its qmgr retries a 4.5.3 deferral about a second later, not
    after the queue's back-off, unless it finds the message still being
    delivered: then at the next queue run); with ``smtp_destination_recipient_limit = 1``
    it sends one recipient per transaction from the start and never meets the
    452. Either way each reader gets exactly one copy and nothing bounces."""
    from test_listmail_smtp import MAILTO, SECRET, _confirmed, _list_message

    h = await gateway(gateway_factory, sink, certs,
                      registry={"secret": SECRET, "public_base_url": "http://127.0.0.1:9", "mailto_address": MAILTO})
    lst = await h.gw.registry.create_list("alice", name="News", list_id="news.example.com",
                                          senders=["news@example.com"], confirm_from="confirm@example.com")
    readers = ["reader1@example.org", "reader2@example.org", "reader3@example.org"]
    await _confirmed(h, sink, lst.id, readers)
    start = len(sink.messages)
    main = {} if recipient_limit is None else {"smtp_destination_recipient_limit": recipient_limit}
    pf = await postfix_factory(relay_port=h.port("submission"), ca_file=certs.ca_file,
                               sasl=("alice", "s3cret"), mechanisms="plain", main=main)
    await pf.sendmail("news@example.com", readers, _list_message().replace(b"\r\n", b"\n"))
    try:
        await sink.wait_for(start + 3, timeout=15)
    except TimeoutError:
        # Postfix's qmgr can find the message "still being delivered" when it
        # wants to send the 4.5.3 recipients again; they then wait for the
        # next queue run, which a flush brings forward.
        assert recipient_limit is None and "skipped, still being delivered" in pf.log(), pf.log_tail()
        await pf.flush()
        await sink.wait_for(start + 3, timeout=30)
    await pf.wait_empty()
    await asyncio.sleep(0.2)
    got = sorted(m.rcpt_tos[0] for m in sink.messages[start:])
    assert got == readers, got                                   # each reader once
    assert all(len(m.rcpt_tos) == 1 for m in sink.messages[start:])
    log = pf.log()
    assert log.count("status=sent") == 3, pf.log_tail()
    assert "status=bounced" not in log, pf.log_tail()
    deferred = [line for line in log.splitlines() if "status=deferred" in line]
    if recipient_limit is None:
        assert deferred and all("dsn=4.5.3" in line and "one recipient per transaction" in line
                                for line in deferred), pf.log_tail()
    else:
        assert deferred == [], pf.log_tail()
    relayed = [r for r in h.log_records() if r.get("decision") == "relayed"]
    assert len(relayed) == 3, [r.get("decision") for r in h.log_records()]
