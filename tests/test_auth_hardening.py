"""Config foot-guns refused and password verification hardened (issue 11, item 9).

- check-config and serve refuse auth_without_tls on a listener that is not
  loopback, scrypt_n below 2^14 (unless auth.insecure_test_scrypt, which they
  warn about) and above 2^17, naming the file, the key and the problem, exit 2
- the default cost is 2^15 and the example config says so
- the dummy hash an unknown account is checked against carries the configured
  n/r/p, and the unknown-account path runs the same verification with it
- a hash made at another cost is renewed at the configured one after a
  successful AUTH
- at most auth.max_concurrent_verifications verifications run at once
"""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from conftest import run_cli
from gateway.accounts import store as store_mod
from gateway.accounts.passwords import DEFAULT_N, P, R, dummy_hash, hash_params, verify_password
from gateway.accounts.store import AccountStore
from gateway.config import ConfigError, config_warnings, from_mapping, load
from gateway.storage.db import create_engine, migrate

REPO = Path(__file__).resolve().parent.parent

BASE = """
[[listeners]]
name = "smtp"
address = "{address}"
port = 2525
tls = "none"
auth_without_tls = {awt}

[[relay.upstreams]]
host = "127.0.0.1"
port = 2526

[storage]
url = "sqlite+aiosqlite:///{db}"

[http]
enabled = false
"""


def write(tmp_path: Path, *, address: str = "127.0.0.1", awt: bool = False, auth: str = "") -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(BASE.format(address=address, awt=str(awt).lower(), db=tmp_path / "gw.db")
                    + (f"[auth]\n{auth}\n" if auth else ""))
    return path


def refused(path: Path, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(path, env={})
    assert (err.value.source, err.value.key) == (str(path), key)
    assert problem in err.value.problem
    for argv in (("check-config", str(path)), ("serve", "--config", str(path))):
        result = run_cli(*argv, timeout=60)
        assert result.returncode == 2, (argv, result.stderr)
        assert str(path) in result.stderr and key in result.stderr and problem in result.stderr


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "192.0.2.10", "2001:db8::1"])
def test_auth_without_tls_refused_off_loopback(tmp_path, address):
    refused(write(tmp_path, address=address, awt=True), "listeners[0].auth_without_tls", "only on a loopback listener")


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.2", "::1"])
def test_auth_without_tls_allowed_on_loopback(tmp_path, address):
    cfg = load(write(tmp_path, address=address, awt=True), env={})
    assert cfg.listeners[0].auth_without_tls is True


def test_clear_text_listener_without_auth_is_fine_anywhere(tmp_path):
    cfg = load(write(tmp_path, address="0.0.0.0"), env={})
    assert cfg.listeners[0].auth_without_tls is False


def test_low_scrypt_n_refused(tmp_path):
    refused(write(tmp_path, auth="scrypt_n = 8192"), "auth.scrypt_n", "at least 2^14")


def test_scrypt_n_above_two_to_the_17_refused(tmp_path):
    refused(write(tmp_path, auth="scrypt_n = 262144"), "auth.scrypt_n", "at most 2^17")


def test_insecure_test_scrypt_allows_low_n_and_is_warned_about(tmp_path):
    path = write(tmp_path, auth="scrypt_n = 16\ninsecure_test_scrypt = true")
    cfg = load(path, env={})
    assert cfg.auth.scrypt_n == 16
    (warning,) = config_warnings(cfg)
    assert str(path) in warning and "auth.insecure_test_scrypt" in warning and "never set this in production" in warning
    result = run_cli("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert "WARNING:" in result.stderr and "auth.insecure_test_scrypt" in result.stderr


def test_default_scrypt_n_and_no_warning(tmp_path):
    cfg = load(write(tmp_path), env={})
    assert cfg.auth.scrypt_n == DEFAULT_N == 2 ** 15
    assert cfg.auth.max_concurrent_verifications == 2
    assert config_warnings(cfg) == []
    result = run_cli("check-config", str(write(tmp_path)))
    assert result.returncode == 0 and "WARNING" not in result.stderr


def test_example_config_documents_the_default():
    text = (REPO / "deploy" / "gateway.example.toml").read_text()
    assert f"# scrypt_n = {DEFAULT_N}" in text
    assert "max_concurrent_verifications" in text


def test_max_concurrent_verifications_bounds():
    for bad in (0, 65):
        with pytest.raises(ConfigError) as err:
            from_mapping({"relay": {"upstreams": [{"host": "127.0.0.1"}]},
                          "auth": {"max_concurrent_verifications": bad}}, "<t>")
        assert err.value.key == "auth.max_concurrent_verifications"


# ---------------------------------------------------------------- the account store
@pytest.fixture
async def engine(tmp_path):
    eng = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'acc.db'}")
    await migrate(eng)
    try:
        yield eng
    finally:
        await eng.dispose()


def test_dummy_hash_carries_the_given_parameters():
    for n in (2 ** 4, 2 ** 14, 2 ** 17):
        assert hash_params(dummy_hash(n)) == (n, R, P)
    assert dummy_hash(16) != dummy_hash(16)           # a fresh salt and digest each time
    assert verify_password("", dummy_hash(16)) is False


async def test_unknown_account_is_verified_like_a_known_one(engine, monkeypatch):
    n = 2 ** 5
    store = AccountStore(engine, scrypt_n=n)
    await store.refresh()
    await store.add("known", "right")
    seen: list[str] = []
    real = store_mod.verify_password_async

    async def recording(password, encoded):
        seen.append(encoded)
        return await real(password, encoded)

    monkeypatch.setattr(store_mod, "verify_password_async", recording)
    assert await store.authenticate("known", b"right") is not None
    assert await store.authenticate("known", b"wrong") is None
    assert await store.authenticate("nobody", b"right") is None
    assert len(seen) == 3
    assert [hash_params(e) for e in seen] == [(n, R, P)] * 3
    assert seen[2] == store.dummy_hash


async def test_hash_at_another_cost_is_renewed_after_a_good_auth(engine):
    old = AccountStore(engine, scrypt_n=2 ** 4)
    await old.refresh()
    await old.add("shop", "pw")
    new = AccountStore(engine, scrypt_n=2 ** 6)
    await new.refresh()
    assert await new.authenticate("shop", b"wrong") is None
    assert hash_params(await _stored_hash(engine, "shop")) == (2 ** 4, R, P)   # a failed AUTH changes nothing
    assert (await new.authenticate("shop", b"pw")).name == "shop"
    # renewed in the background (the AUTH reply never waits for the write)
    deadline = time.monotonic() + 10
    while hash_params(await _stored_hash(engine, "shop")) != (2 ** 6, R, P):
        assert time.monotonic() < deadline, "the hash was not renewed"
        await asyncio.sleep(0.02)
    assert await new.authenticate("shop", b"pw") is not None


async def _stored_hash(engine, name: str) -> str:
    import sqlalchemy as sa

    from gateway.storage.schema import accounts
    async with engine.connect() as conn:
        return (await conn.execute(sa.select(accounts.c.password_hash).where(accounts.c.name == name))).scalar()


async def test_concurrent_verifications_are_capped(engine, monkeypatch):
    store = AccountStore(engine, scrypt_n=2 ** 4, max_concurrent_verifications=2)
    await store.refresh()
    running = 0
    peak = 0
    release = asyncio.Event()
    entered = asyncio.Condition()

    async def slow(password, encoded):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        async with entered:
            entered.notify_all()
        await release.wait()
        running -= 1
        return False

    monkeypatch.setattr(store_mod, "verify_password_async", slow)
    tasks = [asyncio.create_task(store.authenticate(f"user{i}", b"x")) for i in range(6)]
    async with asyncio.timeout(10):
        async with entered:
            await entered.wait_for(lambda: running == 2)
        for _ in range(20):            # let every other task reach the semaphore
            await asyncio.sleep(0)
        assert running == 2
        release.set()
        assert await asyncio.gather(*tasks) == [None] * 6
    assert peak == 2
