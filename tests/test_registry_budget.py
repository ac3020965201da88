"""The per-account budget of confirmation (double opt-in) mails, over real
sockets: the HTTP API, the confirmation mails through the relay to the test
upstream (sent, or held back), the outbox after the window turns, other
accounts unaffected, two gateways sharing one budget. SQLite and PostgreSQL
(a fresh database per test; skips visibly without a server, fails under CI=true).

The gateways run on an injected clock that starts just after a window
boundary, so a test never straddles one by accident, and "the window turns"
is a step of that clock, not a wait.
"""
from __future__ import annotations

import asyncio
import logging

import httpx
import pytest

from gateway.app import Gateway
from gateway.config import ConfigError, from_mapping
from gateway.registry.settings import RegistrySettings
from test_registry_http import ADMIN, _auth, _link, _new_list, _stats
from conftest import WindowClock

SECRET = "budget-test-registry-secret-0123456789"
WINDOW = 3600.0
BUDGET = 3
TICK = 0.2          # outbox_interval of these tests


@pytest.fixture
def start(gateway_factory, tmp_path, storage_url):
    """start(sink, clock, **registry) -> a running Gateway on ``storage_url``."""
    made = []

    async def make(sink, clock, **registry) -> Gateway:
        h = await gateway_factory(
            sink, clock=clock, http={"enabled": True, "port": 0, "admin_key": ADMIN}, storage={"url": storage_url},
            log={"transactions": str(tmp_path / f"transactions-{len(made)}.jsonl")},
            registry={"secret": SECRET, "public_base_url": "http://gw.test.invalid:8025", "outbox_interval": TICK,
                      "confirmations_per_account": BUDGET, "confirmation_window": WINDOW, **registry})
        made.append(h.gw)
        return h.gw

    return make


async def _accounts(gw: Gateway) -> dict[str, str]:
    """alice (example.com) and mallory (example.net); their API keys."""
    keys = {}
    for name, domain in (("alice", "example.com"), ("mallory", "example.net")):
        await gw.accounts.add(name, "s3cret", contact=f"ops@{domain}")
        await gw.accounts.add_domain(name, domain, approved_by="test")
        keys[name] = await gw.registry.issue_api_key(name)
    return keys


def _client(gw: Gateway) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.http_port}", timeout=10)


async def _mallory_list(c, key) -> dict:
    return await _new_list(c, key, name="Net News", list_id="news.example.net", senders=["news@example.net"],
                           confirm_from="confirm@example.net")


def _to(sink, domain: str) -> list[str]:
    return [m.rcpt_tos[0] for m in sink.messages if m.rcpt_tos[0].endswith("@" + domain)]


async def _held_back(sink, count: int, cycles: int = 5) -> None:
    """Nothing beyond ``count`` arrives during a few outbox cycles (bounded)."""
    await asyncio.sleep(cycles * TICK + 0.1)
    assert len(sink.messages) == count, [m.rcpt_tos for m in sink.messages]


# ------------------------------------------------------------------ settings
def test_budget_settings_are_validated():
    s = RegistrySettings()
    assert s.confirmations_per_account == 500 and s.confirmation_window == 3600.0
    RegistrySettings(confirmations_per_account=0)          # 0: no budget
    with pytest.raises(ValueError, match="confirmations_per_account"):
        RegistrySettings(confirmations_per_account=-1)
    with pytest.raises(ValueError, match="confirmation_window"):
        RegistrySettings(confirmation_window=0.5)
    data = {"relay": {"upstreams": [{"host": "127.0.0.1", "port": 25}]},
            "registry": {"confirmations_per_account": -5}}
    with pytest.raises(ConfigError) as err:
        from_mapping(data, "<t>")
    assert err.value.key == "registry.confirmations_per_account"


# ------------------------------------------------------------------ single adds, resend, window turn
async def test_single_adds_beyond_budget_are_queued_then_sent(start, sink, caplog):
    clock = WindowClock(WINDOW)
    gw = await start(sink, clock)
    keys = await _accounts(gw)
    alice, mallory = keys["alice"], keys["mallory"]
    async with _client(gw) as c:
        lid = (await _new_list(c, alice))["id"]
        with caplog.at_level(logging.WARNING, logger="gateway.registry"):
            answers = []
            for i in range(5):
                r = await c.post(f"/api/v1/lists/{lid}/subscribers", headers=_auth(alice),
                                 json={"address": f"s{i}@example.org", "source": "signup form"})
                assert r.status_code == 202, r.text
                assert r.json()["status"] == "pending"
                answers.append(r.json()["confirmation"])
            assert answers == ["sent"] * 3 + ["queued"] * 2
            await sink.wait_for(3)
            await _held_back(sink, 3)
            assert _to(sink, "example.org") == ["s0@example.org", "s1@example.org", "s2@example.org"]
            r = await c.get(f"/api/v1/lists/{lid}/subscribers/s4@example.org", headers=_auth(alice))
            assert r.json()["confirmation"] == "queued" and r.json()["confirmation_mails"] == 0, r.text
            assert (await _stats(c, alice, lid, {"sent": 3, "queued": 2}))["confirmation_mails"] == \
                {"sent": 3, "queued": 2}

            # resend over budget: refused clearly, nothing sent, nothing counted
            r = await c.post(f"/api/v1/lists/{lid}/subscribers/resend", headers=_auth(alice),
                             json={"address": "s4@example.org"})
            assert r.status_code == 429, r.text
            assert r.json()["error"] == "rate_limited" and "budget" in r.json()["reason"]
            assert WINDOW - 60 < int(r.headers["Retry-After"]) <= WINDOW
            r = await c.get(f"/api/v1/lists/{lid}/subscribers/s4@example.org", headers=_auth(alice))
            assert r.json()["confirmation"] == "queued" and r.json()["confirmation_mails"] == 0

            # another account is unaffected (its own budget)
            mid = (await _mallory_list(c, mallory))["id"]
            for i in range(2):
                r = await c.post(f"/api/v1/lists/{mid}/subscribers", headers=_auth(mallory),
                                 json={"address": f"m{i}@example.org"})
                assert r.json()["confirmation"] == "sent", r.text
            await sink.wait_for(5)
        warnings = [r for r in caplog.records if "budget" in r.getMessage()]
        assert len(warnings) == 1 and "alice" in warnings[0].getMessage(), [r.getMessage() for r in warnings]
        text = gw.metrics.render().decode()
        assert 'gateway_registry_confirmations_total{outcome="deferred"} 3.0' in text, text
        assert "gateway_registry_confirmation_budget_exhausted_total 1.0" in text

        # the window turns: the outbox sends the queued ones, links work
        clock.next_window()
        await sink.wait_for(7, timeout=5)
        assert sorted(_to(sink, "example.org"))[-2:] == ["s3@example.org", "s4@example.org"]
        stats = await _stats(c, alice, lid, {"sent": 5})
        assert stats["confirmation_mails"] == {"sent": 5}, stats
        r = await c.get(f"/api/v1/lists/{lid}/subscribers/s4@example.org", headers=_auth(alice))
        assert r.json()["confirmation_mails"] == 1
        r = await c.post(_link(sink, "s4@example.org"))
        assert r.status_code == 200 and "confirmed" in r.text.lower()
        # the new window's budget: 1 of 3 left after the two queued mails
        r = await c.post(f"/api/v1/lists/{lid}/subscribers", headers=_auth(alice), json={"address": "s5@example.org"})
        assert r.json()["confirmation"] == "sent"
        r = await c.post(f"/api/v1/lists/{lid}/subscribers", headers=_auth(alice), json={"address": "s6@example.org"})
        assert r.json()["confirmation"] == "queued"


# ------------------------------------------------------------------ bulk import, outbox
async def test_bulk_import_beyond_budget_sends_only_the_budget(start, sink):
    clock = WindowClock(WINDOW)
    gw = await start(sink, clock)
    keys = await _accounts(gw)
    alice, mallory = keys["alice"], keys["mallory"]
    async with _client(gw) as c:
        lid = (await _new_list(c, alice))["id"]
        rows = [{"address": f"b{i}@example.org"} for i in range(10)]
        r = await c.post(f"/api/v1/lists/{lid}/subscribers/import", headers=_auth(alice),
                         json={"subscribers": rows, "source": "bought list"})
        assert r.status_code == 202 and r.json()["queued"] == 10, r.text
        assert {x["result"] for x in r.json()["results"]} == {"queued"}
        await sink.wait_for(3)
        await _held_back(sink, 3)
        stats = await _stats(c, alice, lid, {"sent": 3, "queued": 7})
        assert stats["confirmation_mails"] == {"sent": 3, "queued": 7}, stats
        # held-back rows count no send attempt
        page = (await c.get(f"/api/v1/lists/{lid}/subscribers", headers=_auth(alice))).json()["subscribers"]
        assert sorted(s["confirmation_mails"] for s in page) == [0] * 7 + [1] * 3

        # the outbox leaves the exhausted account alone until the window turns:
        # no reservation attempts, no claims (no spinning, no writes)
        store = gw.registry.store
        calls = []
        real_reserve = store._reserve

        async def counting_reserve(conn, account_id, budget, now):
            calls.append(account_id)
            return await real_reserve(conn, account_id, budget, now)

        store._reserve = counting_reserve
        await asyncio.sleep(5 * TICK + 0.1)
        assert calls == []

        # another account's import behind alice's 7 queued rows goes out at once
        mid = (await _mallory_list(c, mallory))["id"]
        r = await c.post(f"/api/v1/lists/{mid}/subscribers/import", headers=_auth(mallory),
                         json={"subscribers": [{"address": "n1@example.org"}, {"address": "n2@example.org"}]})
        assert r.json()["queued"] == 2
        await sink.wait_for(5)
        assert sorted(_to(sink, "example.org")[3:]) == ["n1@example.org", "n2@example.org"]
        await _held_back(sink, 5)

        # next window: exactly the budget again
        clock.next_window()
        await sink.wait_for(8)
        await _held_back(sink, 8)
        stats = await _stats(c, alice, lid, {"sent": 6, "queued": 4})
        assert stats["confirmation_mails"] == {"sent": 6, "queued": 4}, stats
        assert len(set(_to(sink, "example.org"))) == 8


async def test_zero_means_no_budget(start, sink):
    gw = await start(sink, WindowClock(WINDOW), confirmations_per_account=0)
    keys = await _accounts(gw)
    async with _client(gw) as c:
        lid = (await _new_list(c, keys["alice"]))["id"]
        r = await c.post(f"/api/v1/lists/{lid}/subscribers/import", headers=_auth(keys["alice"]),
                         json={"subscribers": [{"address": f"z{i}@example.org"} for i in range(6)]})
        assert r.json()["queued"] == 6
        await sink.wait_for(6)
        r = await c.post(f"/api/v1/lists/{lid}/subscribers", headers=_auth(keys["alice"]),
                         json={"address": "z9@example.org"})
        assert r.json()["confirmation"] == "sent"


# ------------------------------------------------------------------ several gateways, one budget
async def test_gateways_sharing_the_database_share_the_budget(start, sink, storage_url):
    clock = WindowClock(WINDOW)
    # Six concurrent budget takes by two gateways on one SQLite file wait for its write lock in turn:
    # the database deadline is widened so a loaded machine does not turn the wait into a 503.
    gw_a = await start(sink, clock, lookup_timeout=15.0)
    gw_b = await start(sink, clock, lookup_timeout=15.0)
    keys = await _accounts(gw_a)
    alice = keys["alice"]
    async with _client(gw_a) as a, _client(gw_b) as b:
        lid = (await _new_list(a, alice))["id"]

        async def add(client, i):
            r = await client.post(f"/api/v1/lists/{lid}/subscribers", headers=_auth(alice),
                                  json={"address": f"g{i}@example.org"})
            assert r.status_code == 202, r.text
            return r.json()["confirmation"]

        answers = await asyncio.gather(*(add(a if i % 2 else b, i) for i in range(6)))
        assert sorted(answers) == ["queued"] * 3 + ["sent"] * 3, answers
        await sink.wait_for(3)
        await _held_back(sink, 3)
        # both outboxes run; after the window turns each queued mail goes out once
        clock.next_window()
        await sink.wait_for(6)
        await _held_back(sink, 6)
        assert sorted(_to(sink, "example.org")) == [f"g{i}@example.org" for i in range(6)]
