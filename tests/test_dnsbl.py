"""DNSBL / DNSWL: pure rules, then a real UDP server serving the rbldnsd corpus, then real rbldnsd."""
from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from dns_fixtures import dns_server, make_resolver  # noqa: F401
from dns_server import reverse_name
from gateway.checks import connect_dnsbl, factories
from gateway.dns.dnsbl import (CLEAN, ERROR, LISTED, Dnsbl, classify_answer, clean_reason, decide,
                               judge_probe, peer_address, query_label, ZoneResult)
from gateway.dns.resolver import DnsAnswer, Resolver, Status
from gateway.dns.settings import DnsblSettings, DnsblZone, ResolverSettings
from gateway.core.transaction import Phase, Result, SessionInfo, Transaction

from conftest import CORPORA, have_binary, need
import checkkit

CORPUS = CORPORA / "dnsbl-rfc5782-rbldnsd"
ZONES = CORPUS / "zones"
V6_LISTED = "::ffff:7f00:2"
V6_CLEAN = "::ffff:7f00:1"


def zone(name="bl.test", display="BL", weight=1, codes=(), txt=False, probe=True) -> DnsblZone:
    return DnsblZone(name, display, weight, list(codes), txt, probe)


def a(*addrs, status=Status.OK) -> DnsAnswer:
    return DnsAnswer("q", "A", status, tuple(addrs), 60)


# -- pure rules ------------------------------------------------------------------------------

def test_query_labels_rfc5782():
    assert query_label("127.0.0.2") == "2.0.0.127"
    assert query_label(V6_LISTED) == "2.0.0.0.0.0.f.7.f.f.f.f" + ".0" * 20
    assert query_label("2001:db8:dead::1") == "1" + ".0" * 19 + ".d.a.e.d.8.b.d.0.1.0.0.2"
    # IPv4-mapped peers of a dual-stack socket are looked up as IPv4 (by the check)
    assert str(peer_address("::ffff:192.0.2.7")) == "192.0.2.7"
    assert query_label(V6_LISTED) == reverse_name(V6_LISTED)


def test_classify_answers():
    z = zone(codes=["127.0.0.2-127.0.0.11"])
    assert classify_answer(z, a("127.0.0.2")).status == LISTED
    assert classify_answer(z, a("127.0.0.4", "127.0.0.10")).codes == ("127.0.0.4", "127.0.0.10")
    assert classify_answer(z, a("127.0.1.2")).status == CLEAN  # code not counted
    assert classify_answer(z, a(status=Status.NXDOMAIN)).status == CLEAN
    assert classify_answer(z, a(status=Status.NODATA)).status == CLEAN
    for bad in ("127.255.255.254", "127.255.255.252", "10.0.0.1", "198.51.100.1"):
        r = classify_answer(z, a(bad))
        assert r.status == ERROR, bad
    assert classify_answer(z, a("127.0.0.2", "127.255.255.254")).status == ERROR  # mixed: not trusted
    assert classify_answer(z, a(status=Status.TIMEOUT)).kind == "timeout"
    assert classify_answer(z, a(status=Status.FAILURE)).status == ERROR
    assert classify_answer(zone(), a("127.0.1.2")).status == LISTED  # no codes: any valid code


def _results(*pairs):
    return [ZoneResult(z, st) for z, st in pairs]


def test_weights_threshold_and_allow_list():
    bl1, bl2 = zone("a.test", "A", 1), zone("b.test", "B", 1)
    wl = zone("wl.test", "WL", -5)
    s = DnsblSettings(zones=[bl1, bl2, wl], threshold=2)
    assert decide(s, "192.0.2.1", _results((bl1, LISTED), (bl2, CLEAN), (wl, CLEAN))).decision == "pass"
    v = decide(s, "192.0.2.1", _results((bl1, LISTED), (bl2, LISTED), (wl, CLEAN)))
    assert v.decision == "listed" and v.score == 2
    v = decide(s, "192.0.2.1", _results((bl1, LISTED), (bl2, LISTED), (wl, LISTED)))
    assert v.decision == "pass" and v.score == -3


def test_errors_open_and_closed():
    bl1, bl2 = zone("a.test", "A", 1), zone("b.test", "B", 1)
    wl = zone("wl.test", "WL", -1)
    for policy in ("open", "closed"):
        s = DnsblSettings(zones=[bl1, bl2, wl], threshold=1, on_error=policy)
        # a listing that no failed zone could undo stands either way
        assert decide(s, "x", _results((bl1, LISTED), (bl2, ERROR), (wl, CLEAN))).decision == "listed"
    open_, closed = (DnsblSettings(zones=[bl1, bl2, wl], threshold=1, on_error=p) for p in ("open", "closed"))
    undecided = _results((bl1, CLEAN), (bl2, ERROR), (wl, CLEAN))
    assert decide(open_, "x", undecided).decision == "pass"
    assert decide(closed, "x", undecided).decision == "tempfail"
    # the allow list failed: it might have exempted the listing
    wl_failed = _results((bl1, LISTED), (bl2, CLEAN), (wl, ERROR))
    assert decide(open_, "x", wl_failed).decision == "listed"
    assert decide(closed, "x", wl_failed).decision == "tempfail"
    # a failed zone that could not reach the threshold does not matter
    s = DnsblSettings(zones=[bl1, bl2], threshold=3, on_error="closed")
    assert decide(s, "x", _results((bl1, CLEAN), (bl2, ERROR))).decision == "pass"


def test_reason_never_shows_the_key():
    z = zone("S3CRETKEY.zen.dq.example", "Example ZEN")
    text = clean_reason(z, ("https://s3cretkey.zen.dq.example/query?ip=192.0.2.1\x07\r\nInjected: x" + "y" * 400,))
    assert "s3cretkey" not in text.lower() and "Example ZEN" in text
    assert "\r" not in text and "\n" not in text and len(text) <= 160


def test_probe_judgement():
    z = zone()
    nx = a(status=Status.NXDOMAIN)
    assert judge_probe(z, a("127.0.0.2"), nx)[0] == "healthy"
    assert judge_probe(z, a("127.0.0.2"), a("127.0.0.2"))[0] == "disabled"      # lists everything
    assert judge_probe(z, a("10.1.2.3"), a("10.1.2.3"))[0] == "disabled"        # outside 127/8
    assert judge_probe(z, a("127.255.255.254"), nx)[0] == "disabled"            # refuses us
    assert judge_probe(z, nx, nx)[0] == "disabled"                               # test point missing
    assert judge_probe(z, a(status=Status.TIMEOUT), nx)[0] is None               # undecided


@pytest.mark.parametrize("kw, message", [
    ({"zones": [DnsblZone("a.test", "A"), DnsblZone("A.test.", "A2")]}, "twice"),
    ({"on_error": "maybe"}, "on_error"),
    ({"decide_at": "rcpt"}, "decide_at"),
    ({"threshold": 0}, "threshold"),
    ({"exempt_networks": ["10.0.0.0/33"]}, "exempt_networks"),
])
def test_settings_validation(kw, message):
    with pytest.raises(ValueError, match=message):
        DnsblSettings(**kw)
    with pytest.raises(ValueError, match="display"):
        DnsblZone("key.zone.example", "")
    with pytest.raises(ValueError, match="127.0.0.0/8"):
        DnsblZone("zone.example", "Z", codes=["10.0.0.2"])


# -- against the UDP test server ------------------------------------------------------------

@pytest.fixture
def corpus_server(dns_server):
    """The rbldnsd corpus zones, served from our test server."""
    dns_server.add_zone("test-bl.example", minimum=300)
    dns_server.load_rbldnsd("test-bl.example", "ip4set", str(ZONES / "test-bl.ip4set"))
    dns_server.load_rbldnsd("test-bl.example", "ip6trie", str(ZONES / "test-bl.ip6trie"))
    dns_server.add_zone("dbl.test-bl.example", minimum=300)
    dns_server.load_rbldnsd("dbl.test-bl.example", "dnset", str(ZONES / "test-dbl.dnset"))
    return dns_server


TEST_BL = zone("test-bl.example", "Test BL", 1, ["127.0.0.2-127.0.0.11"], txt=True)


@pytest.mark.parametrize("ip, listed, code", [
    ("127.0.0.2", True, "127.0.0.2"),      # RFC 5782 s.5 IPv4 test point
    ("127.0.0.1", False, None),
    (V6_LISTED, True, "127.0.0.2"),        # RFC 5782 s.5 IPv6 test point
    (V6_CLEAN, False, None),
    ("127.0.0.4", True, "127.0.0.4"),
    ("192.0.2.99", True, "127.0.0.3"),     # CIDR range
    ("192.0.2.1", False, None),            # exclusion inside the range
    ("1.2.3.4", False, None),
    ("2001:db8:dead::1", True, "127.0.0.3"),
])
async def test_rbldnsd_corpus_served(corpus_server, make_resolver, ip, listed, code):
    bl = Dnsbl(DnsblSettings(zones=[TEST_BL]), make_resolver())
    v = await bl.check(ip)
    assert v.listed is listed
    if listed:
        assert v.hits[0].codes == (code,)
        assert v.hits[0].reason  # the zone publishes TXT reasons
        assert v.reply_detail().startswith(f"{ip} listed by Test BL (")


async def test_listed_reply_names_display_and_txt_only(corpus_server, make_resolver):
    keyed = zone("test-bl.example", "Test BL", 1, txt=True)
    bl = Dnsbl(DnsblSettings(zones=[keyed]), make_resolver())
    check = connect_dnsbl.ConnectDnsbl(bl, bl.settings)
    out = await check.run(SessionInfo("s1", "submission", "127.0.0.2", 2525))
    assert out.result is Result.FAIL and out.reply.code == 554 and out.reply.enhanced == "5.7.1"
    line = out.reply.render()
    assert line.startswith("554 5.7.1 P-BLOCK ")
    assert "(Listed in test-bl: http://Test BL/lookup?ip=127.0.0.2)" in line  # zone name replaced
    assert "test-bl.example" not in line and "test-bl.example" not in out.detail


async def test_weights_threshold_and_dnswl_live(dns_server, make_resolver):
    for z in ("one.test", "two.test", "wl.test"):
        dns_server.add_zone(z, minimum=60)
    label = reverse_name("198.51.100.7")
    dns_server.set(f"{label}.one.test", "A", ["127.0.0.2"])
    dns_server.set(f"{label}.two.test", "A", ["127.0.0.3"])
    only_one = reverse_name("198.51.100.8")
    dns_server.set(f"{only_one}.one.test", "A", ["127.0.0.2"])
    allowed = reverse_name("198.51.100.9")
    for z in ("one.test", "two.test"):
        dns_server.set(f"{allowed}.{z}", "A", ["127.0.0.2"])
    dns_server.set(f"{allowed}.wl.test", "A", ["127.0.10.2"])
    s = DnsblSettings(threshold=2, zones=[
        zone("one.test", "One", 1), zone("two.test", "Two", 1),
        zone("wl.test", "DNSWL", -2, codes=["127.0.10.0/24"])])
    bl = Dnsbl(s, make_resolver())
    v = await bl.check("198.51.100.7")
    assert v.listed and v.score == 2 and v.reply_detail() == "198.51.100.7 listed by One, Two"
    assert not (await bl.check("198.51.100.8")).listed
    v = await bl.check("198.51.100.9")
    assert not v.listed and v.score == 0  # exempted by the allow list


async def test_refusal_codes_are_errors_not_listings(dns_server, make_resolver):
    dns_server.add_zone("strict.test")
    dns_server.set(f"{reverse_name('203.0.113.5')}.strict.test", "A", ["127.255.255.254"])
    dns_server.set(f"{reverse_name('203.0.113.6')}.strict.test", "A", ["198.51.100.1"])
    r = make_resolver()
    for policy, want in (("open", "pass"), ("closed", "tempfail")):
        bl = Dnsbl(DnsblSettings(zones=[zone("strict.test", "Strict")], on_error=policy), r)
        for ip in ("203.0.113.5", "203.0.113.6"):
            v = await bl.check(ip)
            assert v.decision == want and v.errors and not v.hits


async def test_budget_bounds_the_whole_check(dns_server, make_resolver):
    dns_server.add_zone("fast.test")
    dns_server.add_zone("slow.test")
    dns_server.set(f"{reverse_name('192.0.2.50')}.fast.test", "A", ["127.0.0.2"])
    dns_server.mode(f"{reverse_name('192.0.2.50')}.slow.test", "drop")
    s = DnsblSettings(zones=[zone("fast.test", "Fast"), zone("slow.test", "Slow")], budget=0.4)
    bl = Dnsbl(s, make_resolver(timeout=3.0))
    started = time.monotonic()
    v = await bl.check("192.0.2.50")
    assert time.monotonic() - started < 0.4 + 0.4
    assert v.listed  # the fast zone's listing counts, the silent zone is an error
    assert [r.kind for r in v.errors] == ["timeout"]
    # fail closed with the silent zone as the only one: defer, within the budget too
    s2 = DnsblSettings(zones=[zone("slow.test", "Slow")], budget=0.3, on_error="closed")
    started = time.monotonic()
    v2 = await Dnsbl(s2, make_resolver(timeout=3.0)).check("192.0.2.50")
    assert v2.tempfail and time.monotonic() - started < 0.3 + 0.4


async def test_servfail_open_and_closed_outcomes(dns_server, make_resolver):
    dns_server.add_zone("sf.test")
    dns_server.mode(f"{reverse_name('192.0.2.60')}.sf.test", "servfail")
    session = SessionInfo("s", "submission", "192.0.2.60", 1000)
    r = make_resolver()
    opened = Dnsbl(DnsblSettings(zones=[zone("sf.test", "SF")]), r)
    out = await connect_dnsbl.ConnectDnsbl(opened, opened.settings).run(session)
    assert out.result is Result.ERROR and out.reply is None and "fail open" in out.detail
    closed = Dnsbl(DnsblSettings(zones=[zone("sf.test", "SF")], on_error="closed"), r)
    out = await connect_dnsbl.ConnectDnsbl(closed, closed.settings).run(session)
    assert out.result is Result.ERROR and out.refuses
    assert out.reply.render().startswith("451 4.7.1 P-BLOCK")


async def test_not_listed_cached_by_ttl_listed_briefly(dns_server, make_resolver):
    dns_server.add_zone("c.test", minimum=300)
    listed = reverse_name("192.0.2.70")
    # TTL 0 at the server: c-ares' own cache keeps nothing, so what the gateway
    # sees is governed by our cache alone (see docs/dns.md)
    dns_server.set(f"{listed}.c.test", "A", ["127.0.0.2"], ttl=0)
    r = make_resolver(min_ttl=1)
    bl = Dnsbl(DnsblSettings(zones=[zone("c.test", "C")], listed_cache_ttl=1), r)
    assert not (await bl.check("192.0.2.71")).listed
    assert not (await bl.check("192.0.2.71")).listed
    assert dns_server.count(f"{reverse_name('192.0.2.71')}.c.test", "A") == 1  # negative answer cached
    assert (await bl.check("192.0.2.70")).listed
    dns_server.remove(f"{listed}.c.test")  # delisted
    assert (await bl.check("192.0.2.70")).listed  # within listed_cache_ttl
    await asyncio.sleep(1.2)
    assert not (await bl.check("192.0.2.70")).listed
    assert dns_server.count(f"{listed}.c.test", "A") == 2


async def test_health_probes_disable_and_alert(dns_server, make_resolver):
    dns_server.add_zone("good.test")
    dns_server.set(f"{reverse_name('127.0.0.2')}.good.test", "A", ["127.0.0.2"], ttl=0)
    dns_server.add_zone("all.test")
    dns_server.set("*.all.test", "A", ["127.0.0.2"], ttl=0)        # lists everything
    dns_server.add_zone("hijack.test")
    dns_server.set("*.hijack.test", "A", ["198.51.100.80"], ttl=0)  # NXDOMAIN rewritten
    dns_server.add_zone("empty.test")                               # lists nothing
    alerts = []
    s = DnsblSettings(zones=[zone("good.test", "Good"), zone("all.test", "All"),
                             zone("hijack.test", "Hijack"), zone("empty.test", "Empty")])
    bl = Dnsbl(s, make_resolver(), on_alert=lambda z, why: alerts.append((z.display, why)))
    health = await bl.probe()
    assert health["good.test"].state == "healthy"
    assert {n: h.state for n, h in health.items() if n != "good.test"} == dict.fromkeys(
        ["all.test", "hijack.test", "empty.test"], "disabled")
    assert sorted(d for d, _ in alerts) == ["All", "Empty", "Hijack"]
    assert bl.stats.zone_disabled_events == 3 and sorted(bl.disabled_zones) == ["All", "Empty", "Hijack"]
    v = await bl.check("192.0.2.90")  # "All" would list it: it is not trusted
    assert not v.listed and [r.status for r in v.results].count("disabled") == 3
    # a probe that fails (SERVFAIL) changes nothing; a fixed zone is trusted again
    dns_server.mode(f"{reverse_name('127.0.0.2')}.good.test", "servfail")
    await bl.probe()
    assert bl.health["good.test"].state == "healthy" and bl.health["good.test"].probe_failures == 1
    dns_server.remove("*.all.test")
    dns_server.set(f"{reverse_name('127.0.0.2')}.all.test", "A", ["127.0.0.2"], ttl=0)
    await bl.probe()
    assert bl.health["all.test"].state == "healthy" and len(alerts) == 3


async def test_background_probe_start_stop(corpus_server, make_resolver):
    bl = Dnsbl(DnsblSettings(zones=[TEST_BL], health_interval=0.05), make_resolver())
    bl.start()
    for _ in range(50):
        await asyncio.sleep(0.02)
        if bl.stats.probes >= 2:
            break
    await bl.stop()
    assert bl.stats.probes >= 2 and bl.health["test-bl.example"].state == "healthy"


async def test_exemptions_and_decide_at_mail(corpus_server, make_resolver):
    s = DnsblSettings(zones=[TEST_BL], exempt_networks=["10.0.0.0/8", "2001:db8::/32"])
    bl = Dnsbl(s, make_resolver())
    services = checkkit.services(dnsbl_settings=s, resolver=bl.resolver, dnsbl=bl)
    check = connect_dnsbl.build(services)
    assert check.phase is Phase.CONNECT
    out = await check.run(SessionInfo("s", "l", "2001:db8:dead::1", 1))
    assert out.result is Result.SKIP and "client network" in out.detail
    authed = SessionInfo("s", "l", "127.0.0.2", 1, account=object(), auth_method="client-network")
    assert (await check.run(authed)).result is Result.SKIP
    # a dual-stack socket's IPv4-mapped peer is checked as the IPv4 client it is
    mapped = await check.run(SessionInfo("s", "l", "::ffff:127.0.0.4", 1))
    assert mapped.result is Result.FAIL and "127.0.0.4 listed by Test BL" in mapped.reply.render()

    at_mail = DnsblSettings(zones=[TEST_BL], decide_at="mail")
    bl2 = Dnsbl(at_mail, make_resolver())
    services = checkkit.services(dnsbl_settings=at_mail, resolver=bl2.resolver, dnsbl=bl2)
    connect, mail = connect_dnsbl.build(services), connect_dnsbl.build_mail(services)
    assert mail.phase is Phase.MAIL
    session = SessionInfo("s", "l", "127.0.0.2", 1)
    out = await connect.run(session)
    assert out.result is Result.SKIP and out.detail == "decided at MAIL"
    await asyncio.sleep(0.1)  # the prefetch warms the cache
    tx = Transaction(session)
    out = await mail.run(tx)
    assert out.result is Result.FAIL and out.reply.code == 554
    assert bl2.resolver.stats.cache_hits >= 1
    session.account, session.auth_method = object(), "smtp-auth"  # now authenticated: exempt
    assert (await mail.run(Transaction(session))).result is Result.SKIP
    await bl2.stop()


async def test_decide_at_mail_counts_one_check_per_session(corpus_server, make_resolver):
    """The connect half only issues the check's queries (cache warm): the session is
    decided, counted and logged once, at MAIL, with the same verdict."""
    s = DnsblSettings(zones=[TEST_BL], decide_at="mail")
    bl = Dnsbl(s, make_resolver())
    made = factories(checkkit.services(dnsbl_settings=s, resolver=bl.resolver, dnsbl=bl))
    connect, mail = made["connect_dnsbl"](), made["mail_dnsbl"]()
    assert isinstance(mail, connect_dnsbl.MailDnsbl) and mail.phase is Phase.MAIL
    session = SessionInfo("s", "l", "127.0.0.2", 1)
    assert (await connect.run(session)).detail == "decided at MAIL"
    await asyncio.gather(*bl._background)  # the prefetch has finished
    name = f"{reverse_name('127.0.0.2')}.test-bl.example"
    assert corpus_server.count(name, "A") == 1 and corpus_server.count(name, "TXT") == 1  # the check's queries
    assert (bl.stats.checks, bl.stats.listed, bl.stats.zone_errors) == (0, 0, 0)
    hits = bl.resolver.stats.cache_hits
    out = await mail.run(Transaction(session))
    assert out.result is Result.FAIL and out.reply.code == 554
    assert "127.0.0.2 listed by Test BL (Listed in test-bl" in out.reply.render()
    assert bl.resolver.stats.cache_hits == hits + 2  # A and TXT answered from the warmed cache
    assert corpus_server.count(name, "A") == 1 and corpus_server.count(name, "TXT") == 1
    assert (bl.stats.checks, bl.stats.listed) == (1, 1)
    await bl.stop()


# -- real rbldnsd ---------------------------------------------------------------------------------

def _free_udp_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def rbldnsd():
    need(have_binary("rbldnsd"), "rbldnsd binary not found (apt-get install rbldnsd)")
    binary = shutil.which("rbldnsd") or "/usr/sbin/rbldnsd"
    work = tempfile.mkdtemp(prefix="rbldnsd-")
    os.chmod(work, 0o755)
    for f in ZONES.iterdir():
        shutil.copy(f, work)
        os.chmod(os.path.join(work, f.name), 0o644)
    port = _free_udp_port()
    cmd = [binary, "-n", "-b", f"127.0.0.1/{port}", "-w", work, "-t", "60"]
    if os.geteuid() == 0:
        cmd += ["-u", "rbldns"]
    cmd += ["test-bl.example:ip4set:test-bl.ip4set", "test-bl.example:ip6trie:test-bl.ip6trie",
            "dbl.test-bl.example:dnset:test-dbl.dnset"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(work, ignore_errors=True)


async def test_real_rbldnsd(rbldnsd):
    r = Resolver(ResolverSettings(nameservers=[rbldnsd], timeout=0.5, min_ttl=0))
    try:
        for _ in range(40):  # wait until it has loaded the zones and answers
            if (await r.query("2.0.0.127.test-bl.example", "A", fresh=True)).ok:
                break
            await asyncio.sleep(0.1)
        bl = Dnsbl(DnsblSettings(zones=[TEST_BL]), r)
        health = await bl.probe()
        assert health["test-bl.example"].state == "healthy"
        v = await bl.check("127.0.0.2")
        assert v.listed and v.hits[0].reason == "Listed in test-bl: http://Test BL/lookup?ip=127.0.0.2"
        assert not (await bl.check("127.0.0.1")).listed
        assert (await bl.check(V6_LISTED)).listed
        assert not (await bl.check(V6_CLEAN)).listed
        assert (await bl.check("192.0.2.99")).hits[0].codes == ("127.0.0.3",)
        assert not (await bl.check("192.0.2.1")).listed
        assert (await bl.check("2001:db8:dead::1")).listed
        dbl = await r.query("test.dbl.test-bl.example", "A")
        assert dbl.records == ("127.0.1.2",)
        assert (await r.query("invalid.dbl.test-bl.example", "A")).status is Status.NXDOMAIN
    finally:
        await r.close()
