"""The registry over real sockets: the HTTP API, the confirmation mail through
the relay to the test upstream, the pages, and invalidation across two
gateway processes sharing PostgreSQL."""
from __future__ import annotations

import asyncio
import email
import email.policy
import re
import time

import httpx
import pytest

from test_registry_store import _assert_nowhere

SECRET = "http-test-registry-secret-0123456789"
ADMIN = "admin-key-for-tests-0123456789"


def _registry(**kw):
    return {"secret": SECRET, "public_base_url": "http://gw.test.invalid:8025", "outbox_interval": 0.2, **kw}


async def _start(gateway_factory, sink, **sections):
    h = await gateway_factory(sink, http={"enabled": True, "port": 0, "admin_key": ADMIN},
                              registry=_registry(**sections.pop("registry", {})), **sections)
    await h.add_account("alice", domains=("example.com",))
    await h.add_account("mallory", domains=("example.net",))
    base = f"http://127.0.0.1:{h.gw.http_port}"
    return h, base


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _link(sink, to: str, kind: str = "confirm", *, full: bool = False) -> str:
    """The path (with ``full``: the whole URL) of the ``kind`` link in the
    newest mail the upstream got for ``to``."""
    for received in reversed(sink.messages):
        if to in received.rcpt_tos:
            msg = email.message_from_bytes(received.data, policy=email.policy.default)
            m = re.search(rf"https?://[^/\s]+(/{kind}/[a-z2-7]+)", msg.get_content())
            assert m, msg.get_content()
            return m.group(0) if full else m.group(1)
    raise AssertionError(f"no mail to {to}")


async def _new_list(client, key, **kw) -> dict:
    body = {"name": "Example News", "list_id": "news.example.com", "senders": ["news@example.com"],
            "confirm_from": "confirm@example.com", **kw}
    r = await client.post("/api/v1/lists", json=body, headers=_auth(key))
    assert r.status_code == 201, r.text
    return r.json()


async def _stats(c, key, lid, want: dict, timeout: float = 5.0) -> dict:
    """The list's stats once its ``confirmation_mails`` are ``want`` (or when
    ``timeout`` has passed: the caller's assertion then shows what they were)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = (await c.get(f"/api/v1/lists/{lid}/stats", headers=_auth(key))).json()
        if stats["confirmation_mails"] == want or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.05)


async def test_subscriber_life_through_http(gateway_factory, sink):
    h, base = await _start(gateway_factory, sink)
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        r = await c.post("/api/v1/admin/accounts/alice/api-keys", json={"label": "t"}, headers=_auth(ADMIN))
        assert r.status_code == 201, r.text
        key = r.json()["api_key"]
        lst = await _new_list(c, key)
        lid = lst["id"]
        assert re.fullmatch(r"[0-9a-f]{16}", lid)

        # add -> pending, the confirmation mail goes out through the relay
        r = await c.post(f"/api/v1/lists/{lid}/subscribers", headers=_auth(key), json={
            "address": "Bob@Example.ORG", "source": "signup form https://example.com/news",
            "ip": "198.51.100.23", "user_agent": "Mozilla/5.0 (test)"})
        assert r.status_code == 202, r.text
        assert r.json()["status"] == "pending" and r.json()["confirmation"] == "sent"
        await sink.wait_for(1)
        mail = sink.messages[-1]
        assert mail.mail_from == "confirm@example.com" and mail.rcpt_tos == ["Bob@example.org"]
        msg = email.message_from_bytes(mail.data, policy=email.policy.default)
        assert "Example News" in msg["Subject"] and msg["Message-ID"] and msg["Date"]
        assert msg.get_content_type() == "text/plain" and msg.get_content_charset() == "utf-8"
        path = _link(sink, "Bob@example.org")

        # GET shows a page with a button and confirms nothing (link scanners)
        for _ in range(3):
            r = await c.get(path)
            assert r.status_code == 200 and "<form method=\"post\"" in r.text and "<button" in r.text
        assert "Bob@example.org" not in r.text            # masked on a page anyone with the link sees
        r = await c.get(f"/api/v1/lists/{lid}/recipient-status", params={"address": "Bob@example.org"},
                        headers=_auth(key))
        assert r.json()["status"] == "pending"

        # POST confirms; the consent evidence is kept
        r = await c.post(path, headers={"User-Agent": "BobsBrowser/1.0"})
        assert r.status_code == 200 and "confirmed" in r.text.lower()
        r = await c.get(f"/api/v1/lists/{lid}/recipient-status", params={"address": "Bob@EXAMPLE.org"},
                        headers=_auth(key))
        assert r.json()["status"] == "confirmed"
        r = await c.get(f"/api/v1/lists/{lid}/subscribers/Bob@example.org", headers=_auth(key))
        assert r.status_code == 200, r.text
        consent = r.json()["consent"]
        assert consent["requested_ip"] == "198.51.100.23" and consent["confirmed_ip"] == "127.0.0.1"
        assert consent["confirmed_user_agent"] == "BobsBrowser/1.0"
        assert consent["source"].startswith("signup form")
        r = await c.get(f"/api/v1/lists/{lid}/subscribers/export", params={"format": "csv"}, headers=_auth(key))
        assert r.status_code == 200 and "Bob@example.org" in r.text and "BobsBrowser/1.0" in r.text
        r = await c.get(f"/api/v1/lists/{lid}/stats", headers=_auth(key))
        assert r.json()["confirmed"] == 1

        # the headers the SMTP side injects; RFC 8058 one-click POST unsubscribes
        lst_obj = await h.gw.registry.get_list("alice", lid)
        headers = dict(h.gw.registry.list_headers(lst_obj, "Bob@example.org"))
        assert headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert headers["List-Id"] == '"Example News" <news.example.com>'
        upath = re.search(r"<https?://[^/]+(/unsubscribe/[a-z2-7]+)>", headers["List-Unsubscribe"]).group(1)
        r = await c.get(upath)
        assert r.status_code == 200 and "<button" in r.text
        r = await c.get(f"/api/v1/lists/{lid}/recipient-status", params={"address": "Bob@example.org"},
                        headers=_auth(key))
        assert r.json()["status"] == "confirmed"           # the GET page unsubscribed nothing
        for _ in range(2):                                 # idempotent
            r = await c.post(upath, content=b"List-Unsubscribe=One-Click",
                             headers={"Content-Type": "application/x-www-form-urlencoded"})
            assert r.status_code == 200 and "unsubscribed" in r.text.lower()
        r = await c.get(f"/api/v1/lists/{lid}/recipient-status", params={"address": "Bob@example.org"},
                        headers=_auth(key))
        assert r.json()["status"] == "unsubscribed"
        r = await c.get(f"/api/v1/lists/{lid}/subscribers/Bob@example.org", headers=_auth(key))
        assert r.status_code == 404 and r.json()["error"] == "unsubscribed"

        # the database holds no copy of the address, in any table, in any case
        await _assert_nowhere(h.gw.engine, ["bob@example.org"])

        # re-adding is refused with a clear reason ...
        r = await c.post(f"/api/v1/lists/{lid}/subscribers", headers=_auth(key),
                         json={"address": "Bob@example.org", "source": "again"})
        assert r.status_code == 409, r.text
        assert r.json()["error"] == "suppressed" and r.json()["field"] == "address"
        assert "opt-in" in r.json()["reason"]
        # ... unless a new double opt-in starts, and only its confirmation subscribes again
        count = len(sink.messages)
        r = await c.post(f"/api/v1/lists/{lid}/subscribers", headers=_auth(key),
                         json={"address": "Bob@example.org", "source": "came back", "reoptin": True})
        assert r.status_code == 202, r.text
        await sink.wait_for(count + 1)
        new_path = _link(sink, "Bob@example.org")
        assert new_path != path
        r = await c.post(path)                              # the old link does not work
        assert r.status_code == 400
        r = await c.get(f"/api/v1/lists/{lid}/recipient-status", params={"address": "Bob@example.org"},
                        headers=_auth(key))
        assert r.json()["status"] == "pending"
        r = await c.post(new_path)
        assert r.status_code == 200
        r = await c.get(f"/api/v1/lists/{lid}/recipient-status", params={"address": "Bob@example.org"},
                        headers=_auth(key))
        assert r.json()["status"] == "confirmed"

        # the page route of an unsubscribe (button) works the same way
        r = await c.post(upath, data={"List-Unsubscribe": "One-Click"})
        assert r.status_code == 200
        r = await c.get(upath)
        assert "You are unsubscribed" in r.text


async def test_cross_account_access_is_404(gateway_factory, sink):
    h, base = await _start(gateway_factory, sink)
    alice = await h.gw.registry.issue_api_key("alice")
    mallory = await h.gw.registry.issue_api_key("mallory")
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        lst = await _new_list(c, alice)
        r = await c.post(f"/api/v1/lists/{lst['id']}/subscribers", headers=_auth(alice),
                         json={"address": "carol@example.org"})
        assert r.status_code == 202
        missing = "0123456789abcdef"
        for method, suffix, body in [("GET", "", None), ("DELETE", "", None), ("GET", "/subscribers", None),
                                     ("GET", "/subscribers/carol@example.org", None),
                                     ("DELETE", "/subscribers/carol@example.org", None),
                                     ("POST", "/subscribers", {"address": "carol@example.org"}),
                                     ("POST", "/subscribers/import", {"subscribers": [{"address": "x@example.org"}]}),
                                     ("GET", "/stats", None), ("GET", "/subscribers/export", None),
                                     ("GET", "/recipient-status?address=carol@example.org", None)]:
            theirs = await c.request(method, f"/api/v1/lists/{lst['id']}{suffix}", json=body, headers=_auth(mallory))
            none = await c.request(method, f"/api/v1/lists/{missing}{suffix}", json=body, headers=_auth(mallory))
            assert theirs.status_code == none.status_code == 404, (method, suffix, theirs.text)
            assert theirs.json() == none.json()
        r = await c.get("/api/v1/lists", headers=_auth(mallory))
        assert r.json() == {"lists": []}
        # the owner still has everything
        r = await c.get(f"/api/v1/lists/{lst['id']}/subscribers", headers=_auth(alice))
        assert [s["address"] for s in r.json()["subscribers"]] == ["carol@example.org"]
        # no key, a wrong key: 401
        assert (await c.get("/api/v1/lists")).status_code == 401
        assert (await c.get("/api/v1/lists", headers=_auth("gwk_nope"))).status_code == 401
        # an account key is not an admin key
        r = await c.post("/api/v1/admin/accounts/alice/api-keys", headers=_auth(alice))
        assert r.status_code == 403


async def test_validation_errors_name_the_field(gateway_factory, sink):
    h, base = await _start(gateway_factory, sink)
    key = await h.gw.registry.issue_api_key("alice")
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        cases = [
            ({"name": "N", "list_id": "news.example.com", "senders": ["news@example.com"]}, "confirm_from"),
            ({"name": "N", "list_id": "nodots", "senders": ["news@example.com"],
              "confirm_from": "c@example.com"}, "list_id"),
            ({"name": "N", "list_id": "n.example.com", "senders": ["news@example.com", "bad address"],
              "confirm_from": "c@example.com"}, "senders[1]"),
            ({"name": "N", "list_id": "n.example.com", "senders": ["news@not-ours.example.org"],
              "confirm_from": "c@example.com"}, "senders[0]"),
            ({"name": "N", "list_id": "n.example.com", "senders": [], "confirm_from": "c@example.com"}, "senders"),
            ({"name": "N", "list_id": "n.example.com", "senders": ["a@example.com"], "confirm_from": "c@example.com",
              "colour": "blue"}, "colour"),
        ]
        for body, field in cases:
            r = await c.post("/api/v1/lists", json=body, headers=_auth(key))
            assert r.status_code == 422, (body, r.text)
            data = r.json()
            assert data["field"] == field, data
            assert data["reason"] and data["errors"][0]["field"] == field
        lst = await _new_list(c, key)
        for body, field in [({"address": "no-at-sign"}, "address"),
                            ({"address": "a@example.org", "ip": "300.1.2.3"}, "ip"),
                            ({"address": "a@example.org", "requested_at": time.time() + 86400}, "requested_at"),
                            ({}, "address")]:
            r = await c.post(f"/api/v1/lists/{lst['id']}/subscribers", json=body, headers=_auth(key))
            assert r.status_code == 422 and r.json()["field"] == field, r.text
        r = await c.post(f"/api/v1/lists/{lst['id']}/subscribers/import", headers=_auth(key),
                         json={"subscribers": [{"address": "ok@example.org"}, {"address": "bad@@example.org"}]})
        # a bad row of an import is reported on its own; the good ones are imported (see test_registry_import)
        assert r.status_code == 202, r.text
        assert [(x["result"], x.get("field")) for x in r.json()["results"]] == [
            ("queued", None), ("invalid", "subscribers[1].address")], r.text
        r = await c.get(f"/api/v1/lists/{lst['id']}/subscribers", params={"limit": 0}, headers=_auth(key))
        assert r.status_code == 422 and r.json()["field"] == "limit"
        # the OpenAPI description includes the registry
        spec = (await c.get("/openapi.json")).json()
        assert "/api/v1/lists/{list_id}/subscribers" in spec["paths"]


async def test_forged_and_expired_links_get_a_page(gateway_factory, sink):
    h, base = await _start(gateway_factory, sink)
    key = await h.gw.registry.issue_api_key("alice")
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        lst = await _new_list(c, key)
        await c.post(f"/api/v1/lists/{lst['id']}/subscribers", headers=_auth(key), json={"address": "dan@example.org"})
        await sink.wait_for(1)
        path = _link(sink, "dan@example.org")
        forged = path[:-3] + ("aaa" if not path.endswith("aaa") else "bbb")
        for p in (forged, "/confirm/not-a-token", "/confirm/" + "a" * 72, "/unsubscribe/zzzz",
                  "/confirm/<script>alert(1)</script>"):
            for method in ("GET", "POST"):
                r = await c.request(method, p)
                assert r.status_code in (400, 404), (p, r.status_code)
                if r.status_code == 400:
                    assert r.headers["content-type"].startswith("text/html")
                    assert "not valid" in r.text and "Traceback" not in r.text and "<script>" not in r.text
        # expired: the gateway's clock moves past the TTL
        real = h.gw.registry.clock
        h.gw.registry.clock = lambda: real() + h.gw.registry.settings.confirm_token_ttl + 60
        try:
            for method in ("GET", "POST"):
                r = await c.request(method, path)
                assert r.status_code == 410 and "expired" in r.text
        finally:
            h.gw.registry.clock = real
        r = await c.get(f"/api/v1/lists/{lst['id']}/recipient-status", params={"address": "dan@example.org"},
                        headers=_auth(key))
        assert r.json()["status"] == "pending"
        # resending is rate-limited
        r = await c.post(f"/api/v1/lists/{lst['id']}/subscribers/resend", headers=_auth(key),
                         json={"address": "dan@example.org"})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0


async def test_bulk_import_sends_queued_confirmations(gateway_factory, sink):
    h, base = await _start(gateway_factory, sink)
    key = await h.gw.registry.issue_api_key("alice")
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        lst = await _new_list(c, key)
        rows = [{"address": f"u{i}@example.org", "ip": "192.0.2.1"} for i in range(12)]
        r = await c.post(f"/api/v1/lists/{lst['id']}/subscribers/import", headers=_auth(key),
                         json={"subscribers": rows, "source": "old newsletter"})
        assert r.status_code == 202 and r.json()["queued"] == 12, r.text
        await sink.wait_for(12, timeout=10)
        assert {m.rcpt_tos[0] for m in sink.messages} == {f"u{i}@example.org" for i in range(12)}
        stats = await _stats(c, key, lst["id"], {"sent": 12})
        assert stats == {"confirmed": 0, "pending": 12, "unsubscribed": 0, "confirmation_mails": {"sent": 12}}
        r = await c.get(f"/api/v1/lists/{lst['id']}/subscribers/export", params={"format": "ndjson"},
                        headers=_auth(key))
        lines = [ln for ln in r.text.splitlines() if ln]
        assert len(lines) == 12 and '"source":"old newsletter"' in lines[0]


async def test_confirmation_mail_never_shows_the_source(gateway_factory, sink):
    """``source`` is the customer's internal note (consent evidence for the API
    and exports): the confirmation mail that reaches the upstream, sent at once
    (single add), again (resend) or by the outbox (import), shows none of it."""
    h, base = await _start(gateway_factory, sink, registry={"resend_interval": 0.001})
    key = await h.gw.registry.issue_api_key("alice")
    notes = {"single@example.org": "crm-segment-7 bought-list-q3 internal-only",   # words that are all distinctive
             "imported@example.org": "leads-2025.csv jim-from-sales",
             "default@example.org": "defaultnote-zx9 reseller-batch"}
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        lid = (await _new_list(c, key))["id"]
        r = await c.post(f"/api/v1/lists/{lid}/subscribers", headers=_auth(key),
                         json={"address": "single@example.org", "source": notes["single@example.org"]})
        assert r.status_code == 202 and r.json()["confirmation"] == "sent", r.text
        r = await c.post(f"/api/v1/lists/{lid}/subscribers/resend", headers=_auth(key),
                         json={"address": "single@example.org"})
        assert r.status_code == 202, r.text
        r = await c.post(f"/api/v1/lists/{lid}/subscribers/import", headers=_auth(key), json={
            "subscribers": [{"address": "imported@example.org", "source": notes["imported@example.org"]},
                            {"address": "default@example.org"}],
            "source": notes["default@example.org"]})
        assert r.status_code == 202 and r.json()["queued"] == 2, r.text
        await sink.wait_for(4, timeout=10)
        assert sorted(m.rcpt_tos[0] for m in sink.messages) == sorted(
            ["single@example.org", "single@example.org", "imported@example.org", "default@example.org"])
        for mail in sink.messages:
            msg = email.message_from_bytes(mail.data, policy=email.policy.default)
            text = msg.get_content()
            assert "/confirm/" in text and "Example News" in text          # it is the confirmation mail
            for note in notes.values():
                for word in (note, *note.split()):
                    assert word not in text and word.encode() not in mail.data, (word, text)
            assert "source" not in text.lower() and "came from" not in text
        # the note is still kept as consent evidence
        for address, note in notes.items():
            r = await c.get(f"/api/v1/lists/{lid}/subscribers/{address}", headers=_auth(key))
            assert r.status_code == 200 and r.json()["consent"]["source"] == note, r.text


async def test_missing_secret_is_a_clear_startup_error(gateway_factory, sink):
    from gateway.config import ConfigError

    with pytest.raises(ConfigError) as exc:
        await gateway_factory(sink, http={"enabled": True, "port": 0}, registry={"secret": ""})
    assert exc.value.key == "registry.secret"


# ------------------------------------------------------------------ two gateway processes on PostgreSQL
async def test_optout_reaches_another_gateway_process_within_1s(pg_url, sink, gateway_factory, gateway_b,
                                                                 tmp_path):
    """Gateway A (in this process) and gateway B (a real subprocess) share
    PostgreSQL. B caches "confirmed"; an opt-out through A's HTTP must change
    what B answers within 1 s (LISTEN/NOTIFY)."""
    h, base_a = await _start(gateway_factory, sink, storage={"url": pg_url})
    key = await h.gw.registry.issue_api_key("alice")
    cfg = tmp_path / "b.toml"
    cfg.write_text(f"""
[[listeners]]
name = "plain"
address = "127.0.0.1"
port = 0
tls = "none"

[smtp]
hostname = "gw-b.test"

[storage]
url = "{pg_url}"

[http]
enabled = true
address = "127.0.0.1"
port = 0

[registry]
secret = "env:GW_TEST_REGISTRY_SECRET"

[log]
transactions = "{tmp_path / 'b.jsonl'}"

[[relay.upstreams]]
host = "127.0.0.1"
port = {sink.port}
""")
    b = await gateway_b(cfg, env={"GW_TEST_REGISTRY_SECRET": SECRET})
    base_b = f"http://127.0.0.1:{b.http_port}"
    async with httpx.AsyncClient(timeout=5) as c:
        async with httpx.AsyncClient(base_url=base_a, timeout=5) as a:
            lst = await _new_list(a, key)
        lid = lst["id"]
        r = await c.post(f"{base_a}/api/v1/lists/{lid}/subscribers", headers=_auth(key),
                         json={"address": "eve@example.org"})
        assert r.status_code == 202
        await sink.wait_for(1)
        assert (await c.post(base_a + _link(sink, "eve@example.org"))).status_code == 200

        async def status_b() -> str:
            r = await c.get(f"{base_b}/api/v1/lists/{lid}/recipient-status",
                            params={"address": "eve@example.org"}, headers=_auth(key))
            assert r.status_code == 200, r.text
            return r.json()["status"]

        assert await status_b() == "confirmed"      # B has it cached now
        lst_obj = await h.gw.registry.get_list("alice", lid)
        upath = re.search(r"(/unsubscribe/[a-z2-7]+)", h.gw.registry.unsubscribe_url(lst_obj, "eve@example.org"))
        r = await c.post(base_a + upath.group(1), content=b"List-Unsubscribe=One-Click",
                         headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert r.status_code == 200
        t0 = time.monotonic()
        while (status := await status_b()) == "confirmed":
            assert time.monotonic() - t0 < 1.5, "gateway B still says confirmed after 1 s"
            await asyncio.sleep(0.01)
        assert status == "unsubscribed"
        assert time.monotonic() - t0 < 1.0 + 0.5
