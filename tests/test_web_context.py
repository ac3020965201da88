"""The HTTP side built from its typed context alone (gateway.web.context), no Gateway.

- the app answers /healthz, /readyz (its state read through the context's
  callable at request time), /metrics and the admin API over real sockets
- with a registry in the context, the registry API and the pages are mounted
  and the account's suspension comes from the context's account store;
  without one they are not mounted
- no module under gateway/web/ imports gateway.app, not even for type
  checking, and importing the web app does not load it
"""
from __future__ import annotations

import ast
import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import FrozenInstanceError
from pathlib import Path

import httpx
import pytest
import uvicorn

from gateway.accounts.model import AccountStatus
from gateway.config import HttpSettings
from gateway.registry.service import RegistryService
from gateway.registry.settings import RegistrySettings
from gateway.web.context import Readiness, WebContext, readiness_of

import webkit
from webkit import Stores, shut, web_stores

ADMIN_KEY = "test-web-context-admin-key"
WEB = Path(__file__).resolve().parent.parent / "gateway" / "web"


@pytest.fixture
async def stores(tmp_path) -> AsyncIterator[Stores]:
    async with web_stores(tmp_path) as s:
        yield s


async def serve(ctx: WebContext) -> tuple[uvicorn.Server, asyncio.Task, str]:
    server, task, port = await webkit.serve(ctx)
    return server, task, f"http://127.0.0.1:{port}"


def context(stores: Stores, state: list[Readiness], *, registry: RegistryService | None = None,
            admin_key: str = ADMIN_KEY) -> WebContext:
    return WebContext(http=HttpSettings(port=0, admin_key=admin_key), accounts=stores.accounts,
                      blocklist=stores.blocklist, registry=registry,
                      readiness=lambda: state[0], metrics=lambda: b"# the context's metrics\nup 1.0\n")


def test_readiness_of():
    assert readiness_of(ready=False, draining=False) == "starting"
    assert readiness_of(ready=True, draining=False) == "ready"
    assert readiness_of(ready=True, draining=True) == "draining"
    assert readiness_of(ready=False, draining=True) == "draining"


async def test_ops_and_admin_from_a_context_alone(stores):
    state: list[Readiness] = ["starting"]
    ctx = context(stores, state)
    with pytest.raises(FrozenInstanceError):
        ctx.registry = None  # type: ignore[misc]
    server, task, base = await serve(ctx)
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    try:
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            assert (await http.get("/healthz")).json() == {"status": "ok"}
            r = await http.get("/readyz")
            assert (r.status_code, r.json()) == (503, {"status": "starting"})
            state[0] = "ready"
            r = await http.get("/readyz")
            assert (r.status_code, r.json()) == (200, {"status": "ready"})
            state[0] = "draining"
            r = await http.get("/readyz")
            assert (r.status_code, r.json()) == (503, {"status": "draining"})

            r = await http.get("/metrics")
            assert r.status_code == 200 and r.text == "# the context's metrics\nup 1.0\n"
            assert r.headers["content-type"].startswith("text/plain")

            assert (await http.get("/admin/blocklist")).status_code == 401
            r = await http.post("/admin/blocklist", json={"kind": "domain", "value": "Bad.Example",
                                                          "reason": "abuse"}, headers=auth)
            assert r.status_code == 201 and r.json()["value"] == "bad.example"
            r = await http.get("/admin/blocklist", headers=auth)
            assert r.status_code == 200
            assert [(e["kind"], e["value"]) for e in r.json()["entries"]] == [("domain", "bad.example")]
            assert [e.value for e in await stores.blocklist.list("domain")] == ["bad.example"]

            # no registry in the context: its API and pages are not mounted
            assert (await http.get("/api/v1/lists", headers=auth)).status_code == 404
            assert (await http.get("/confirm/whatever")).status_code == 404
    finally:
        await shut(server, task)


async def test_admin_api_disabled_without_a_key(stores):
    server, task, base = await serve(context(stores, ["ready"], admin_key=""))
    try:
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            r = await http.get("/admin/blocklist", headers={"Authorization": "Bearer anything"})
            assert r.status_code == 503 and r.json()["error"] == "disabled"
    finally:
        await shut(server, task)


async def test_registry_from_the_context(stores):
    registry = RegistryService(stores.engine, RegistrySettings(), secret=b"test-web-context-registry-secret",
                               hostname="gw.example", accounts=stores.accounts)
    await registry.start(listen=False, outbox=False)
    await stores.accounts.add("carol", "pw-carol")
    await stores.accounts.add_domain("carol", "carol.example", approved_by="test")
    key = await registry.issue_api_key("carol")
    server, task, base = await serve(context(stores, ["ready"], registry=registry))
    try:
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            as_admin = {"Authorization": f"Bearer {ADMIN_KEY}", "X-Account": "carol"}
            body = {"name": "News", "list_id": "news.carol.example", "senders": ["news@carol.example"],
                    "confirm_from": "confirm@carol.example"}
            r = await http.post("/api/v1/lists", json=body, headers=as_admin)
            assert r.status_code == 201, r.text
            r = await http.get("/api/v1/lists", headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200 and [lst["name"] for lst in r.json()["lists"]] == ["News"]

            r = await http.get("/confirm/not-a-token")
            assert r.status_code == 400 and "text/html" in r.headers["content-type"]

            await stores.accounts.set_status("carol", AccountStatus.SUSPENDED)
            r = await http.get("/api/v1/lists", headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 403 and r.json()["error"] == "suspended"
    finally:
        await shut(server, task)
        await registry.stop()


def _imports(path: Path) -> list[str]:
    """Every module ``path`` imports, relative imports resolved (TYPE_CHECKING blocks included)."""
    package = "gateway.web"
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            names.append(module)
            names += [f"{module}.{alias.name}" for alias in node.names]
    return names


def test_no_web_module_imports_the_composition_root():
    modules = sorted(WEB.glob("*.py"))
    assert {p.name for p in modules} >= {"app.py", "admin.py", "pages.py", "registry_api.py", "context.py"}
    for path in modules:
        offending = [n for n in _imports(path) if n == "gateway.app" or n.startswith("gateway.app.")]
        assert offending == [], f"{path.name} imports {offending}"
    # and at run time: the web app loads without the composition root
    code = ("import sys, gateway.web.app, gateway.web.context, gateway.web.registry_api; "
            "print('gateway.app' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
