"""Violations stored (P-STRIKE, issue 13 point 1; gateway/strikes/violations.py):
a retry storm over real SMTP becomes one row, on SQLite and on PostgreSQL,
with its rule, kind, class, trace id, client IP and the reply the client got;
`gateway account events` prints it; the class follows [strikes] classes; a
database that refuses connections keeps the rows queued (the client's reply
unchanged) and they are written when it answers again."""
from __future__ import annotations

import asyncio
import json
import time

import pytest

from conftest import eventually, need, run_cli_async, tcp_reachable
from faultproxy import FaultProxy
from gateway.core.events import EventBus, Violation
from gateway.core.transaction import SessionInfo
from gateway.storage.db import create_engine, migrate
from gateway.strikes.violations import ViolationRecorder, list_violations
from test_config_cli import GOOD
from test_rcpt_rate import FrozenClock, limits, login, rcpts

async def until(check, what: str, timeout: float = 10.0) -> None:
    """Poll the async ``check`` every 20 ms until it is true; AssertionError after ``timeout``."""
    async def wait() -> None:
        while not await check():
            await asyncio.sleep(0.02)
    try:
        async with asyncio.timeout(timeout):
            await wait()
    except TimeoutError:
        raise AssertionError(f"not within {timeout} s: {what}") from None


STORM = limits(recipients_per_hour=1, storm_refusals=1, tarpit_min=0.01, tarpit_max=0.02)


async def _storm(h) -> str:
    """1 accepted, 3 deferred (the third tarpitted), then 550s: one rate_storm violation."""
    c = await login(h)
    assert await rcpts(c, 6) == [250, 451, 451, 451, 550, 550]
    trace = next(p.tx.trace_id for p in h.gw.sessions if p.tx is not None)
    await c.quit()
    return trace


async def test_a_retry_storm_is_stored_with_its_evidence(gateway_factory, sink, storage_url):
    h = await gateway_factory(sink, clock=FrozenClock(), limits=STORM, storage={"url": storage_url})
    await h.add_account()
    trace = await _storm(h)
    rows: list[dict] = []

    async def stored() -> bool:
        rows[:] = await list_violations(h.gw.engine, "alice")
        return bool(rows)
    await until(stored, "the violation row")
    assert len(rows) == 1
    v = rows[0]
    assert (v["rule"], v["kind"], v["class"], v["identity"]) == ("P-LOAD", "rate_storm", "negligence", None)
    assert v["trace_id"] == trace and v["client_ip"] == "127.0.0.1" and v["node"] == h.gw.config.smtp.hostname
    assert "retry storm" in v["detail"]
    assert v["evidence"]["reply"].startswith("550 5.7.1 P-LOAD")
    assert v["evidence"]["mail_from"] == "alice@example.com" and v["evidence"]["recipients"] == 1
    assert abs(v["at"] - h.gw.clock()) < 60
    assert await list_violations(h.gw.engine, "alice", identity="site1") == []
    assert await list_violations(h.gw.engine, "bob") == []


async def test_the_class_follows_the_config_and_the_cli_prints_the_rows(gateway_factory, sink, tmp_path):
    db = tmp_path / "gw.db"
    h = await gateway_factory(sink, clock=FrozenClock(), limits=STORM, storage={"url": f"sqlite+aiosqlite:///{db}"},
                              strikes={"classes": {"rate_storm": "deliberate"}})
    await h.add_account()
    await _storm(h)

    async def stored() -> bool:
        return bool(await list_violations(h.gw.engine, "alice"))
    await until(stored, "the violation row")
    assert (await list_violations(h.gw.engine, "alice"))[0]["class"] == "deliberate"
    cfg = tmp_path / "cli.toml"
    cfg.write_text(GOOD.replace("{db}", str(db)))
    r = await run_cli_async("account", "events", "alice", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip().splitlines()
    assert len(line) == 1 and "\tP-LOAD\trate_storm\tdeliberate\t-\t" in line[0] and "retry storm" in line[0]
    r = await run_cli_async("account", "events", "alice", "--json", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)
    assert row["evidence"]["reply"].startswith("550 5.7.1") and row["kind"] == "rate_storm"
    r = await run_cli_async("account", "events", "nobody", "--config", str(cfg))
    assert r.returncode != 0 and "nobody" in r.stderr


def test_a_class_other_than_negligence_or_deliberate_is_a_config_error(tmp_path):
    from conftest import base_config
    from gateway.config import from_mapping
    from gateway.configload import ConfigError
    with pytest.raises(ConfigError) as e:
        from_mapping(base_config(tmp_path, None, strikes={"classes": {"bulk": "careless"}}), "gw.toml")
    assert e.value.key == "strikes.classes.bulk" and "negligence" in str(e.value)


async def test_rows_wait_while_the_database_refuses_and_are_written_after(pg_url):
    need(tcp_reachable("127.0.0.1", 5432), "PostgreSQL is not reachable at 127.0.0.1:5432")
    direct = create_engine(pg_url)
    await migrate(direct)
    proxy = await FaultProxy("127.0.0.1", 5432).start()
    proxied = create_engine(pg_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}"), connect_timeout=1.0,
                            command_timeout=2.0, pool_timeout=2.0)
    events = EventBus()
    rec = ViolationRecorder(proxied, events, lambda rule, kind: "negligence", flush_interval=0.05, timeout=2.0)
    session = SessionInfo(id="s1", peer_ip="192.0.2.7", peer_port=1, listener="test")
    try:
        await rec.start()
        await proxy.set_mode("cut")
        t0 = time.monotonic()
        for i in range(5):
            events.publish(Violation(session, "P-UCE", "bulk", f"copy {i}", "alice", None, None, "550 5.7.1 P-UCE"))
        assert time.monotonic() - t0 < 0.5, "publishing does not wait for the database"
        await eventually(lambda: rec.failing, "the failed write")
        assert rec.queued == 5 and rec.written == 0
        await proxy.set_mode("pass")
        await eventually(lambda: rec.written == 5, "the rows written once it answers", timeout=15)
        rows = await list_violations(direct, "alice")
        assert sorted(r["detail"] for r in rows) == [f"copy {i}" for i in range(5)]
        assert not rec.failing and rec.queued == 0 and rec.dropped == 0
    finally:
        await rec.stop()
        await proxied.dispose()
        await direct.dispose()
        await proxy.stop()


async def test_the_queue_is_bounded(tmp_path):
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'v.db'}")
    await migrate(engine)
    events = EventBus()
    rec = ViolationRecorder(engine, events, lambda rule, kind: "negligence", max_queued=3)
    session = SessionInfo(id="s1", peer_ip="192.0.2.7", peer_port=1, listener="test")
    for i in range(5):           # not started: nothing drains the queue
        events.publish(Violation(session, "P-LOAD", "rate_storm", f"v{i}", "alice"))
    assert rec.queued == 3 and rec.dropped == 2
    await rec.stop()             # writes what is queued
    assert sorted(r["detail"] for r in await list_violations(engine, "alice")) == ["v0", "v1", "v2"]
    await engine.dispose()
