"""The registry CLI as real processes: `gateway account apikey` and
`gateway list add|list|show|delete|import`; imported subscribers get their
confirmation mail from the running gateway."""
from __future__ import annotations

import asyncio
import re
import subprocess
import time
from pathlib import Path


from gateway.config import load
from gateway.registry.service import RegistryService
from gateway.storage.db import create_engine

from conftest import run_cli_async
from test_config_cli import GOOD

SECRET = "cli-test-registry-secret-0123456789abcdef"

CONFIG = GOOD + """
[registry]
secret = "env:GW_TEST_CLI_REGISTRY_SECRET"
"""
ENV = {"GW_TEST_CLI_REGISTRY_SECRET": SECRET, "PW": "pw-not-secret"}


def _config(tmp_path: Path) -> Path:
    p = tmp_path / "gateway.toml"
    p.write_text(CONFIG.replace("{db}", str(tmp_path / "gw.db")))
    return p


async def cli(*args: str) -> subprocess.CompletedProcess:
    return await run_cli_async(*args, env=ENV)


async def _service(path: Path) -> tuple[RegistryService, object]:
    config = load(path, env=ENV)
    engine = create_engine(config.storage.url)
    return RegistryService(engine, config.registry, secret=SECRET.encode()), engine


async def test_apikey_cli(tmp_path):
    cfg = str(_config(tmp_path))
    r = await cli("account", "add", "alice", "--config", cfg, "--password-env", "PW")
    assert r.returncode == 0, r.stderr
    r = await cli("account", "apikey", "alice", "--label", "newsletter tool", "--config", cfg)
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip()
    assert re.fullmatch(r"gwk_[A-Za-z0-9_-]{40,}", key), r.stdout
    assert "shown once" in r.stderr and key not in r.stderr
    r2 = await cli("account", "apikey", "alice", "--config", cfg)
    assert r2.returncode == 0 and r2.stdout.strip() != key       # every call issues a new key

    svc, engine = await _service(Path(cfg))
    try:
        assert await svc.account_for_api_key(key) == "alice"
        assert await svc.account_for_api_key(r2.stdout.strip()) == "alice"
        assert await svc.account_for_api_key(key + "x") is None
    finally:
        await engine.dispose()
    # only the hash is stored
    assert key.encode() not in (tmp_path / "gw.db").read_bytes()

    r = await cli("account", "apikey", "nobody", "--config", cfg)
    assert r.returncode == 1 and "no account 'nobody'" in r.stderr and not r.stdout.strip()


async def test_list_cli_and_import(tmp_path, sink, gateway_factory):
    cfg = str(_config(tmp_path))
    for args in (("account", "add", "alice", "--password-env", "PW"),
                 ("account", "domain", "add", "alice", "example.com", "--approve"),
                 ("account", "add", "mallory", "--password-env", "PW")):
        r = await cli(*args, "--config", cfg)
        assert r.returncode == 0, (args, r.stderr)

    # add: the domain must be one of the account's
    r = await cli("list", "add", "alice", "--name", "Example News", "--list-id", "news.example.com",
                  "--sender", "news@example.com", "--sender", "bounces-*@example.com",
                  "--confirm-from", "confirm@example.com", "--config", cfg)
    assert r.returncode == 0, r.stderr
    m = re.search(r"^list ([0-9a-f]{16}) \(alice\)$", r.stdout, re.M)
    assert m, r.stdout
    lid = m.group(1)
    assert '"Example News" <news.example.com>' in r.stdout
    assert "news@example.com, bounces-*@example.com" in r.stdout and "confirm@example.com" in r.stdout
    r = await cli("list", "add", "alice", "--name", "Other", "--list-id", "other.example.com",
                  "--sender", "news@example.net", "--confirm-from", "confirm@example.com", "--config", cfg)
    assert r.returncode == 1 and "senders[0]" in r.stderr and "not a verified sender domain" in r.stderr, r.stderr
    r = await cli("list", "add", "alice", "--name", "Bad", "--list-id", "nodots",
                  "--sender", "b@example.com", "--confirm-from", "confirm@example.com", "--config", cfg)
    assert r.returncode == 1 and "list_id" in r.stderr, r.stderr
    r = await cli("list", "add", "alice", "--name", "No sender", "--list-id", "x.example.com",
                  "--confirm-from", "confirm@example.com", "--config", cfg)
    assert r.returncode == 2 and "--sender" in r.stderr                   # argparse: required

    # list, show
    r = await cli("list", "list", "alice", "--config", cfg)
    assert r.returncode == 0
    assert r.stdout.splitlines() == [f"{lid}\tnews.example.com\tExample News\tnews@example.com,bounces-*@example.com"]
    r = await cli("list", "list", "mallory", "--config", cfg)
    assert r.returncode == 0 and r.stdout == ""
    r = await cli("list", "show", "alice", lid, "--config", cfg)
    assert r.returncode == 0 and "0 confirmed, 0 pending, 0 opted out" in r.stdout, r.stdout
    # another account's list is not found, exactly like a missing one
    theirs = await cli("list", "show", "mallory", lid, "--config", cfg)
    missing = await cli("list", "show", "mallory", "0123456789abcdef", "--config", cfg)
    assert theirs.returncode == missing.returncode == 1
    assert theirs.stderr == missing.stderr and "no such list" in theirs.stderr

    # import: a CSV with a header and consent evidence
    csv1 = tmp_path / "subs.csv"
    # The consent time comes from the clock (a fixed day lies in the future when the suite runs a year back).
    asked = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 30 * 86400))
    csv1.write_text("address,source,ip,user_agent,requested_at\n"
                    f"Bob@Example.ORG,form on example.com,198.51.100.7,Mozilla/5.0,{asked}\n"
                    "carol@example.org,,,,\n"
                    "Bob@EXAMPLE.org,again,,,\n"           # the same address (domains compare case-free)

                    "\n"
                    "dave@example.org,shop,192.0.2.1,,\n")
    r = await cli("list", "import", "alice", lid, str(csv1), "--source", "old newsletter", "--config", cfg)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("3 subscriber(s) added as pending"), r.stdout
    assert "duplicate: 1" in r.stdout and "Bob@example.org: duplicate" in r.stderr
    # one address a line; a second import reports existing ones
    csv2 = tmp_path / "plain.csv"
    csv2.write_text("carol@example.org\nerin@example.org\n")
    r = await cli("list", "import", "alice", lid, str(csv2), "--config", cfg)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("1 subscriber(s) added as pending") and "exists: 1" in r.stdout, r.stdout
    # an invalid row is reported with its line in the file (the header is line 1); the others are
    # imported, and the exit status says that rows were bad (test_registry_import has more)
    bad = tmp_path / "bad.csv"
    bad.write_text("address\nfrank@example.org\nnot-an-address\n")
    r = await cli("list", "import", "alice", lid, str(bad), "--config", cfg)
    assert r.returncode == 3 and f"{bad}:3: invalid: address:" in r.stderr, r.stderr
    assert r.stdout.startswith("1 subscriber(s) added as pending") and "invalid: 1" in r.stdout, r.stdout
    badcol = tmp_path / "badcol.csv"
    badcol.write_text("address,colour\nx@example.org,blue\n")
    r = await cli("list", "import", "alice", lid, str(badcol), "--config", cfg)
    assert r.returncode != 0 and "unknown column" in r.stderr and "colour" in r.stderr, r.stderr
    r = await cli("list", "show", "alice", lid, "--config", cfg)
    assert "0 confirmed, 5 pending, 0 opted out" in r.stdout, r.stdout

    # the consent evidence of the CSV was kept
    svc, engine = await _service(Path(cfg))
    try:
        bob = await svc.subscriber("alice", lid, "Bob@example.org")
        assert bob.status == "pending" and bob.source == "form on example.com"
        assert bob.requested_ip == "198.51.100.7" and bob.requested_user_agent == "Mozilla/5.0"
        assert bob.confirmation == "queued"
        carol = await svc.subscriber("alice", lid, "carol@example.org")
        assert carol.source == "old newsletter"
    finally:
        await engine.dispose()

    # the running gateway (same database and secret) sends the queued confirmation mails
    h = await gateway_factory(sink, registry={"secret": SECRET, "outbox_interval": 0.2,
                                              "public_base_url": "http://127.0.0.1:1"})
    await sink.wait_for(5, timeout=15)
    assert sorted(m.rcpt_tos[0] for m in sink.messages) == ["Bob@example.org", "carol@example.org",
                                                            "dave@example.org", "erin@example.org",
                                                            "frank@example.org"]
    assert {m.mail_from for m in sink.messages} == {"confirm@example.com"}
    assert all(b"/confirm/" in m.data for m in sink.messages)
    for _ in range(100):
        stats = await h.gw.registry.list_stats("alice", lid)
        if stats["confirmation_mails"].get("sent") == 5:
            break
        await asyncio.sleep(0.05)
    assert stats["confirmation_mails"] == {"sent": 5}, stats

    # delete: the list goes with its subscribers
    r = await cli("list", "delete", "alice", lid, "--config", cfg)
    assert r.returncode == 0 and f"list {lid} deleted" in r.stdout, r.stderr
    r = await cli("list", "list", "alice", "--config", cfg)
    assert r.returncode == 0 and r.stdout == ""
    r = await cli("list", "delete", "alice", lid, "--config", cfg)
    assert r.returncode == 1 and "no such list" in r.stderr
    # what the gateway serves follows (local invalidation mode: within poll_interval)
    for _ in range(60):
        if await h.gw.registry.list_for_sender("alice", "news@example.com") is None:
            break
        await asyncio.sleep(0.05)
    assert await h.gw.registry.list_for_sender("alice", "news@example.com") is None
