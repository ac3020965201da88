"""Operator block lists (P-BLOCK): client IPs/CIDRs, sender domains, HELO and
reverse-DNS host names.

- the matchers and normalization, pure (no I/O)
- the store and the snapshot refresher on SQLite
- end to end through a real gateway: each kind refused over SMTP (client
  addresses claimed with PROXY headers), removal taking effect
- the HTTP admin API over real sockets (httpx) and the CLI as a real process
- two gateway processes sharing PostgreSQL: a change made through gateway A
  (admin API or CLI) takes effect on gateway B (a ``gateway serve``
  subprocess) within 1 s, and so does its removal
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from pathlib import Path

import httpx
import pytest

from conftest import MESSAGE, TEST_DNS, run_cli, run_cli_async
from dns_fixtures import live_dns
from smtp_client import cmd, proxied_session, raw_session, reply
from gateway.blocklist.matcher import Snapshot
from gateway.blocklist.model import BlockEntry, Conflict, Invalid, NotFound, normalize
from gateway.blocklist.service import BlockList
from gateway.storage.db import create_engine, migrate

REGISTRY_SECRET = "test-blocklist-registry-secret-0123456789"
PROPAGATION = 1.0          # the promise: every gateway within 1 s
MARGIN = 0.5               # probing and scheduling slack on a loaded machine



def entries(*specs: str) -> list[BlockEntry]:
    out = []
    for spec in specs:
        kind, value = spec.split(" ", 1)
        out.append(BlockEntry(kind, normalize(kind, value), reason="internal note"))
    return out


# ====================================================================== pure: normalize
@pytest.mark.parametrize("kind,value,expected", [
    ("ip", "192.0.2.7", "192.0.2.7/32"),
    ("ip", " 192.0.2.77/24 ", "192.0.2.0/24"),
    ("ip", "2001:DB8:BAD::1/48", "2001:db8:bad::/48"),
    ("ip", "2001:db8::1", "2001:db8::1/128"),
    ("ip", "::ffff:192.0.2.0/120", "192.0.2.0/24"),
    ("ip", "[192.0.2.1]", "192.0.2.1/32"),
    ("domain", "Bad.Example", "bad.example"),
    ("domain", "bad.example.", "bad.example"),
    ("domain", "bücher.example", "xn--bcher-kva.example"),
    ("hostname", "MX.Bad.Example", "mx.bad.example"),
    ("hostname", ".bad.example", ".bad.example"),
    ("hostname", "*.bad.example", ".bad.example"),
    ("hostname", "localhost", "localhost"),
])
def test_normalize(kind, value, expected):
    assert normalize(kind, value) == expected


@pytest.mark.parametrize("kind,value,field,words", [
    ("cidr", "192.0.2.1", "kind", "must be one of ip, domain, hostname"),
    ("ip", "192.0.2.300", "value", "not an IP address or CIDR"),
    ("ip", "0.0.0.0/0", "value", "every IPv4 address"),
    ("ip", "", "value", "non-empty"),
    ("domain", "a@bad.example", "value", "is an address"),
    ("domain", "*.bad.example", "value", "matches its subdomains already"),
    ("domain", "bad..example", "value", "empty label"),
    ("hostname", "1.2.3.4", "value", "use kind ip"),
    ("hostname", "bad_host.example", "value", "invalid domain label"),
    ("domain", 42, "value", "non-empty string"),
])
def test_normalize_rejects_with_field_and_reason(kind, value, field, words):
    with pytest.raises(Invalid) as err:
        normalize(kind, value)
    assert err.value.field == field
    assert words in err.value.reason, err.value.reason


def test_ip_matcher_cidr_v4_v6_and_most_specific():
    snap = Snapshot(entries("ip 192.0.2.0/24", "ip 192.0.2.7", "ip 10.0.0.0/8", "ip 2001:db8:bad::/48",
                            "ip 2001:db8::99"))
    assert snap.match_ip("192.0.2.7").value == "192.0.2.7/32"     # the most specific entry wins
    assert snap.match_ip("192.0.2.200").value == "192.0.2.0/24"
    assert snap.match_ip("10.255.1.2").value == "10.0.0.0/8"
    assert snap.match_ip("192.0.3.1") is None
    assert snap.match_ip("11.0.0.1") is None
    assert snap.match_ip("::ffff:192.0.2.9").value == "192.0.2.0/24"  # IPv4-mapped client address
    assert snap.match_ip("2001:db8:bad:ffff::1").value == "2001:db8:bad::/48"
    assert snap.match_ip("2001:db8:bae::1") is None
    assert snap.match_ip("2001:db8::99").value == "2001:db8::99/128"
    assert snap.match_ip("2001:db8::98") is None
    assert snap.match_ip("not an ip") is None
    assert Snapshot().match_ip("192.0.2.7") is None


def test_domain_matcher_includes_subdomains_only_at_label_boundaries():
    snap = Snapshot(entries("domain bad.example", "domain xn--bcher-kva.example"))
    assert snap.match_domain("bad.example").value == "bad.example"
    assert snap.match_domain("Mail.Sub.BAD.example").value == "bad.example"
    assert snap.match_domain("notbad.example") is None
    assert snap.match_domain("bad.example.org") is None
    assert snap.match_domain("example") is None
    assert snap.match_domain("bücher.example").value == "xn--bcher-kva.example"
    assert snap.match_domain("shop.xn--bcher-kva.example") is not None


def test_hostname_matcher_exact_and_suffix():
    snap = Snapshot(entries("hostname mx.bad.example", "hostname .dyn.isp.example"))
    assert snap.has_hostnames
    assert snap.match_hostname("mx.bad.example").value == "mx.bad.example"
    assert snap.match_hostname("MX.BAD.EXAMPLE.").value == "mx.bad.example"   # case, trailing dot
    assert snap.match_hostname("a.mx.bad.example") is None                    # exact means exact
    assert snap.match_hostname("bad.example") is None
    assert snap.match_hostname("h1.dyn.isp.example").value == ".dyn.isp.example"
    assert snap.match_hostname("a.b.dyn.isp.example").value == ".dyn.isp.example"
    assert snap.match_hostname("dyn.isp.example") is None                     # suffix: below it only
    assert snap.match_hostname("xdyn.isp.example") is None                    # label boundary
    assert snap.match_hostname("") is None
    assert not Snapshot(entries("ip 192.0.2.1")).has_hostnames


def test_snapshot_counts_kinds():
    snap = Snapshot(entries("ip 192.0.2.1", "ip 2001:db8::/32", "domain bad.example", "hostname .x.example"), 7)
    assert snap.counts() == {"ip": 2, "domain": 1, "hostname": 1}
    assert snap.version == 7 and len(snap) == 4


# ====================================================================== store and refresher (SQLite)
@pytest.fixture
async def engine(tmp_path):
    eng = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'bl.db'}")
    await migrate(eng)
    yield eng
    await eng.dispose()


async def test_store_add_remove_list_and_version(engine):
    bl = BlockList(engine, clock=lambda: 1000.0)
    await bl.start()
    try:
        assert bl.snapshot.version == 0 and len(bl.snapshot) == 0
        e = await bl.add("ip", "192.0.2.9/24", reason="spam run 2026-11", created_by="test")
        assert (e.kind, e.value, e.reason, e.created_by, e.created_at) == \
            ("ip", "192.0.2.0/24", "spam run 2026-11", "test", 1000.0)
        assert bl.snapshot.match_ip("192.0.2.1") is not None            # applied at once on this gateway
        with pytest.raises(Conflict):
            await bl.add("ip", "192.0.2.0/24")
        await bl.add("domain", "bad.example")
        await bl.add("hostname", ".bad.example")
        assert [x.value for x in await bl.list()] == ["bad.example", ".bad.example", "192.0.2.0/24"]
        assert [x.value for x in await bl.list("ip")] == ["192.0.2.0/24"]
        assert await bl.store.version() == 3
        removed = await bl.remove("ip", "192.0.2.0/24")
        assert removed.reason == "spam run 2026-11"
        assert bl.snapshot.match_ip("192.0.2.1") is None
        with pytest.raises(NotFound):
            await bl.remove("ip", "192.0.2.0/24")
        with pytest.raises(Invalid) as err:
            await bl.add("domain", "bad.example", reason="x" * 300)
        assert err.value.field == "reason"
        assert await bl.store.version() == 4
    finally:
        await bl.stop()


async def test_refresher_picks_up_another_writer_and_survives_db_errors(engine, tmp_path, caplog):
    reader = BlockList(engine, poll_interval=0.05)
    await reader.start()
    other = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'bl.db'}")   # as another process would
    writer = BlockList(other)
    try:
        await writer.store.add("domain", "bad.example")
        deadline = time.monotonic() + 2
        while reader.snapshot.match_domain("x.bad.example") is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert reader.snapshot.match_domain("x.bad.example") is not None

        # The database goes away: the last snapshot is still enforced, one warning is logged.
        real_version = reader.store.version

        async def broken():
            raise OSError("database unreachable")

        reader.store.version = broken
        with caplog.at_level(logging.WARNING, logger="gateway.blocklist"):
            await asyncio.sleep(0.3)
            assert reader.failing
            assert reader.snapshot.match_domain("x.bad.example") is not None
            assert sum("refresh failed" in r.message for r in caplog.records) == 1
            reader.store.version = real_version
            await writer.store.remove("domain", "bad.example")
            deadline = time.monotonic() + 2
            while reader.snapshot.match_domain("x.bad.example") is not None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        assert reader.snapshot.match_domain("x.bad.example") is None
        assert not reader.failing
        assert any("works again" in r.message for r in caplog.records)
    finally:
        await reader.stop()
        await other.dispose()


# ====================================================================== SMTP end to end
async def greeting(port: int, client_ip: str) -> bytes:
    reader, writer = await proxied_session(port, client_ip)
    try:
        return await reply(reader)
    finally:
        writer.close()


def proxy_listener() -> list[dict]:
    return [{"name": "plain", "address": "127.0.0.1", "port": 0, "tls": "none", "auth_without_tls": True,
             "proxy_protocol": True}]


async def test_client_ip_and_cidr_v4_v6_refused_at_connect_and_removal(sink, gateway_factory):
    h = await gateway_factory(sink, listeners=proxy_listener())
    bl = h.gw.blocklist
    assert (await greeting(h.port(), "192.0.2.7")).startswith(b"220 ")
    await bl.add("ip", "192.0.2.7", reason="customer complaint #4711")
    await bl.add("ip", "198.51.100.0/24")
    await bl.add("ip", "2001:db8:bad::/48")
    g = await greeting(h.port(), "192.0.2.7")
    assert g.startswith(b"554 5.7.1 P-BLOCK Client address is blocked"), g
    assert b"192.0.2.7/32" in g and b"4711" not in g            # names the entry, never the reason
    assert (await greeting(h.port(), "198.51.100.250")).startswith(b"554 5.7.1 P-BLOCK")
    assert (await greeting(h.port(), "::ffff:198.51.100.1")).startswith(b"554 5.7.1 P-BLOCK")
    assert (await greeting(h.port(), "2001:db8:bad:1::25")).startswith(b"554 5.7.1 P-BLOCK")
    assert (await greeting(h.port(), "2001:db8:600d::25")).startswith(b"220 ")
    assert (await greeting(h.port(), "192.0.2.8")).startswith(b"220 ")
    await bl.remove("ip", "192.0.2.7/32")
    await bl.remove("ip", "2001:db8:bad::/48")
    assert (await greeting(h.port(), "192.0.2.7")).startswith(b"220 ")
    assert (await greeting(h.port(), "2001:db8:bad:1::25")).startswith(b"220 ")
    refused = [r for r in h.log_records() if r["event"] == "session_refused"]
    assert refused[0]["client_ip"] == "192.0.2.7"
    detail = [o for o in refused[0]["ledger"] if o["check"] == "connect_blocklist"][0]["detail"]
    assert "customer complaint #4711" in detail                  # the reason is in the log


async def test_helo_exact_and_suffix(sink, gateway_factory):
    h = await gateway_factory(sink)
    await h.gw.blocklist.add("hostname", "mx.bad.example", reason="botnet")
    await h.gw.blocklist.add("hostname", ".spam.example")
    reader, writer, _ = await raw_session(h.port())
    r = await cmd(reader, writer, b"EHLO MX.bad.example")
    assert r.startswith(b"554 5.7.1 P-BLOCK HELO/EHLO host name is blocked"), r
    assert b"botnet" not in r
    # A refused greeting does not count as one.
    assert (await cmd(reader, writer, b"MAIL FROM:<alice@example.com>")).startswith(b"503 5.5.1")
    assert (await cmd(reader, writer, b"HELO a.b.spam.example")).startswith(b"554 5.7.1 P-BLOCK")
    assert (await cmd(reader, writer, b"EHLO spam.example")).startswith(b"250")      # suffix: below only
    assert (await cmd(reader, writer, b"EHLO other.mx.bad.example")).startswith(b"250")  # exact: only it
    assert (await cmd(reader, writer, b"EHLO [192.0.2.1]")).startswith(b"250")
    writer.close()
    await h.gw.blocklist.remove("hostname", "*.spam.example")
    reader, writer, _ = await raw_session(h.port())
    assert (await cmd(reader, writer, b"EHLO a.b.spam.example")).startswith(b"250")
    writer.close()


async def test_sender_domain_and_subdomains(sink, gateway_factory):
    h = await gateway_factory(sink)
    await h.add_account(domains=("example.com", "attacker.example"))
    await h.gw.accounts.update("alice", allow_subdomains=True)   # P-FORGE would refuse mail.attacker.example
    await h.gw.blocklist.add("domain", "attacker.example", reason="phishing kit")
    reader, writer, _ = await raw_session(h.port())
    await cmd(reader, writer, b"EHLO client.example.com")
    assert (await cmd(reader, writer, b"AUTH PLAIN AGFsaWNlAHMzY3JldA==")).startswith(b"235")
    for sender in (b"a@attacker.example", b"a@mail.Attacker.Example"):
        r = await cmd(reader, writer, b"MAIL FROM:<" + sender + b">")
        assert r.startswith(b"554 5.7.1 P-BLOCK Sender domain is blocked"), r
        assert b"attacker.example" in r and b"phishing" not in r
    assert (await cmd(reader, writer, b"MAIL FROM:<a@example.com>")).startswith(b"250")
    await cmd(reader, writer, b"RSET")
    assert (await cmd(reader, writer, b"MAIL FROM:<>")).startswith(b"250")          # bounces are not checked
    await cmd(reader, writer, b"RSET")
    await h.gw.blocklist.remove("domain", "attacker.example")
    assert (await cmd(reader, writer, b"MAIL FROM:<a@attacker.example>")).startswith(b"250")
    writer.close()
    tx = [r for r in h.log_records() if r["event"] == "transaction" and r["decision"] == "refused"]
    detail = [o for o in tx[0]["ledger"] if o["check"] == "mail_blocklist"][0]["detail"]
    assert "phishing kit" in detail and "attacker.example" in detail


async def test_reverse_dns_hostname(sink, gateway_factory, dns_server):
    dns_server.add_zone("2.0.192.in-addr.arpa")
    dns_server.set("7.2.0.192.in-addr.arpa", "PTR", ["host7.dyn.bad.example"])
    dns_server.set("9.2.0.192.in-addr.arpa", "PTR", ["mail.good.example"])
    dns_server.mode("11.2.0.192.in-addr.arpa", "servfail")
    h = await gateway_factory(sink, listeners=proxy_listener(), dns=live_dns(dns_server, static=TEST_DNS))
    assert (await greeting(h.port(), "192.0.2.7")).startswith(b"220 ")
    assert dns_server.count("7.2.0.192.in-addr.arpa", "PTR") == 0    # no host-name entries: no PTR lookup
    await h.gw.blocklist.add("hostname", ".dyn.bad.example", reason="dial-up pool")
    g = await greeting(h.port(), "192.0.2.7")
    assert g.startswith(b"554 5.7.1 P-BLOCK Client host name (reverse DNS) is blocked"), g
    assert b"host7.dyn.bad.example" in g and b"dial-up" not in g
    assert dns_server.count("7.2.0.192.in-addr.arpa", "PTR") == 1
    assert (await greeting(h.port(), "192.0.2.9")).startswith(b"220 ")    # other name
    assert (await greeting(h.port(), "192.0.2.10")).startswith(b"220 ")   # no PTR (NXDOMAIN)
    assert (await greeting(h.port(), "192.0.2.11")).startswith(b"220 ")   # PTR lookup fails: skipped
    await h.gw.blocklist.remove("hostname", ".dyn.bad.example")
    assert (await greeting(h.port(), "192.0.2.7")).startswith(b"220 ")


async def test_a_clean_message_still_relays(sink, gateway_factory):
    import aiosmtplib

    h = await gateway_factory(sink)
    await h.add_account()
    await h.gw.blocklist.add("domain", "attacker.example")
    await h.gw.blocklist.add("hostname", ".spam.example")
    await h.gw.blocklist.add("ip", "192.0.2.0/24")
    c = aiosmtplib.SMTP(hostname="127.0.0.1", port=h.port(), timeout=10)
    await c.connect()
    await c.login("alice", "s3cret")
    await c.sendmail("alice@example.com", ["bob@example.org"], MESSAGE)
    await c.quit()
    await sink.wait_for(1)
    tx = [r for r in h.log_records() if r["event"] == "transaction"][-1]
    results = {o["check"]: o["result"] for o in tx["ledger"]}
    assert results["connect_blocklist"] == "pass"
    assert results["helo_blocklist"] == "pass"
    assert results["mail_blocklist"] == "pass"


# ====================================================================== HTTP admin API
ADMIN_KEY = "k-" + secrets.token_hex(8)


def http_sections(admin_key: str = ADMIN_KEY) -> dict:
    return {"http": {"enabled": True, "port": 0, "admin_key": admin_key},
            "registry": {"secret": REGISTRY_SECRET}, "listeners": proxy_listener()}


async def test_admin_api(sink, gateway_factory):
    h = await gateway_factory(sink, **http_sections())
    base = f"http://127.0.0.1:{h.gw.http_port}"
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        r = await http.get("/admin/blocklist")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        r = await http.get("/admin/blocklist", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = await http.post("/admin/blocklist", json={"kind": "ip", "value": "192.0.2.1"},
                            headers={"Authorization": f"Basic {ADMIN_KEY}"})
        assert r.status_code == 401
        assert h.gw.blocklist.snapshot.match_ip("192.0.2.1") is None

        for body, field in [({"kind": "cidr", "value": "192.0.2.1"}, "kind"),
                            ({"kind": "ip", "value": "192.0.2.300"}, "value"),
                            ({"kind": "ip"}, "value"),
                            ({"kind": "ip", "value": "192.0.2.1", "color": "red"}, "color"),
                            ({"kind": "domain", "value": "bad.example", "reason": 5}, "reason")]:
            r = await http.post("/admin/blocklist", json=body, headers=auth)
            assert r.status_code == 422, (body, r.text)
            err = r.json()["errors"][0]
            assert err["field"] == field and err["reason"], r.json()
        r = await http.post("/admin/blocklist", content=b"not json", headers=auth)
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "body"

        r = await http.post("/admin/blocklist", json={"kind": "ip", "value": "192.0.2.9/24", "reason": "abuse"},
                            headers=auth)
        assert r.status_code == 201, r.text
        assert r.json()["value"] == "192.0.2.0/24" and r.json()["created_by"].startswith("admin-api")
        # effective at once on this gateway
        assert (await greeting(h.port(), "192.0.2.55")).startswith(b"554 5.7.1 P-BLOCK")
        r = await http.post("/admin/blocklist", json={"kind": "ip", "value": "192.0.2.0/24"}, headers=auth)
        assert r.status_code == 409 and r.json()["error"] == "exists"
        for kind, value in [("ip", "2001:db8:bad::/48"), ("domain", "bad.example"), ("hostname", ".bad.example")]:
            r = await http.post("/admin/blocklist", json={"kind": kind, "value": value}, headers=auth)
            assert r.status_code == 201, r.text

        r = await http.get("/admin/blocklist", headers=auth)
        assert r.status_code == 200
        body = r.json()
        assert body["version"] == 4
        assert {(e["kind"], e["value"]) for e in body["entries"]} == {
            ("ip", "192.0.2.0/24"), ("ip", "2001:db8:bad::/48"), ("domain", "bad.example"),
            ("hostname", ".bad.example")}
        r = await http.get("/admin/blocklist", params={"kind": "ip"}, headers=auth)
        assert [e["value"] for e in r.json()["entries"]] == ["192.0.2.0/24", "2001:db8:bad::/48"]
        r = await http.get("/admin/blocklist", params={"kind": "nope"}, headers=auth)
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "kind"

        r = await http.delete("/admin/blocklist/ip/192.0.2.0/24", headers=auth)      # slash kept
        assert r.status_code == 200, r.text
        assert r.json()["removed"]["reason"] == "abuse"
        assert (await greeting(h.port(), "192.0.2.55")).startswith(b"220 ")
        r = await http.delete("/admin/blocklist/ip/2001:db8:bad::%2F48", headers=auth)  # or percent-encoded
        assert r.status_code == 200, r.text
        r = await http.delete("/admin/blocklist/domain/Bad.Example", headers=auth)
        assert r.status_code == 200
        r = await http.delete("/admin/blocklist/domain/bad.example", headers=auth)
        assert r.status_code == 404 and r.json()["error"] == "not_found"
        r = await http.delete("/admin/blocklist/hostname/bad_name", headers=auth)
        assert r.status_code == 422
        r = await http.delete("/admin/blocklist/hostname/.bad.example")
        assert r.status_code == 401
        assert h.gw.blocklist.snapshot.match_hostname("x.bad.example") is not None


async def test_admin_api_disabled_without_key(sink, gateway_factory):
    h = await gateway_factory(sink, **http_sections(admin_key=""))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{h.gw.http_port}", timeout=10) as http:
        r = await http.get("/admin/blocklist", headers={"Authorization": "Bearer anything"})
        assert r.status_code == 503 and "admin API disabled" in r.json()["reason"]
        r = await http.post("/admin/blocklist", json={"kind": "ip", "value": "192.0.2.1"})
        assert r.status_code == 503


# ====================================================================== CLI (a real process)
def write_config(path: Path, *, storage_url: str, smtp_port: int = 0, upstream_port: int = 2,
                 dns: dict | None = None, log_file: Path | None = None) -> Path:
    dns = dns or {"static_only": True, "static": list(TEST_DNS)}
    lines = [
        "[[listeners]]", 'name = "plain"', 'address = "127.0.0.1"', f"port = {smtp_port}", 'tls = "none"',
        "auth_without_tls = true", "proxy_protocol = true", "",
        "[smtp]", 'hostname = "gw-b.test"', "grace_period = 1.0", "",
        "[auth]", "scrypt_n = 16", "insecure_test_scrypt = true", "",
        "[storage]", f'url = "{storage_url}"', "",
        "[http]", "enabled = false", "",
        "[log]", 'level = "warning"', f'transactions = "{log_file or (path.parent / "b-transactions.jsonl")}"', "",
        "[registry]", f'secret = "{REGISTRY_SECRET}"', "",
        "[[relay.upstreams]]", 'host = "127.0.0.1"', f"port = {upstream_port}", "connect_timeout = 2.0", "",
        "[dns]", f"static_only = {'true' if dns.get('static_only') else 'false'}", "min_ttl = 0", "timeout = 1.0",
        "nameservers = [" + ", ".join(f'"{n}"' for n in dns.get("nameservers", [])) + "]",
        "static = [" + ", ".join(f'"{s}"' for s in dns.get("static", [])) + "]",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


async def wait_until(probe, want: bool, started: float, limit: float = PROPAGATION + MARGIN) -> float:
    """Probe (a fresh SMTP session each time) until it answers ``want``; the seconds it took from
    ``started``. Fails when ``limit`` passes first."""
    while True:
        if await probe() is want:
            return time.monotonic() - started
        if time.monotonic() - started > limit:
            pytest.fail(f"not {'blocked' if want else 'unblocked'} within {limit:g} s")
        await asyncio.sleep(0.05)


async def test_cli_changes_reach_a_running_gateway(sink, gateway_factory, tmp_path):
    h = await gateway_factory(sink, listeners=proxy_listener())
    cfg = write_config(tmp_path / "gw.toml", storage_url=h.gw.config.storage.url, upstream_port=sink.port)

    async def blocked() -> bool:
        return (await greeting(h.port(), "203.0.113.9")).startswith(b"554 ")

    r = await run_cli_async("block", "add", "ip", "203.0.113.0/24", "--reason", "from the CLI", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "blocked ip 203.0.113.0/24" in r.stdout
    started = time.monotonic()
    await wait_until(blocked, True, started)
    r = await run_cli_async("block", "add", "hostname", "*.bad.example", "--config", str(cfg))
    assert r.returncode == 0 and "hostname .bad.example" in r.stdout, r.stderr
    # independent of each other: run them side by side
    listed, listed_all, dup, bad, missing = await asyncio.gather(
        run_cli_async("block", "list", "--kind", "ip", "--config", str(cfg)),
        run_cli_async("block", "list", "--config", str(cfg)),
        run_cli_async("block", "add", "ip", "203.0.113.0/24", "--config", str(cfg)),
        run_cli_async("block", "add", "ip", "203.0.113.999", "--config", str(cfg)),
        run_cli_async("block", "remove", "domain", "never.example", "--config", str(cfg)))
    assert listed.returncode == 0, listed.stderr
    kind, value, who, reason = listed.stdout.rstrip("\n").split("\t")
    assert (kind, value, reason) == ("ip", "203.0.113.0/24", "from the CLI") and who.startswith("cli")
    assert len(listed_all.stdout.splitlines()) == 2
    assert dup.returncode == 1 and "blocked already" in dup.stderr
    assert bad.returncode == 1 and "error: value:" in bad.stderr and "not an IP address" in bad.stderr
    assert missing.returncode == 1 and "is not blocked" in missing.stderr
    r = await run_cli_async("block", "remove", "ip", "203.0.113.0/24", "--config", str(cfg))
    assert r.returncode == 0 and "unblocked ip 203.0.113.0/24" in r.stdout
    started = time.monotonic()
    await wait_until(blocked, False, started)


def test_cli_usage_errors():
    r = run_cli("block", "add", "cidr", "192.0.2.1", "--dev")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = run_cli("block", "list")
    assert r.returncode == 2 and "no config file" in r.stderr


# ====================================================================== two processes, PostgreSQL
async def test_changes_reach_a_second_gateway_process_on_postgres(pg_url, sink, gateway_factory, gateway_b,
                                                                  dns_server, tmp_path):
    dns_server.add_zone("113.0.203.in-addr.arpa")
    dns_server.set("77.113.0.203.in-addr.arpa", "PTR", ["h77.pool.bad.example"])
    static = list(TEST_DNS) + ["sub.blocked.example MX 10 mx.example.com",
                               "blocked.example MX 10 mx.example.com"]
    dns = live_dns(dns_server, static=static)
    # Gateway A: in this process, admin API on; gateway B: a separate `gateway serve` process.
    a = await gateway_factory(sink, storage={"url": pg_url}, dns=dns, **http_sections())
    cfg_b = write_config(tmp_path / "b.toml", storage_url=pg_url, upstream_port=sink.port, dns=dns)
    b = await gateway_b(cfg_b)
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}

    async def client_refused(ip: str) -> bool:
        g = await greeting(b.port, ip)
        assert g[:4] in (b"220 ", b"554 "), g
        return g.startswith(b"554 5.7.1 P-BLOCK")

    async def helo_refused(name: str) -> bool:
        reader, writer = await proxied_session(b.port, "192.0.2.200")
        try:
            await reply(reader)
            r = await cmd(reader, writer, b"EHLO " + name.encode())
            return r.startswith(b"554 5.7.1 P-BLOCK")
        finally:
            writer.close()

    async def sender_refused(sender: str) -> bool:
        reader, writer = await proxied_session(b.port, "192.0.2.200")
        try:
            await reply(reader)
            await cmd(reader, writer, b"EHLO client.example.com")
            r = await cmd(reader, writer, f"MAIL FROM:<{sender}>".encode())
            assert r[:4] in (b"250 ", b"554 "), r
            return r.startswith(b"554 5.7.1 P-BLOCK")
        finally:
            writer.close()

    cases = [
        ("ip", "198.51.100.0/24", lambda: client_refused("198.51.100.42")),
        ("ip", "2001:db8:bad::/48", lambda: client_refused("2001:db8:bad:7::1")),
        ("domain", "blocked.example", lambda: sender_refused("news@sub.blocked.example")),
        ("hostname", "mx.bad.example", lambda: helo_refused("MX.bad.example")),
        ("hostname", ".helo.bad.example", lambda: helo_refused("a.b.helo.bad.example")),
        ("hostname", ".pool.bad.example", lambda: client_refused("203.0.113.77")),   # reverse DNS
    ]
    timings = []
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{a.gw.http_port}", timeout=10) as http:
        for kind, value, refused in cases:
            assert await refused() is False, (kind, value)
            started = time.monotonic()
            r = await http.post("/admin/blocklist", json={"kind": kind, "value": value, "reason": "test"},
                                headers=auth)
            assert r.status_code == 201, r.text
            took_add = await wait_until(refused, True, started)
            started = time.monotonic()
            r = await http.delete(f"/admin/blocklist/{kind}/{value}", headers=auth)
            assert r.status_code == 200, r.text
            took_remove = await wait_until(refused, False, started)
            timings.append((kind, value, round(took_add, 3), round(took_remove, 3)))

    # The CLI against the same database reaches B as well.
    cfg_cli = write_config(tmp_path / "cli.toml", storage_url=pg_url, upstream_port=sink.port)
    r = await run_cli_async("block", "add", "ip", "192.0.2.0/25", "--config", str(cfg_cli))
    assert r.returncode == 0, r.stderr
    started = time.monotonic()
    await wait_until(lambda: client_refused("192.0.2.5"), True, started)
    r = await run_cli_async("block", "remove", "ip", "192.0.2.0/25", "--config", str(cfg_cli))
    assert r.returncode == 0, r.stderr
    started = time.monotonic()
    await wait_until(lambda: client_refused("192.0.2.5"), False, started)
    assert b.proc.returncode is None, "".join(b.stderr)
    print("propagation to gateway B (kind, value, add s, remove s):", timings)
