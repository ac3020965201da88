"""The operators' HTTP admin API (``/admin``): block lists (P-BLOCK).

Authentication: ``Authorization: Bearer <http.admin_key>``, compared in
constant time; a missing or wrong key answers 401. With no admin key
configured the whole admin API answers 503 ("admin API disabled"). A request
with a body is answered so before the body is read (``admin_gate``, run by
``web/limits.py``, which also bounds the body: 413 / 408).

    GET    /admin/blocklist[?kind=ip|domain|hostname]   -> 200 {"version", "entries": [...]}
    POST   /admin/blocklist  {"kind", "value", "reason"?} -> 201 entry | 409 | 422
    DELETE /admin/blocklist/{kind}/{value}               -> 200 {"removed": entry} | 404 | 422

A CIDR value in the path keeps its slash (``/admin/blocklist/ip/192.0.2.0/24``)
or percent-encodes it. Errors are JSON: ``{"error": code, "errors": [{"field",
"reason"}]}`` for 422, ``{"error": code, "reason"}`` otherwise.
"""
from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.datastructures import Headers
from starlette.types import Scope

from ..blocklist.model import KINDS, BlockError, Invalid
from .context import WebContext
from .jsonresponse import OrjsonResponse
from .limits import Gate

log = logging.getLogger("gateway.admin")

_BODY_FIELDS = {"kind", "value", "reason"}


def _error(status: int, code: str, reason: str, headers: dict[str, str] | None = None) -> Response:
    return OrjsonResponse({"error": code, "reason": reason}, status_code=status, headers=headers)


def _invalid(field: str, reason: str) -> Response:
    return OrjsonResponse({"error": "invalid", "errors": [{"field": field, "reason": reason}]}, status_code=422)


def _from_block_error(exc: BlockError) -> Response:
    if isinstance(exc, Invalid):
        return _invalid(exc.field or "value", exc.reason)
    return OrjsonResponse({"error": exc.code, "reason": exc.reason, "field": exc.field}, status_code=exc.status)


def is_admin_key(admin_key: str | None, presented: str) -> bool:
    """Is ``presented`` the operators' admin key? Compared in constant time; never with no key configured."""
    if not admin_key:
        return False
    return hmac.compare_digest(presented.encode("utf-8", "surrogatepass"), admin_key.encode("utf-8", "surrogatepass"))


async def _storage_call(fn: Callable[[], Awaitable[Any]], failure: str) -> tuple[Any, Response | None]:
    """``(await fn(), None)``, or ``(None, response)`` for a refused change or a storage failure
    (logged as ``failure``)."""
    try:
        return await fn(), None
    except BlockError as exc:
        return None, _from_block_error(exc)
    except Exception:
        log.exception(failure)
        return None, _error(503, "unavailable", "storage unavailable, try again")


def admin_denied(ctx: WebContext, headers: Headers) -> Response | None:
    """The answer to a request without the admin key (401), or with the admin API off (503); None: let it in."""
    key = ctx.http.admin_key
    if not key:
        return _error(503, "disabled", "admin API disabled (set http.admin_key)")
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not is_admin_key(key, token.strip()):
        return _error(401, "unauthorized", "the admin key is needed (Authorization: Bearer KEY)",
                      {"WWW-Authenticate": "Bearer"})
    return None


def admin_gate(ctx: WebContext) -> Gate:
    """The admin key checked from the headers before a body is read (web/limits.py)."""
    async def gate(scope: Scope) -> Response | None:
        return admin_denied(ctx, Headers(scope=scope))
    return gate


def admin_router(ctx: WebContext) -> APIRouter:
    router = APIRouter(prefix="/admin", tags=["admin"])

    def denied(request: Request) -> Response | None:
        return admin_denied(ctx, request.headers)

    def who(request: Request) -> str:
        return f"admin-api {request.client.host}" if request.client else "admin-api"

    @router.get("/blocklist", summary="list block-list entries")
    async def list_entries(request: Request, kind: str | None = None) -> Response:
        if (resp := denied(request)) is not None:
            return resp
        if kind is not None and kind not in KINDS:
            return _invalid("kind", f"must be one of {', '.join(KINDS)}")
        bl = ctx.blocklist
        entries, failed = await _storage_call(lambda: bl.list(kind), "block list read failed")
        if failed is not None:
            return failed
        return OrjsonResponse({"version": bl.snapshot.version, "entries": [e.as_dict() for e in entries]})

    @router.post("/blocklist", status_code=201, summary="add a block-list entry")
    async def add_entry(request: Request) -> Response:
        if (resp := denied(request)) is not None:
            return resp
        try:
            # orjson: nesting deeper than 1024 is a JSONDecodeError (a ValueError), never a RecursionError
            body: Any = orjson.loads(await request.body())
        except ValueError:
            return _invalid("body", "must be a JSON object (at most 1024 levels deep)")
        if not isinstance(body, dict):
            return _invalid("body", "must be a JSON object")
        unknown = sorted(set(body) - _BODY_FIELDS)
        if unknown:
            return _invalid(str(unknown[0]), "unknown field")
        for name in ("kind", "value"):
            if name not in body:
                return _invalid(name, "required")
        entry, failed = await _storage_call(
            lambda: ctx.blocklist.add(body["kind"], body["value"], body.get("reason") or "", who(request)),
            "block list change failed")
        if failed is not None:
            return failed
        log.info("block list: %s added %s %s", who(request), entry.kind, entry.value)
        return OrjsonResponse(entry.as_dict(), status_code=201)

    @router.delete("/blocklist/{kind}/{value:path}", summary="remove a block-list entry")
    async def remove_entry(request: Request, kind: str, value: str) -> Response:
        if (resp := denied(request)) is not None:
            return resp
        entry, failed = await _storage_call(lambda: ctx.blocklist.remove(kind, value), "block list change failed")
        if failed is not None:
            return failed
        log.info("block list: %s removed %s %s", who(request), entry.kind, entry.value)
        return OrjsonResponse({"removed": entry.as_dict()})

    return router
