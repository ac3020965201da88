"""An opted-out address leaves no bytes behind in the SQLite files (P-OPTOUT).

Every way a subscriber record is deleted goes through the real gateway: the
RFC 8058 one-click POST and the unsubscribe page's button over HTTP, a mail to
the mailto: address over SMTP, a DELETE through the API, and ``gateway list
delete`` as a separate CLI process on the same file. After each, the raw bytes
of the database file and its -wal/-journal files are scanned for the address
as given, lower-cased and normalized; a control address that is still
subscribed must be found by the same scan (else the scan proves nothing).
Each opt-out is also checked for how it is logged and counted (one-click,
page, mailto, api). A reader holding an old snapshot delays the checkpoint
without failing the opt-out; it is retried until the WAL is clean.
"""
from __future__ import annotations

import asyncio
import html
import logging
import re
import sqlite3
import time
from email.utils import formatdate
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx

from conftest import run_cli_async
from test_config_cli import GOOD
from test_listmail_smtp import SECRET, _smtp, _start, _transaction
from test_registry_http import _auth, _link, _new_list
from test_registry_store import _assert_nowhere

CONTROL = "Keep.Me@Example.ORG"          # stays subscribed all along


def _normalized(address: str) -> str:
    local, _, domain = address.rpartition("@")
    return f"{local}@{domain.lower()}"


async def _subscribe(c: httpx.AsyncClient, sink, key: str, lid: str, address: str) -> None:
    """Added through the API (as given, mixed case), confirmed by the link of the mail."""
    count = len(sink.messages)
    r = await c.post(f"/api/v1/lists/{lid}/subscribers", headers=_auth(key),
                     json={"address": address, "source": "signup form", "ip": "198.51.100.7"})
    assert r.status_code == 202 and r.json()["confirmation"] == "sent", r.text
    await sink.wait_for(count + 1)
    r = await c.post(_link(sink, _normalized(address), full=True))
    assert r.status_code == 200 and "confirmed" in r.text.lower(), r.text


def _forms(address: str) -> list[bytes]:
    """The forms an address could be stored in: as given, lower-cased, normalized
    (local part as given, domain lower-case), each as UTF-8."""
    return sorted({f.encode() for f in (address, address.lower(), _normalized(address))})


def _scan(db: Path, address: str) -> dict[str, list[bytes]]:
    """{file name: forms of ``address`` found in its raw bytes} over the database
    file and its -wal / -journal files (those that exist)."""
    found: dict[str, list[bytes]] = {}
    for path in (db, Path(f"{db}-wal"), Path(f"{db}-journal")):
        if path.exists():
            data = path.read_bytes()
            hits = [f for f in _forms(address) if f in data]
            if hits:
                found[path.name] = hits
    return found


async def _gone(db: Path, address: str, timeout: float = 10.0) -> None:
    """Wait (bounded) until no file holds ``address``; the control is still found."""
    deadline = time.monotonic() + timeout
    while (left := _scan(db, address)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not left, f"{address} still in {left}"
    assert _scan(db, CONTROL), "the scan does not find the control address: it could not fail"


async def _metrics(c: httpx.AsyncClient) -> dict[tuple[str, str], float]:
    text = (await c.get("/metrics")).text
    return {(m.group(2), m.group(1)): float(m.group(3)) for m in re.finditer(
        r'^gateway_registry_optouts_total\{result="([^"]+)",via="([^"]+)"\} (\S+)$', text, re.M)}


def _optout_logs(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "gateway.registry" and "opt-out" in r.getMessage()]


async def test_each_optout_path_leaves_no_bytes_in_sqlite_files(gateway_factory, sink, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="gateway.registry")
    h, base = await _start(gateway_factory, sink)
    db = tmp_path / "gw.db"
    assert str(db) in h.gw.config.storage.url
    registry = h.gw.registry
    key = await registry.issue_api_key("alice")
    people = {"one-click": "One.Click@Example.ORG", "page": "Page.Button@Example.ORG",
              "mailto": "Mail.To@Example.ORG", "api": "Api.Delete@Example.ORG"}
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        lid = (await _new_list(c, key))["id"]
        lst = await registry.get_list("alice", lid)
        for address in [CONTROL, *people.values()]:
            await _subscribe(c, sink, key, lid, address)
        # every address is in the files now: the scan sees them
        for address in [CONTROL, *people.values()]:
            assert _scan(db, address), address
        before = await _metrics(c)

        # RFC 8058 one-click: the body a mail client posts
        r = await c.post(registry.unsubscribe_url(lst, people["one-click"]), content=b"List-Unsubscribe=One-Click",
                         headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert r.status_code == 200 and "You are unsubscribed" in r.text, r.text
        await _gone(db, people["one-click"])

        # the page: GET it, then submit its form as a browser does (action and hidden fields)
        r = await c.get(registry.unsubscribe_url(lst, people["page"]))
        assert r.status_code == 200
        form = re.search(r'<form method="post" action="([^"]+)">(.*?)</form>', r.text, re.S)
        assert form, r.text
        fields = {html.unescape(n): html.unescape(v)
                  for n, v in re.findall(r'<input type="hidden" name="([^"]*)" value="([^"]*)">', form.group(2))}
        assert "List-Unsubscribe" not in fields, fields   # the button is not an RFC 8058 one-click
        r = await c.post(html.unescape(form.group(1)), data=fields)
        assert r.status_code == 200 and "You are unsubscribed" in r.text, r.text
        await _gone(db, people["page"])

        # mailto over SMTP, from an unauthenticated client as a mail program sends it
        target = urlsplit(registry.unsubscribe_mailto(lst, people["mailto"]))
        to, subject = target.path, unquote(target.query.removeprefix("subject="))
        anon = await _smtp(h.port(), login=None)
        message = (f"From: <{people['mailto']}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
                   f"Date: {formatdate(time.time())}\r\nMessage-ID: <u-{time.time_ns()}@example.org>\r\n"
                   f"\r\nunsubscribe\r\n").encode()
        _, got, data = await _transaction(anon, people["mailto"], [to], message)
        await anon.quit()
        assert got[to][0] == 250 and data is not None and data[0] == 250, (got, data)
        await _gone(db, people["mailto"])

        # the list owner removes a subscriber through the API
        r = await c.delete(f"/api/v1/lists/{lid}/subscribers/{people['api']}", headers=_auth(key))
        assert r.status_code == 204, r.text
        await _gone(db, people["api"])

        # each way is logged and counted as itself
        after = await _metrics(c)
        for via in people:
            assert after[(via, "removed")] - before.get((via, "removed"), 0) == 1, (via, before, after)
        logs = _optout_logs(caplog)
        for via in people:
            assert sum(f"list={lid} removed=True via={via}" in m for m in logs) == 1, (via, logs)
        # a repeated one-click finds nothing left: counted as "already"
        r = await c.post(registry.unsubscribe_url(lst, people["one-click"]), content=b"List-Unsubscribe=One-Click",
                         headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert r.status_code == 200
        assert (await _metrics(c))[("one-click", "already")] == after.get(("one-click", "already"), 0) + 1
        for address in people.values():
            assert await registry.recipient_status(lid, address) == "unsubscribed"
        assert await registry.recipient_status(lid, CONTROL) == "confirmed"
        checkpoints = (await c.get("/metrics")).text
        assert re.search(r'^gateway_registry_wal_checkpoints_total\{result="ok"\} [1-9]', checkpoints, re.M), \
            checkpoints
    await _assert_nowhere(h.gw.engine, [a.lower() for a in people.values()])

    # `gateway list delete` in another process on the same file, while this gateway runs
    other = await registry.create_list("alice", name="Other", list_id="other.example.com",
                                       senders=["other@example.com"], confirm_from="confirm@example.com")
    gone_with_list = "List.Deleted@Example.ORG"
    await registry.add_subscriber("alice", other.id, gone_with_list, source="signup form")
    assert _scan(db, gone_with_list)
    cfg = tmp_path / "cli.toml"
    cfg.write_text(GOOD.replace("{db}", str(db)) + f'\n[registry]\nsecret = "{SECRET}"\n')
    r = await run_cli_async("list", "delete", "alice", other.id, "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    await _gone(db, gone_with_list)


async def test_a_reader_delays_the_checkpoint_but_not_the_optout(gateway_factory, sink, tmp_path):
    """A reader on an older snapshot (here another connection inside a read
    transaction, as a backup or a long export would be) keeps the WAL from
    being truncated: the opt-out still succeeds at once, the WAL keeps the
    address while the reader holds it, and the retried checkpoint cleans it
    as soon as the reader is done."""
    h, base = await _start(gateway_factory, sink)
    db = tmp_path / "gw.db"
    registry = h.gw.registry
    key = await registry.issue_api_key("alice")
    leaving = "Slow.Reader@Example.ORG"
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        lid = (await _new_list(c, key))["id"]
        lst = await registry.get_list("alice", lid)
        await _subscribe(c, sink, key, lid, CONTROL)
        await _subscribe(c, sink, key, lid, leaving)
        reader = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        try:
            reader.execute("BEGIN")
            assert reader.execute("SELECT count(*) FROM list_subscribers").fetchone()[0] == 2
            checkpointer = registry.store.checkpointer
            busy_before = checkpointer.stats["busy"]
            r = await c.post(registry.unsubscribe_url(lst, leaving), content=b"List-Unsubscribe=One-Click",
                             headers={"Content-Type": "application/x-www-form-urlencoded"})
            assert r.status_code == 200 and "You are unsubscribed" in r.text, r.text
            assert await registry.recipient_status(lid, leaving) == "unsubscribed"
            deadline = time.monotonic() + 10
            while checkpointer.stats["busy"] == busy_before and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert checkpointer.stats["busy"] > busy_before and checkpointer.pending
            # the reader's snapshot still has the row, and the WAL still the old page
            assert "-wal" in " ".join(_scan(db, leaving)), _scan(db, leaving)
            assert reader.execute("SELECT count(*) FROM list_subscribers").fetchone()[0] == 2
        finally:
            reader.execute("COMMIT")
            reader.close()
        # the retried checkpoint succeeds (bounded wait: it may be sleeping between attempts)
        deadline = time.monotonic() + 15
        while checkpointer.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not checkpointer.pending, checkpointer.stats
        assert checkpointer.stats["ok"] >= 1
        await _gone(db, leaving)
