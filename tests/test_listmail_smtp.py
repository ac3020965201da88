"""Registered list mail over real sockets: HTTP API + SMTP front + the test
upstream (P-OPTIN, P-OPTOUT, P-STD).

The full life of a subscriber (add -> confirmation mail -> GET page confirms
nothing -> POST confirms -> list mail relayed with per-recipient
List-Unsubscribe headers -> one-click opt-out from the URL in the relayed
message -> RCPT refused, no copy of the address left, re-adding refused) on
SQLite and on PostgreSQL; refusals of pending/unknown recipients and of
unregistered list mail; the registry being down defers; the mailto
unsubscribe address; an opt-out through gateway A seen by gateway B (a real
``gateway serve`` process on the same PostgreSQL) within 1 s; mail of another
account from a list's sender address.

PostgreSQL: 127.0.0.1:5432, trust auth, a fresh database per test (skips
visibly without a server, fails under CI=true).
"""
from __future__ import annotations

import asyncio
import re
import sys
import time
from email.utils import formatdate
from urllib.parse import unquote, urlsplit

import aiosmtplib
import httpx

from conftest import TEST_DNS, free_port, pg_admin
from smtp_client import cmd, reply, session
from test_registry_http import _auth, _link, _new_list
from test_registry_store import _assert_nowhere

SECRET = "listmail-test-registry-secret-0123456789"
MAILTO = "unsub@gw.test"


# ------------------------------------------------------------------ storage: SQLite and PostgreSQL
# (storage_url and pg_url: conftest)
def _db_name(url: str) -> str:
    return url.rsplit("/", 1)[1].split("?", 1)[0]


# ------------------------------------------------------------------ gateway, HTTP, SMTP helpers
async def _start(gateway_factory, sink, storage: str | None = None, *, mailto: str = MAILTO, **sections):
    """A gateway with HTTP on a known port, so the links it puts into mail are
    the real URLs (the test follows them as a mail client would)."""
    http_port = free_port()
    # lookup_timeout widened: the outbox writes every 0.2 s and the test's own writes (lists, subscribers)
    # wait for SQLite's write lock in turn; on a loaded machine (and under libfaketime, whose sleeps run
    # long) 3 s was seen to run out in a setup step. No test here is about that deadline.
    registry = {"secret": SECRET, "public_base_url": f"http://127.0.0.1:{http_port}", "outbox_interval": 0.2,
                "mailto_address": mailto, "lookup_timeout": 10.0, **sections.pop("registry", {})}
    if storage is not None:
        sections["storage"] = {"url": storage}
    h = await gateway_factory(sink, http={"enabled": True, "port": http_port, "address": "127.0.0.1"},
                              registry=registry, **sections)
    await h.add_account("alice", domains=("example.com",))
    return h, f"http://127.0.0.1:{h.gw.http_port}"


async def _subscribe(c: httpx.AsyncClient, sink, key: str, lid: str, address: str, *, confirm: bool = True) -> str:
    """Add through the API, wait for the confirmation mail, GET the page (that
    must confirm nothing), then POST it unless ``confirm`` is false."""
    count = len(sink.messages)
    r = await c.post(f"/api/v1/lists/{lid}/subscribers", headers=_auth(key),
                     json={"address": address, "source": "signup form", "ip": "198.51.100.7"})
    assert r.status_code == 202, r.text
    assert r.json()["confirmation"] == "sent"
    await sink.wait_for(count + 1)
    url = _link(sink, address, full=True)
    r = await c.get(url)
    assert r.status_code == 200 and "<button" in r.text
    r = await c.get(f"/api/v1/lists/{lid}/recipient-status", params={"address": address}, headers=_auth(key))
    assert r.json()["status"] == "pending"
    if confirm:
        r = await c.post(url, headers={"User-Agent": "TestBrowser/1.0"})
        assert r.status_code == 200 and "confirmed" in r.text.lower(), r.text
    return url


async def _smtp(port: int, login: tuple[str, str] | None = ("alice", "s3cret")) -> aiosmtplib.SMTP:
    c = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10, start_tls=False, local_hostname="client.test")
    await c.connect()
    await c.ehlo()
    if login:
        await c.login(*login)
    return c


async def _cmd(c: aiosmtplib.SMTP, *parts: bytes) -> tuple[int, str]:
    resp = await c.execute_command(*parts)
    return resp.code, resp.message


async def _transaction(c: aiosmtplib.SMTP, mail_from: str, rcpts: list[str], message: bytes | None
                       ) -> tuple[tuple[int, str], dict[str, tuple[int, str]], tuple[int, str] | None]:
    """MAIL, each RCPT, DATA (if any recipient was taken and ``message`` is
    given), RSET. Returns (MAIL reply, {rcpt: reply}, DATA reply or None)."""
    mail = await _cmd(c, b"MAIL", f"FROM:<{mail_from}>".encode())
    got: dict[str, tuple[int, str]] = {}
    data = None
    if mail[0] == 250:
        for r in rcpts:
            got[r] = await _cmd(c, b"RCPT", f"TO:<{r}>".encode())
        if message is not None and any(code == 250 for code, _ in got.values()):
            try:
                resp = await c.data(message)
                data = (resp.code, resp.message)
            except aiosmtplib.SMTPDataError as exc:
                data = (exc.code, exc.message)
    await _cmd(c, b"RSET")
    return mail, got, data


def _list_message(subject: str = "Our November news", extra: bytes = b"", msgid: str = "news-1") -> bytes:
    """List mail as a customer's list software writes it, with its own
    List-* headers (the gateway must replace them) and a folded one."""
    return (b"From: Example News <news@example.com>\r\n"
            b"To: Example News readers <news@example.com>\r\n"
            + f"Subject: {subject}\r\n".encode()
            + f"Date: {formatdate(time.time(), localtime=False)}\r\n".encode()
            + f"Message-ID: <{msgid}@example.com>\r\n".encode()
            + b"List-Id: Customer's own list <own.example.com>\r\n"
            b"List-Unsubscribe: <mailto:leave@example.com>,\r\n"
            b" <https://example.com/leave?u=123>\r\n"
            b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
            b"Precedence: bulk\r\n"
            b"MIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=us-ascii\r\n"
            b"X-Campaign: 42\r\n"
            + extra +
            b"\r\n"
            b"Hello reader,\r\n"
            b".a line that starts with a dot\r\n"
            b"List-Id: this is body text, not a header\r\n"
            b"bye\r\n")


def _without_customer_list_fields(message: bytes) -> bytes:
    """What must reach the upstream of the customer's message, byte for byte:
    everything but its List-Id / List-Unsubscribe (with its continuation
    line) / List-Unsubscribe-Post header fields (written out here, not with
    the gateway's own editing function)."""
    out = message
    for field in (b"List-Id: Customer's own list <own.example.com>\r\n",
                  b"List-Unsubscribe: <mailto:leave@example.com>,\r\n <https://example.com/leave?u=123>\r\n",
                  b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"):
        assert out.count(field) == 1
        out = out.replace(field, b"")
    return out


def _header_block(data: bytes) -> list[tuple[str, str]]:
    head = data.split(b"\r\n\r\n", 1)[0].decode("utf-8")
    fields: list[tuple[str, str]] = []
    for line in head.split("\r\n"):
        if line[:1] in (" ", "\t"):
            name, value = fields[-1]
            fields[-1] = (name, value + "\r\n" + line)
        else:
            name, _, value = line.partition(":")
            fields.append((name, value.strip()))
    return fields


def _check_relayed_copy(h, received, rcpt: str, original: bytes, lst_header: str) -> dict:
    """One relayed copy: its own envelope, the gateway's List-* headers (once
    each), and the customer's message otherwise byte-identical. Returns the
    parsed List-Unsubscribe targets."""
    assert received.rcpt_tos == [rcpt]
    assert received.mail_from == "news@example.com"
    data = received.data
    rest = _without_customer_list_fields(original)
    assert data.endswith(rest), "the message beyond the gateway's own header fields was changed"
    prefix = data[:-len(rest)]
    fields = _header_block(prefix + b"\r\n")
    names = [n.lower() for n, _ in fields]
    trace = h.gw.config.smtp.trace_header.lower()
    assert set(names) <= {"received", trace, "list-id", "list-unsubscribe", "list-unsubscribe-post"}, names
    all_names = [n.lower() for n, _ in _header_block(data)]
    for name in ("list-id", "list-unsubscribe", "list-unsubscribe-post"):
        assert all_names.count(name) == 1, f"{name} appears {all_names.count(name)} times"
    value = dict((n.lower(), v) for n, v in fields)
    assert value["list-id"] == lst_header
    assert value["list-unsubscribe-post"] == "List-Unsubscribe=One-Click"
    assert f"for <{rcpt}>" in value["received"]
    targets = re.findall(r"<([^>]+)>", value["list-unsubscribe"])
    https = [t for t in targets if t.startswith("http")]
    mailto = [t for t in targets if t.startswith("mailto:")]
    assert len(https) == 1 and re.fullmatch(r"http://127\.0\.0\.1:\d+/unsubscribe/[a-z2-7]{50}", https[0]), targets
    return {"https": https[0], "mailto": mailto[0] if mailto else None}


def _copies(sink, start: int) -> dict[str, object]:
    out = {}
    for m in sink.messages[start:]:
        assert len(m.rcpt_tos) == 1, m.rcpt_tos
        out[m.rcpt_tos[0]] = m
    return out


# ------------------------------------------------------------------ the full life of a subscriber
async def test_subscriber_life_through_http_and_smtp(gateway_factory, sink, storage_url):
    h, base = await _start(gateway_factory, sink, storage_url)
    port = h.port()
    key = await h.gw.registry.issue_api_key("alice")
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        lid = (await _new_list(c, key))["id"]
        list_header = '"Example News" <news.example.com>'

        # bob: added, confirmation mail arrives, the GET page confirms nothing
        bob_link = await _subscribe(c, sink, key, lid, "bob@example.org", confirm=False)
        smtp = await _smtp(port)
        _, got, _ = await _transaction(smtp, "news@example.com", ["bob@example.org"], None)
        code, text = got["bob@example.org"]
        assert code == 550 and text.startswith("5.7.1") and "P-OPTIN" in text, got

        # POST confirms; carol confirms too; dave stays pending; erin is unknown
        r = await c.post(bob_link)
        assert r.status_code == 200 and "confirmed" in r.text.lower()
        await _subscribe(c, sink, key, lid, "carol@example.org")
        await _subscribe(c, sink, key, lid, "dave@example.org", confirm=False)

        # list mail to all four: only the confirmed ones are taken, one per transaction,
        # each gets its own copy
        message = _list_message()
        start = len(sink.messages)
        mail, got, data = await _transaction(smtp, "news@example.com",
                                             ["bob@example.org", "dave@example.org", "carol@example.org",
                                              "erin@example.org"], message)
        assert mail[0] == 250
        assert got["bob@example.org"][0] == 250, got
        # pending and unknown: refused alike (the detail may differ: the list is the account's own,
        # whose API shows the same; another account never reaches this check, see below)
        for who in ("dave@example.org", "erin@example.org"):
            code, text = got[who]
            assert code == 550 and text.startswith("5.7.1") and "P-OPTIN" in text, got
        # carol is confirmed too, but this transaction has its list recipient: she comes again
        assert got["carol@example.org"] == (
            452, "4.5.3 P-OPTIN List mail takes one recipient per transaction; send the others again"), got
        assert data is not None and data[0] == 250, data
        _, again, data = await _transaction(smtp, "news@example.com", ["carol@example.org"], message)
        assert again["carol@example.org"][0] == 250 and data is not None and data[0] == 250, (again, data)
        await sink.wait_for(start + 2)
        await asyncio.sleep(0.1)
        copies = _copies(sink, start)
        assert set(copies) == {"bob@example.org", "carol@example.org"}
        bob = _check_relayed_copy(h, copies["bob@example.org"], "bob@example.org", message, list_header)
        carol = _check_relayed_copy(h, copies["carol@example.org"], "carol@example.org", message, list_header)
        assert bob["https"] != carol["https"]
        for who, links in (("bob@example.org", bob), ("carol@example.org", carol)):
            token = links["https"].rsplit("/", 1)[1]
            assert links["mailto"] == f"mailto:unsub+{token}@gw.test?subject=unsubscribe%20{token}"
            assert who not in links["https"]

        # the unsubscribe page (GET) changes nothing; the RFC 8058 one-click POST opts bob out
        r = await c.get(bob["https"])
        assert r.status_code == 200 and "<button" in r.text
        # meanwhile the whole list has been loaded into the gateway's memory: from now on
        # RCPTs are answered from there (and the opt-out below must reach it)
        snaps = h.gw.registry.cache.snapshots
        deadline = time.monotonic() + 10
        while not snaps.ready(lid):
            assert time.monotonic() < deadline, "the list was not loaded into memory"
            await asyncio.sleep(0.02)
        _, got, _ = await _transaction(smtp, "news@example.com", ["bob@example.org"], None)
        assert got["bob@example.org"][0] == 250
        metrics = (await c.get("/metrics")).text
        assert re.search(r'gateway_registry_lookups_total\{answered_by="list_snapshot"\} [1-9]', metrics), metrics
        assert "gateway_registry_snapshot_lists 1.0" in metrics and "gateway_registry_channel_healthy 1.0" in metrics
        assert re.search(r"gateway_registry_snapshot_load_seconds_total [0-9.e-]+", metrics), metrics
        r = await c.post(bob["https"], content=b"List-Unsubscribe=One-Click",
                         headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert r.status_code == 200 and "unsubscribed" in r.text.lower()

        # the next list mail to bob is refused at RCPT; carol still gets hers
        start = len(sink.messages)
        _, got, data = await _transaction(smtp, "news@example.com", ["bob@example.org", "carol@example.org"],
                                          _list_message(msgid="news-2"))
        code, text = got["bob@example.org"]
        assert code == 550 and text.startswith("5.7.1") and "P-OPTOUT" in text and "unsubscribed" in text, text
        assert got["carol@example.org"][0] == 250 and data[0] == 250
        await sink.wait_for(start + 1)
        await asyncio.sleep(0.1)
        assert [m.rcpt_tos for m in sink.messages[start:]] == [["carol@example.org"]]
        await smtp.quit()

        # the database holds no copy of bob's address; re-adding is refused
        await _assert_nowhere(h.gw.engine, ["bob@example.org"])
        r = await c.post(f"/api/v1/lists/{lid}/subscribers", headers=_auth(key), json={"address": "bob@example.org"})
        assert r.status_code == 409 and r.json()["error"] == "suppressed", r.text


async def test_mailto_unsubscribe(gateway_factory, sink, storage_url):
    """Mail to unsub+TOKEN@gw.test (an unauthenticated client, as a mail
    program sends it) opts out; a damaged token is refused 550 5.1.1."""
    h, base = await _start(gateway_factory, sink, storage_url)
    key = await h.gw.registry.issue_api_key("alice")
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        lid = (await _new_list(c, key))["id"]
        await _subscribe(c, sink, key, lid, "carol@example.org")
    smtp = await _smtp(h.port())
    start = len(sink.messages)
    message = _list_message()
    _, got, data = await _transaction(smtp, "news@example.com", ["carol@example.org"], message)
    assert got["carol@example.org"][0] == 250 and data[0] == 250
    await sink.wait_for(start + 1)
    links = _check_relayed_copy(h, sink.messages[start], "carol@example.org", message,
                                '"Example News" <news.example.com>')
    target = urlsplit(links["mailto"])
    address = target.path
    subject = unquote(target.query.removeprefix("subject="))
    token = address.split("+", 1)[1].split("@", 1)[0]

    def unsubscribe_mail(to: str, subj: str) -> bytes:
        return (f"From: Carol <carol@example.org>\r\nTo: <{to}>\r\nSubject: {subj}\r\n"
                f"Date: {formatdate(time.time(), localtime=False)}\r\nMessage-ID: <u-{time.time_ns()}@example.org>\r\n"
                f"\r\nPlease take me off.\r\n").encode()

    anon = await _smtp(h.port(), login=None)
    relayed_before = len(sink.messages)
    # a damaged token (one character changed): nothing happens, 550 5.1.1. (Not the last character:
    # 50 base32 characters carry 250 bits for 248, so its low 2 bits are padding that decoding ignores.)
    bad = token[:20] + ("a" if token[20] != "a" else "b") + token[21:]
    bad_address = address.replace(token, bad)
    _, got, data = await _transaction(anon, "carol@example.org", [bad_address],
                                      unsubscribe_mail(bad_address, f"unsubscribe {bad}"))
    replies = list(got.values()) + ([data] if data else [])
    assert any(code == 550 and text.startswith("5.1.1") for code, text in replies), replies
    assert all(code != 250 for code, _ in ([data] if data else [])), replies
    assert await h.gw.registry.recipient_status(lid, "carol@example.org") == "confirmed"

    # the real one
    _, got, data = await _transaction(anon, "carol@example.org", [address], unsubscribe_mail(address, subject))
    assert got[address][0] == 250 and data is not None and data[0] == 250, (got, data)
    await anon.quit()
    assert len(sink.messages) == relayed_before          # handled by the gateway, never relayed
    _, got, _ = await _transaction(smtp, "news@example.com", ["carol@example.org"], None)
    code, text = got["carol@example.org"]
    assert code == 550 and text.startswith("5.7.1") and "P-OPTOUT" in text, text
    await smtp.quit()
    await _assert_nowhere(h.gw.engine, ["carol@example.org"])
    # an unauthenticated client still cannot relay anywhere else
    anon = await _smtp(h.port(), login=None)
    _, got, _ = await _transaction(anon, "carol@example.org", ["someone@example.net"], None)
    assert got["someone@example.net"][0] in (530, 550, 554), got
    await anon.quit()


# ------------------------------------------------------------------ refusals
async def test_unregistered_list_mail_refused_at_data(gateway_factory, sink):
    h, _ = await _start(gateway_factory, sink)
    smtp = await _smtp(h.port())
    plain = _list_message()
    variants = {
        "List-Id and List-Unsubscribe": plain,
        "Precedence: bulk only": (b"From: Alice <alice@example.com>\r\nTo: <bob@example.org>\r\n"
                                  b"Subject: offers\r\n"
                                  + f"Date: {formatdate(time.time(), localtime=False)}\r\n".encode()
                                  + b"Message-ID: <p-1@example.com>\r\nPrecedence: bulk\r\n\r\nhi\r\n"),
        "List-Unsubscribe only": (b"From: Alice <alice@example.com>\r\nTo: <bob@example.org>\r\n"
                                  b"Subject: offers\r\n"
                                  + f"Date: {formatdate(time.time(), localtime=False)}\r\n".encode()
                                  + b"Message-ID: <p-2@example.com>\r\n"
                                    b"List-Unsubscribe: <https://example.com/u>\r\n\r\nhi\r\n"),
    }
    for what, message in variants.items():
        sender = "news@example.com" if message is plain else "alice@example.com"
        mail, got, data = await _transaction(smtp, sender, ["bob@example.org"], message)
        assert mail[0] == 250 and got["bob@example.org"][0] == 250, (what, got)   # no list registered: not list mail
        assert data is not None and data[0] == 550 and data[1].startswith("5.7.1") and "P-OPTIN" in data[1], \
            (what, data)
    # the same sender without list headers is ordinary mail
    ordinary = (b"From: Alice <alice@example.com>\r\nTo: <bob@example.org>\r\nSubject: hello\r\n"
                + f"Date: {formatdate(time.time(), localtime=False)}\r\n".encode()
                + b"Message-ID: <o-1@example.com>\r\n\r\nhi\r\n")
    _, _, data = await _transaction(smtp, "alice@example.com", ["bob@example.org"], ordinary)
    assert data[0] == 250, data
    await smtp.quit()
    await sink.wait_for(1)
    assert len(sink.messages) == 1


async def test_other_accounts_mail_from_a_list_sender(gateway_factory, sink):
    """list_for_sender is per account: mallory's mail from alice's list
    sender is not alice's list mail. It reveals nothing about alice's
    subscribers (P-HARVEST), gets no unsubscribe headers of alice's list, and
    list-like mail is refused as unregistered. Mallory's own list with the
    same sender address checks against mallory's subscribers only."""
    h, base = await _start(gateway_factory, sink)
    await h.add_account("mallory", password="m4llory", domains=("example.com",))
    alice = await h.gw.registry.issue_api_key("alice")
    mallory = await h.gw.registry.issue_api_key("mallory")
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        lid = (await _new_list(c, alice))["id"]
        await _subscribe(c, sink, alice, lid, "carol@example.org")                 # confirmed on alice's list
        await _subscribe(c, sink, alice, lid, "dave@example.org", confirm=False)   # pending on alice's list
        start = len(sink.messages)
        smtp = await _smtp(h.port(), login=("mallory", "m4llory"))
        # not list mail for mallory: RCPT does not tell alice's subscribers from strangers
        _, got, _ = await _transaction(smtp, "news@example.com",
                                       ["carol@example.org", "dave@example.org", "zed@example.org"], None)
        assert [code for code, _ in got.values()] == [250, 250, 250], got
        # with list headers it is unregistered list mail
        _, _, data = await _transaction(smtp, "news@example.com", ["carol@example.org"], _list_message())
        assert data[0] == 550 and "P-OPTIN" in data[1], data
        # without, ordinary mail: relayed as it is, no List-Unsubscribe of alice's list
        ordinary = (b"From: Mallory <news@example.com>\r\nTo: <carol@example.org>\r\nSubject: hello\r\n"
                    + f"Date: {formatdate(time.time(), localtime=False)}\r\n".encode()
                    + b"Message-ID: <m-1@example.com>\r\n\r\nhi\r\n")
        _, _, data = await _transaction(smtp, "news@example.com", ["carol@example.org"], ordinary)
        assert data[0] == 250, data
        await sink.wait_for(start + 1)
        relayed = sink.messages[start].data
        assert b"List-Unsubscribe" not in relayed and b"List-Id" not in relayed

        # mallory registers her own list with the same sender: now it is her list mail,
        # checked against her (empty) list, never against alice's
        r = await c.post("/api/v1/lists", headers=_auth(mallory), json={
            "name": "Mallory News", "list_id": "mnews.example.com", "senders": ["news@example.com"],
            "confirm_from": "confirm@example.com"})
        assert r.status_code == 201, r.text
        _, got, _ = await _transaction(smtp, "news@example.com", ["carol@example.org"], None)
        code, text = got["carol@example.org"]
        assert code == 550 and "P-OPTIN" in text, got
        await smtp.quit()
        # alice's list mail is unaffected
        smtp = await _smtp(h.port())
        _, got, _ = await _transaction(smtp, "news@example.com", ["carol@example.org"], None)
        assert got["carol@example.org"][0] == 250, got
        await smtp.quit()


# ------------------------------------------------------------------ registry down
async def test_registry_down_defers_rcpt(gateway_factory, sink, pg_url):
    """The gateway's PostgreSQL goes away (no new connections allowed, its
    connections terminated): RCPT of list mail answers 451 4.3.0, never 250,
    for an address that is not cached and for one that is (the cache does
    not serve while its invalidation channel is down).

    Whole-list snapshots are off: with the list held in memory (loaded in
    the background after carol's RCPT) no address needs the database, so
    whether "newcomer" was a database lookup depended on how fast that load
    was (it answered 550 from the snapshot in about 3 of 10 runs). The
    snapshot's own behaviour while the channel is down is
    tests/test_registry_store.py's."""
    h, base = await _start(gateway_factory, sink, pg_url, registry={"snapshot_max_entries": 0})
    key = await h.gw.registry.issue_api_key("alice")
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        lid = (await _new_list(c, key))["id"]
        await _subscribe(c, sink, key, lid, "carol@example.org")
    smtp = await _smtp(h.port())
    _, got, _ = await _transaction(smtp, "news@example.com", ["carol@example.org"], None)
    assert got["carol@example.org"][0] == 250                        # carol's "confirmed" is cached now
    name = _db_name(pg_url)
    await asyncio.to_thread(pg_admin, f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
    try:
        await asyncio.to_thread(pg_admin, f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                          f"WHERE datname = '{name}' AND pid <> pg_backend_pid()")
        # a new, cold address: the database is needed and cannot answer
        mail, got, _ = await _transaction(smtp, "news@example.com", ["newcomer@example.org"], None)
        # MAIL is answered from the (stale) sender cache; RCPT needs the database
        assert mail[0] == 250, mail
        code, text = got["newcomer@example.org"]
        assert code == 451 and text.startswith("4.3.0") and "P-OPTIN" in text, got
        # the cached one: once the channel notices (ping_interval), it is not served from the cache;
        # it must never be accepted after the 451 of the cold lookup showed the database is gone
        deadline = time.monotonic() + 5
        while True:
            mail, got, _ = await _transaction(smtp, "news@example.com", ["carol@example.org"], None)
            reply = mail if mail[0] != 250 else got["carol@example.org"]
            if reply[0] == 451:
                assert reply[1].startswith("4.3.0"), reply
                break
            assert time.monotonic() < deadline, f"still {reply} 5 s after the database went away"
            await asyncio.sleep(0.1)
        assert not h.gw.registry.channel_healthy
        await smtp.quit()
    finally:
        await asyncio.to_thread(pg_admin, f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')


# ------------------------------------------------------------------ two gateway processes
async def test_optout_through_a_refused_on_b_within_1s(pg_url, sink, gateway_factory, gateway_b, tmp_path):
    """Gateway A (this process) and gateway B (``gateway serve`` subprocess)
    share PostgreSQL. B has the subscriber cached as confirmed; after the
    one-click opt-out through A, B's RCPT refuses within 1 s."""
    h, base_a = await _start(gateway_factory, sink, pg_url)
    key = await h.gw.registry.issue_api_key("alice")
    async with httpx.AsyncClient(base_url=base_a, timeout=10) as c:
        lid = (await _new_list(c, key))["id"]
        await _subscribe(c, sink, key, lid, "eve@example.org")
    dns = ", ".join(f'"{r}"' for r in TEST_DNS)
    cfg = tmp_path / "b.toml"
    cfg.write_text(f"""
[[listeners]]
name = "plain"
address = "127.0.0.1"
port = 0
tls = "none"
auth_without_tls = true

[smtp]
hostname = "gw-b.test"

[auth]
scrypt_n = 16
insecure_test_scrypt = true

[storage]
url = "{pg_url}"

[http]
enabled = true
address = "127.0.0.1"
port = 0

[registry]
secret = "env:GW_TEST_REGISTRY_SECRET"
mailto_address = "{MAILTO}"

[dns]
static_only = true
static = [{dns}]

[log]
transactions = "{tmp_path / 'b.jsonl'}"

[[relay.upstreams]]
host = "127.0.0.1"
port = {sink.port}
""")
    gw_b = await gateway_b(cfg, env={"GW_TEST_REGISTRY_SECRET": SECRET})
    http_b = gw_b.http_port
    async with httpx.AsyncClient(timeout=5) as c:
        b = await _smtp(gw_b.port)
        _, got, _ = await _transaction(b, "news@example.com", ["eve@example.org"], None)
        assert got["eve@example.org"][0] == 250, got          # B has eve cached as confirmed
        # ... and loads the whole list into its memory: the opt-out must reach that too
        deadline = time.monotonic() + 10
        while "gateway_registry_snapshot_lists 1.0" not in (await c.get(f"http://127.0.0.1:{http_b}/metrics")).text:
            assert time.monotonic() < deadline, "gateway B did not load the list into memory"
            await asyncio.sleep(0.05)
        _, got, _ = await _transaction(b, "news@example.com", ["eve@example.org"], None)
        assert got["eve@example.org"][0] == 250, got
        metrics = (await c.get(f"http://127.0.0.1:{http_b}/metrics")).text
        assert re.search(r'gateway_registry_lookups_total\{answered_by="list_snapshot"\} [1-9]', metrics), metrics

        # the one-click URL as gateway A writes it into eve's mail
        lst = await h.gw.registry.get_list("alice", lid)
        url = h.gw.registry.unsubscribe_url(lst, "eve@example.org")
        r = await c.post(url, content=b"List-Unsubscribe=One-Click",
                         headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert r.status_code == 200
        t0 = time.monotonic()
        while True:
            _, got, _ = await _transaction(b, "news@example.com", ["eve@example.org"], None)
            code, text = got["eve@example.org"]
            if code != 250:
                break
            assert time.monotonic() - t0 < 1.5, "gateway B still accepts eve more than 1 s after the opt-out"
            await asyncio.sleep(0.02)
        elapsed = time.monotonic() - t0
        assert code == 550 and text.startswith("5.7.1") and "P-OPTOUT" in text, text
        assert elapsed < 1.0 + 0.5, elapsed
        await b.quit()


async def test_pipelined_rcpts_of_list_mail_share_one_lookup(gateway_factory, sink, pg_url):
    """A PIPELINING client's RCPTs are looked up together: on PostgreSQL the
    registry answers them with one batched query, not one round trip each."""
    h, _base = await _start(gateway_factory, sink, pg_url)
    reg = h.gw.registry
    await reg.create_list("alice", name="News", list_id="news.example.com", senders=["news@example.com"],
                          confirm_from="confirm@example.com")
    reg.cache.snapshots = None     # misses, not the list's in-memory snapshot
    fast = reg.store.fast
    assert fast is not None, "PostgreSQL storage uses the RCPT fast path"
    reader, writer = await session(h.port())
    assert (await cmd(reader, writer, b"MAIL FROM:<news@example.com>")).startswith(b"250")
    before = fast.stats["queries"]
    rcpts = [f"never{i}@example.org".encode() for i in range(8)]
    writer.write(b"".join(b"RCPT TO:<" + r + b">\r\n" for r in rcpts))
    await writer.drain()
    answers = [await reply(reader) for _ in rcpts]
    assert all(a.startswith(b"550 5.7.1 P-OPTIN") for a in answers), answers
    queries = fast.stats["queries"] - before
    assert 1 <= queries <= 2, f"{queries} queries for 8 pipelined RCPTs"
    await cmd(reader, writer, b"QUIT")
    writer.close()


async def test_pipelined_rcpts_are_prefetched_at_most_once_each(gateway_factory, sink, pg_url):
    """Each RCPT still waiting in the input buffer is prefetched once, not
    again on every RCPT answered before it (that was O(N^2) lookups)."""
    h, _base = await _start(gateway_factory, sink, pg_url)
    reg = h.gw.registry
    await reg.create_list("alice", name="News", list_id="news.example.com", senders=["news@example.com"],
                          confirm_from="confirm@example.com")
    reg.cache.snapshots = None     # misses, not the list's in-memory snapshot
    original = reg.recipient_status
    calls = {"prefetch": 0, "all": 0}

    def counting(list_id, address):
        calls["all"] += 1
        if sys._getframe(1).f_code.co_name == "prefetch":   # Handover.prefetch
            calls["prefetch"] += 1
        return original(list_id, address)

    reg.recipient_status = counting
    reader, writer = await session(h.port())
    assert (await cmd(reader, writer, b"MAIL FROM:<news@example.com>")).startswith(b"250")
    rcpts = [f"never{i}@example.org".encode() for i in range(40)]
    writer.write(b"".join(b"RCPT TO:<" + r + b">\r\n" for r in rcpts))
    await writer.drain()
    answers = [await reply(reader) for _ in rcpts]
    assert all(a.startswith(b"550 5.7.1 P-OPTIN") for a in answers), answers
    assert calls["prefetch"] >= 1, "the pipelined RCPTs were prefetched"
    assert calls["prefetch"] <= len(rcpts), f"{calls['prefetch']} prefetch lookups for {len(rcpts)} pipelined RCPTs"
    assert calls["all"] - calls["prefetch"] == len(rcpts), calls     # each RCPT's own check
    await cmd(reader, writer, b"QUIT")
    writer.close()


# ------------------------------------------------------------------ one list recipient per transaction (issue 11)
async def _confirmed(h, sink, list_id: str, addresses: list[str]) -> None:
    """Subscribers confirmed the way a reader does: the confirmation mail
    reaches the sink and its link's token is confirmed."""
    reg = h.gw.registry
    for address in addresses:
        count = len(sink.messages)
        await reg.add_subscriber("alice", list_id, address, source="signup form", ip="198.51.100.7")
        await sink.wait_for(count + 1)
        token = _link(sink, address).rsplit("/", 1)[1]
        await reg.confirm(token, ip="198.51.100.7", user_agent="pytest")


async def test_list_mail_takes_one_recipient_per_transaction(gateway_factory, sink):
    """Two confirmed subscribers, the upstream takes the first copy and
    refuses the second: each client transaction carries one list recipient,
    so each reply is true for its one copy. Before, one transaction carried
    both and the client got 451 (its retry gave the first subscriber a second
    copy) or 554 (a bounce for a message the first one had received). The
    session also holds one upstream transaction, however many recipients it
    names (before: one per pipelined recipient until DATA)."""
    h, _base = await _start(gateway_factory, sink)
    lst = await h.gw.registry.create_list("alice", name="News", list_id="news.example.com",
                                          senders=["news@example.com"], confirm_from="confirm@example.com")
    readers = [f"reader{i}@example.org" for i in range(6)]
    await _confirmed(h, sink, lst.id, readers)
    start = len(sink.messages)
    opened = h.gw.relay.stats["connections_opened"] + h.gw.relay.stats["connections_reused"]

    reader, writer = await session(h.port())
    assert (await cmd(reader, writer, b"MAIL FROM:<news@example.com>")).startswith(b"250")
    writer.write(b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in readers + ["stranger@example.org"]))
    await writer.drain()
    answers = [await reply(reader) for _ in range(len(readers) + 1)]
    assert answers[0].startswith(b"250"), answers
    for a in answers[1:-1]:
        assert a == b"452 4.5.3 P-OPTIN List mail takes one recipient per transaction; send the others again\r\n", a
    assert answers[-1].startswith(b"550 5.7.1 P-OPTIN"), answers     # a stranger still gets the truth
    used = h.gw.relay.stats["connections_opened"] + h.gw.relay.stats["connections_reused"] - opened
    assert used == 1, f"{used} upstream transactions for one list transaction"
    assert (await cmd(reader, writer, b"DATA")).startswith(b"354")
    writer.write(_list_message() + b".\r\n")
    await writer.drain()
    assert (await reply(reader)).startswith(b"250 2.0.0 OK: relayed")

    # the next reader's copy is refused by the upstream: that transaction gets the upstream's 554, alone
    sink.data_reply = "554 5.7.1 Mailbox disabled"
    assert (await cmd(reader, writer, b"MAIL FROM:<news@example.com>")).startswith(b"250")
    assert (await cmd(reader, writer, f"RCPT TO:<{readers[1]}>".encode())).startswith(b"250")
    assert (await cmd(reader, writer, b"DATA")).startswith(b"354")
    writer.write(_list_message() + b".\r\n")
    await writer.drain()
    refused = (await reply(reader)).decode()
    assert refused.startswith("554 5.7.1") and "Mailbox disabled" in refused, refused
    sink.data_reply = None
    assert (await cmd(reader, writer, b"MAIL FROM:<news@example.com>")).startswith(b"250")
    assert (await cmd(reader, writer, f"RCPT TO:<{readers[2]}>".encode())).startswith(b"250")
    assert (await cmd(reader, writer, b"DATA")).startswith(b"354")
    writer.write(_list_message() + b".\r\n")
    await writer.drain()
    assert (await reply(reader)).startswith(b"250 2.0.0 OK: relayed")
    await cmd(reader, writer, b"QUIT")
    writer.close()

    await sink.wait_for(start + 2)
    await asyncio.sleep(0.1)
    got = [m.rcpt_tos for m in sink.messages[start:]]
    assert got == [[readers[0]], [readers[2]]], got          # each copy once, the refused one never
    first = [rec for rec in h.log_records() if rec.get("decision") == "relayed"][0]
    held = [o for o in first["ledger"] if o["check"] == "list_one_recipient"]
    assert [o["item"] for o in held] == readers[1:] and all(o["result"] == "fail" for o in held), held
