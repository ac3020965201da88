"""Health, readiness and metrics over real HTTP."""
from __future__ import annotations

import signal
import threading

import aiosmtplib
import httpx

from conftest import MESSAGE


async def test_health_ready_and_metrics(sink, gateway_factory):
    h = await gateway_factory(sink, http={"enabled": True, "port": 0})
    await h.add_account()
    base = f"http://127.0.0.1:{h.gw.http_port}"
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        assert (await http.get("/readyz")).status_code == 200
        c = aiosmtplib.SMTP(hostname="127.0.0.1", port=h.port(), timeout=10)
        await c.connect()
        await c.login("alice", "s3cret")
        await c.sendmail("alice@example.com", ["bob@example.org"], MESSAGE)
        await c.quit()
        text = (await http.get("/metrics")).text
        assert 'gateway_transactions_total{decision="relayed"} 1.0' in text
        assert 'gateway_check_outcomes_total{check="rcpt_relay",result="pass"} 1.0' in text
        assert 'gateway_auth_total{outcome="success"} 1.0' in text
        assert "gateway_dns_lookups_total" in text and 'gateway_dns_lookups_total{source="static"}' in text
        assert 'gateway_upstream_connections_total{event="connections_opened"} 1.0' in text
        assert "gateway_transaction_seconds_bucket" in text
        h.gw.draining = True  # what SIGTERM sets first
        r = await http.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "draining"
        h.gw.draining = False


async def test_the_http_server_leaves_the_signal_handlers_alone(sink, gateway_factory):
    """SIGTERM and SIGINT are the gateway's (cli.py installs its handlers after
    start()): uvicorn neither takes them while it serves nor puts its own
    earlier ones back when it stops, which would let a second SIGTERM during
    the shutdown steps kill the process."""
    assert threading.current_thread() is threading.main_thread()   # the only thread uvicorn touches signals from
    sigs = (signal.SIGTERM, signal.SIGINT)
    before = {s: signal.getsignal(s) for s in sigs}
    h = await gateway_factory(sink, http={"enabled": True, "port": 0})
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{h.gw.http_port}", timeout=10) as http:
        assert (await http.get("/healthz")).status_code == 200    # uvicorn is serving
    assert {s: signal.getsignal(s) for s in sigs} == before

    def owner(signum, frame):   # what cli.py's handler stands for
        pass

    try:
        for s in sigs:
            signal.signal(s, owner)
        await h.gw.stop(grace=0.5)
        assert {s: signal.getsignal(s) for s in sigs} == {s: owner for s in sigs}
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
