"""HTTP request bodies bounded before authentication (issue 11, items 5 and 6),
over real loopback sockets with a raw HTTP/1.1 client (uvicorn serving the
app in this process, as the gateway does):

- an unauthenticated 100 MB POST (Content-Length or chunked) to the registry
  API and to the admin API gets 401 at once, the connection is closed, and
  this process's RSS does not grow by 10 MB while up to 20 MB are pushed at it
- an authenticated body over the route's limit gets 413 (declared, and
  counted when chunked); the subscriber import takes more than the others
- a body that stalls gets 408 at the route's deadline
- JSON nested 50,000 deep gets a 4xx JSON error on every JSON route, not 500
- requests within the limits work as before, on a kept-alive connection
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import orjson
import pytest

from gateway.config import ConfigError, HttpSettings, from_mapping
from gateway.registry.service import RegistryService
from gateway.registry.settings import RegistrySettings
from gateway.web.context import WebContext

from webkit import serve, shut, web_stores

ADMIN_KEY = "test-http-limits-admin-key"
MB = 1024 * 1024
LIMITS = {"max_body": 8 * 1024, "body_timeout": 1.5, "max_import_body": 256 * 1024, "import_body_timeout": 3.0}
DEEP = b"[" * 50_000 + b"]" * 50_000


@dataclass
class Web:
    port: int
    key: str           # an account's API key
    list_id: str
    registry: RegistryService


def _rss_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.fixture
async def web(tmp_path, request) -> AsyncIterator[Web]:
    http = HttpSettings(port=0, admin_key=ADMIN_KEY, **getattr(request, "param", LIMITS))
    async with web_stores(tmp_path) as stores:
        engine, accounts, blocklist = stores.engine, stores.accounts, stores.blocklist
        registry = RegistryService(engine, RegistrySettings(), secret=b"test-http-limits-registry-secret",
                                   hostname="gw.example", accounts=accounts)
        await registry.start(listen=False, outbox=False)
        await accounts.add("carol", "pw-carol")
        await accounts.add_domain("carol", "carol.example", approved_by="test")
        key = await registry.issue_api_key("carol")
        lst = await registry.create_list("carol", name="News", list_id="news.carol.example",
                                         senders=["news@carol.example"], confirm_from="confirm@carol.example")
        ctx = WebContext(http=http, accounts=accounts, blocklist=blocklist, registry=registry,
                         readiness=lambda: "ready", metrics=lambda: b"")
        server, task, port = await serve(ctx)
        try:
            yield Web(port, key, lst.id, registry)
        finally:
            await shut(server, task)
            await registry.stop()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool        # the server closed the connection after the answer
    sent: int           # body bytes the client got written before it stopped

    def json(self):
        return orjson.loads(self.body)


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def send(port: int, method: str, path: str, headers: dict[str, str], *, body: bytes = b"",
               push: int = 0, chunked: bool = False, declared: int | None = None, stall_after: int | None = None,
               deadline: float = 20.0) -> Answer:
    """One request on a new connection. ``body`` is sent as is; or ``push`` bytes
    are streamed (1 MiB writes, chunked or under ``declared`` Content-Length) while
    the answer is read; ``stall_after``: stop writing after that many bytes and wait."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sent = 0
    try:
        head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
        if chunked:
            head.append("Transfer-Encoding: chunked")
        else:
            head.append(f"Content-Length: {declared if declared is not None else len(body)}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode())

        async def pump() -> None:
            nonlocal sent
            try:
                if body:
                    writer.write(body)
                    sent += len(body)
                block = b"x" * MB
                while sent < push:
                    piece = block[:min(MB, push - sent)]
                    if stall_after is not None:
                        piece = piece[:max(0, stall_after - sent)]
                        if not piece:
                            return
                    writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                    await writer.drain()
                    sent += len(piece)
                if chunked and stall_after is None:
                    writer.write(b"0\r\n\r\n")
                await writer.drain()
            except (ConnectionError, OSError):
                pass   # the server closed the connection: expected once it answered

        pumping = asyncio.create_task(pump())
        try:
            async with asyncio.timeout(deadline):
                try:
                    status, got, data = await _read_answer(reader)
                except Exception as exc:
                    raise AssertionError(f"no answer: {exc!r} after {sent} bytes") from exc
                try:
                    closed = await reader.read(1) == b""
                except ConnectionResetError:
                    closed = True
        finally:
            pumping.cancel()
            await asyncio.gather(pumping, return_exceptions=True)
        return Answer(status, got, data, closed, sent)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}


# ---------------------------------------------------------------- 401 before the body
@pytest.mark.parametrize("path", ["/api/v1/lists", "/admin/blocklist"])
@pytest.mark.parametrize("chunked", [False, True])
async def test_unauthenticated_100mb_post_gets_401_without_the_body_being_read(web, path, chunked):
    before = _rss_kib()
    for headers in ({"Content-Type": "application/json"}, _bearer("not-a-key")):
        ans = await send(web.port, "POST", path, headers, push=20 * MB, chunked=chunked,
                         declared=None if chunked else 100 * 1000 * 1000)
        assert ans.status == 401, ans.body
        assert ans.json()["error"] == "unauthorized"
        assert ans.headers["connection"] == "close" and ans.closed
    grown = _rss_kib() - before
    assert grown < 10 * 1024, f"RSS grew by {grown} KiB"


async def test_unauthenticated_import_gets_401_before_the_body(web):
    ans = await send(web.port, "POST", f"/api/v1/lists/{web.list_id}/subscribers/import",
                     {"Content-Type": "text/csv"}, push=4 * MB, declared=100 * 1000 * 1000)
    assert (ans.status, ans.json()["error"], ans.closed) == (401, "unauthorized", True)


# ---------------------------------------------------------------- 413
async def test_authenticated_oversized_body_gets_413(web):
    admin = _bearer(ADMIN_KEY)
    as_carol = _bearer(web.key)
    for path, headers in (("/admin/blocklist", admin), ("/api/v1/lists", as_carol),
                          (f"/api/v1/lists/{web.list_id}/subscribers", as_carol)):
        ans = await send(web.port, "POST", path, headers, push=2 * MB, declared=100 * 1000 * 1000)
        assert ans.status == 413, (path, ans.body)
        assert ans.json()["error"] == "too_large" and str(LIMITS["max_body"]) in ans.json()["reason"]
        assert ans.closed
        # no Content-Length: counted while read, refused at the limit
        ans = await send(web.port, "POST", path, headers, push=2 * MB, chunked=True)
        assert (ans.status, ans.json()["error"], ans.closed) == (413, "too_large", True), path


async def test_the_import_takes_more_than_the_other_routes(web):
    rows = "".join(f"user{i}@example.org\n" for i in range(1000)).encode()   # ~20 KB: over max_body
    assert LIMITS["max_body"] < len(rows) < LIMITS["max_import_body"]
    headers = {"Authorization": f"Bearer {web.key}", "Content-Type": "text/csv"}
    ans = await send(web.port, "POST", f"/api/v1/lists/{web.list_id}/subscribers/import", headers, body=rows)
    assert ans.status == 202, ans.body
    assert ans.json()["queued"] == 1000
    ans = await send(web.port, "POST", f"/api/v1/lists/{web.list_id}/subscribers/import", headers,
                     push=LIMITS["max_import_body"] + 1, chunked=True)
    assert (ans.status, ans.json()["error"]) == (413, "too_large")
    assert str(LIMITS["max_import_body"]) in ans.json()["reason"]
    # the same body elsewhere is over that route's limit
    ans = await send(web.port, "POST", "/api/v1/lists", _bearer(web.key), body=rows)
    assert ans.status == 413


# ---------------------------------------------------------------- 408
@pytest.mark.parametrize("chunked", [False, True])
async def test_a_stalled_body_gets_408_at_the_deadline(web, chunked):
    ans = await send(web.port, "POST", "/admin/blocklist", _bearer(ADMIN_KEY), push=100, chunked=chunked,
                     declared=None if chunked else 100, stall_after=10,
                     deadline=LIMITS["body_timeout"] + 10)
    assert ans.status == 408, ans.body
    assert ans.json()["error"] == "timeout" and ans.closed
    ans = await send(web.port, "POST", f"/api/v1/lists/{web.list_id}/subscribers/import",
                     {"Authorization": f"Bearer {web.key}", "Content-Type": "text/csv"}, push=1000,
                     declared=1000, stall_after=10, deadline=LIMITS["import_body_timeout"] + 10)
    assert (ans.status, ans.json()["error"]) == (408, "timeout")
    assert f"{LIMITS['import_body_timeout']:g} seconds" in ans.json()["reason"]


# ---------------------------------------------------------------- deep JSON
@pytest.mark.parametrize("web", [{**LIMITS, "max_body": 256 * 1024}], indirect=True)
async def test_deeply_nested_json_gets_a_4xx_json_error(web):
    as_carol = _bearer(web.key)
    routes = [("/admin/blocklist", _bearer(ADMIN_KEY)), ("/api/v1/lists", as_carol),
              (f"/api/v1/lists/{web.list_id}/subscribers", as_carol),
              (f"/api/v1/lists/{web.list_id}/subscribers/resend", as_carol),
              (f"/api/v1/lists/{web.list_id}/subscribers/import", as_carol),
              ("/api/v1/admin/accounts/carol/api-keys", _bearer(ADMIN_KEY))]
    for path, headers in routes:
        for body in (DEEP, b'{"name": ' + DEEP + b"}"):
            ans = await send(web.port, "POST", path, headers, body=body)
            assert 400 <= ans.status < 500, (path, ans.status, ans.body[:200])
            assert ans.headers["content-type"].startswith("application/json"), path
            assert ans.json()["error"] in ("invalid", "validation", "bad_request"), (path, ans.body[:200])


# ---------------------------------------------------------------- within the limits
async def test_requests_within_the_limits_work_on_a_kept_alive_connection(web):
    reader, writer = await asyncio.open_connection("127.0.0.1", web.port)
    try:
        async with asyncio.timeout(20):
            for value in ("192.0.2.1", "192.0.2.2"):
                body = orjson.dumps({"kind": "ip", "value": value})
                writer.write((f"POST /admin/blocklist HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_KEY}\r\n"
                              f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
                             + body)
                status, headers, data = await _read_answer(reader)
                assert status == 201, data
                assert headers.get("connection") != "close"
            writer.write(f"GET /api/v1/lists HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {web.key}\r\n\r\n".encode())
            status, headers, data = await _read_answer(reader)
            assert status == 200 and [lst["name"] for lst in orjson.loads(data)["lists"]] == ["News"]
            writer.write(b"GET /api/v1/lists HTTP/1.1\r\nHost: x\r\n\r\n")   # no body: the route's own 401
            status, headers, data = await _read_answer(reader)
            assert status == 401 and orjson.loads(data)["error"] == "unauthorized"
    finally:
        writer.close()


def test_body_limits_are_config_keys():
    base = {"listeners": [{"tls": "none"}], "relay": {"upstreams": [{"host": "127.0.0.1"}]}}
    cfg = from_mapping(base, "<t>")
    assert (cfg.http.max_body, cfg.http.body_timeout) == (64 * 1024, 10.0)
    assert (cfg.http.max_import_body, cfg.http.import_body_timeout) == (16 * MB, 120.0)
    for key in ("max_body", "body_timeout", "max_import_body", "import_body_timeout"):
        with pytest.raises(ConfigError) as err:
            from_mapping({**base, "http": {key: 0}}, "<t>")
        assert err.value.key == f"http.{key}" and "greater than 0" in err.value.problem
