"""The circuit breaker per upstream (relay/breaker.py) over real sockets: a
hung upstream (a FaultProxy in black-hole mode: it accepts TCP and never
greets) costs its timeout once, then it is skipped without being tried until
a background probe reaches it again; an upstream that drops the connection
after its greeting counts as failing too; and a breaker never makes the
gateway refuse when an upstream would have taken the message."""
from __future__ import annotations

import asyncio

import aiosmtplib
import httpx
import pytest

from conftest import MESSAGE, eventually
from faultproxy import FaultProxy

TIMEOUT = 0.5          # the hung upstream's connect/greeting timeout in these tests


async def send(port: int) -> aiosmtplib.SMTP:
    c = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10, start_tls=False,
                        local_hostname="client.test")
    await c.connect()
    await c.login("alice", "s3cret")
    return c


async def send_one(port: int) -> None:
    c = await send(port)
    await c.sendmail("alice@example.com", ["bob@example.org"], MESSAGE)
    await c.quit()


def metric(text: str, name: str, upstream: str) -> float:
    prefix = f'{name}{{upstream="{upstream}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    raise AssertionError(f"{prefix!r} not in the metrics:\n{text}")


@pytest.fixture
async def hung(sink):
    """An upstream that accepts TCP and never greets (until set to pass: then it is the sink)."""
    proxy = await FaultProxy("127.0.0.1", sink.port).start()
    await proxy.set_mode("blackhole")
    yield proxy
    await proxy.stop()


def two_upstreams(first_port: int, sink, **breaker):
    return {"upstreams": [{"host": "127.0.0.1", "port": first_port, "connect_timeout": TIMEOUT},
                          {"host": "127.0.0.1", "port": sink.port}], **breaker}


async def test_hung_upstream_costs_its_timeout_once_then_is_skipped(sink, hung, gateway_factory, caplog):
    h = await gateway_factory(sink, relay=two_upstreams(hung.port, sink, breaker_backoff=300.0),
                              http={"enabled": True, "port": 0})
    await h.add_account()
    await send_one(h.port())
    await sink.wait_for(1)
    assert hung.accepted == 1, "the first message tried the hung upstream"
    up = h.gw.relay.upstreams[0]
    assert up.breaker.state == "open" and up.breaker.opens == 1
    assert any(f"upstream {hung.address} circuit open" in r.getMessage() for r in caplog.records), caplog.text

    for _ in range(10):
        await send_one(h.port())
    await sink.wait_for(11)
    assert hung.accepted == 1, "while open, the hung upstream got no connection attempt"
    relayed = [r for r in h.log_records() if r.get("decision") == "relayed"]
    assert len(relayed) == 11
    assert "upstreams_skipped" not in relayed[0], relayed[0]     # the first one tried it (and failed over)
    for rec in relayed[1:]:
        assert rec["upstream"] == f"127.0.0.1:{sink.port}" and rec["upstreams_skipped"] == [hung.address], rec
        assert ("relay", "pass", f"upstream 127.0.0.1:{sink.port} ({hung.address} skipped: circuit open)") in [
            (o["check"], o["result"], o.get("detail")) for o in rec["ledger"]], rec["ledger"]

    text = h.gw.metrics.render().decode()
    assert metric(text, "gateway_upstream_state", hung.address) == 2.0          # open
    assert metric(text, "gateway_upstream_state", f"127.0.0.1:{sink.port}") == 0.0
    assert metric(text, "gateway_upstream_skipped_total", hung.address) == 10.0
    assert metric(text, "gateway_upstream_breaker_opens_total", hung.address) == 1.0
    assert metric(text, "gateway_upstream_consecutive_failures", hung.address) == 1.0
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{h.gw.http_port}", timeout=10) as http:
        r = await http.get("/readyz")
    body = r.json()
    assert r.status_code == 200 and body["status"] == "ready", body     # upstream 2 is closed
    assert body["upstreams"][hung.address]["state"] == "open", body
    assert body["upstreams"][f"127.0.0.1:{sink.port}"]["state"] == "closed", body


async def test_probe_after_the_backoff_reopens_longer_then_closes(sink, hung, gateway_factory):
    h = await gateway_factory(sink, relay=two_upstreams(hung.port, sink, breaker_backoff=0.2,
                                                        breaker_backoff_max=5.0))
    await h.add_account()
    breaker = h.gw.relay.upstreams[0].breaker
    await send_one(h.port())
    assert hung.accepted == 1 and breaker.state == "open" and breaker.backoff == 0.2
    # After the back-off a background probe connects (no message needed); it
    # times out too, so the breaker opens again with the doubled back-off.
    await eventually(lambda: hung.accepted == 2, "the first probe")
    await eventually(lambda: breaker.opens == 2, "the failed probe re-opens the breaker")
    assert breaker.state == "open" and breaker.backoff == 0.4
    # The upstream comes back: the next probe reaches it and closes the breaker.
    await hung.set_mode("pass")
    await eventually(lambda: breaker.state == "closed", "a probe closes the breaker", timeout=15)
    assert breaker.consecutive_failures == 0
    probes = hung.accepted
    await send_one(h.port())
    await sink.wait_for(2)
    rec = [r for r in h.log_records() if r.get("decision") == "relayed"][-1]
    assert rec["upstream"] == hung.address and "upstreams_skipped" not in rec, rec
    assert hung.accepted == probes, "the message reused the probe's connection"


class Dropper:
    """An upstream that greets and then closes the connection at once."""

    def __init__(self):
        self.accepted = 0
        self.server = None

    async def start(self) -> "Dropper":
        async def handle(reader, writer):
            self.accepted += 1
            writer.write(b"220 dropper.test ESMTP\r\n")
            await writer.drain()
            writer.close()
        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self.server.close()
        await asyncio.wait_for(self.server.wait_closed(), 5)


async def test_upstream_dropping_after_greeting_opens_after_k_failures(sink, gateway_factory):
    dropper = await Dropper().start()
    try:
        h = await gateway_factory(sink, relay={
            "upstreams": [{"host": "127.0.0.1", "port": dropper.port}, {"host": "127.0.0.1", "port": sink.port}],
            "breaker_failures": 2, "breaker_backoff": 300.0})
        await h.add_account()
        breaker = h.gw.relay.upstreams[0].breaker
        await send_one(h.port())
        assert dropper.accepted == 1 and breaker.state == "closed" and breaker.consecutive_failures == 1
        await send_one(h.port())
        assert dropper.accepted == 2 and breaker.state == "open"
        for _ in range(5):
            await send_one(h.port())
        await sink.wait_for(7)
        assert dropper.accepted == 2, "exactly K attempts, none while open"
        assert breaker.skipped == 5
    finally:
        await dropper.stop()


async def test_all_open_still_tries_the_upstream_whose_backoff_ends_first(sink, gateway_factory):
    proxy = await FaultProxy("127.0.0.1", sink.port).start()
    try:
        await proxy.set_mode("cut")           # refused connections
        h = await gateway_factory(sink, relay={
            "upstreams": [{"host": "127.0.0.1", "port": proxy.port, "connect_timeout": TIMEOUT}],
            "breaker_failures": 1, "breaker_backoff": 300.0}, http={"enabled": True, "port": 0})
        await h.add_account()
        c = await send(h.port())
        await c.mail("alice@example.com")
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as err:
            await c.rcpt("bob@example.org")
        assert err.value.code == 451 and err.value.message.startswith("4.4.1")
        await c.quit()
        breaker = h.gw.relay.upstreams[0].breaker
        assert breaker.state == "open"
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{h.gw.http_port}", timeout=10) as http:
            r = await http.get("/readyz")
            assert (r.status_code, r.json()["status"]) == (503, "no_upstream"), r.json()
            # The upstream is back before the breaker knows: the message is relayed anyway.
            await proxy.set_mode("pass")
            await send_one(h.port())
            await sink.wait_for(1)
            assert breaker.state == "closed"
            r = await http.get("/readyz")
            assert (r.status_code, r.json()["status"]) == (200, "ready"), r.json()
    finally:
        await proxy.stop()
