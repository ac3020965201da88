"""Health, readiness and metrics over real HTTP."""
from __future__ import annotations

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
