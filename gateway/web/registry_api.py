"""The registry's HTTP API (``/api/v1``): lists, subscribers, statistics, API keys.

Authentication: ``Authorization: Bearer <key>`` (or ``X-API-Key``). An account
key sees only its own account's lists; another account's list answers 404
exactly like one that does not exist (P-HARVEST). The operators' admin key
(``http.admin_key``) acts for the account named in ``X-Account`` and may issue
API keys. A request with a body is authenticated from its headers before the
body is read (``registry_gate``, run by ``web/limits.py``, which also bounds
the body: 413 / 408).

Errors are JSON: ``{"error": code, "errors": [{"field", "reason"}]}`` for 422,
``{"error": code, "reason", "field"?}`` otherwise.
"""
# No "from __future__ import annotations": FastAPI must see the local Annotated
# dependency aliases (Account, ListPath) as objects, not strings.
import csv
import io
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, FastAPI, Header, Path, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope

from ..registry import csvimport
from ..registry.model import Conflict, Invalid, NotFound, RateLimited, RegistryUnavailable
from .admin import is_admin_key
from .context import WebContext
from .jsonresponse import OrjsonResponse
from .limits import Gate

if TYPE_CHECKING:  # pragma: no cover
    from ..registry.service import RegistryService

TAG = "registry"


# ------------------------------------------------------------------ request/response models
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ListCreate(_Strict):
    name: str = Field(..., max_length=128, description="shown in List-Id and the confirmation mail")
    list_id: str = Field(..., max_length=255, description="RFC 2919 identifier, e.g. news.example.com")
    senders: list[str] = Field(..., min_length=1, max_length=20,
                               description="envelope senders (MAIL FROM) of the list's mail; "
                                           "'*' in the local part for VERP, e.g. bounces-*@example.com")
    confirm_from: str = Field(..., max_length=320, description="From: of the confirmation mail")


class ListOut(BaseModel):
    id: str
    name: str
    list_id: str
    senders: list[str]
    confirm_from: str
    created_at: float


class Evidence(_Strict):
    address: str = Field(..., max_length=320)
    source: str = Field("", max_length=255, description="where the person subscribed (form URL, event, ...)")
    ip: str = Field("", max_length=64, description="IP address the subscription was requested from")
    user_agent: str = Field("", max_length=512, description="user agent the subscription was requested with")
    requested_at: datetime | float | None = Field(None, description="when it was requested (default: now)")


class SubscriberAdd(Evidence):
    reoptin: bool = Field(False, description="the address opted out before: start a new double opt-in "
                                             "(the person must confirm again)")


class SubscriberImport(_Strict):
    subscribers: list[Evidence] = Field(..., min_length=1, description="each row is checked on its own: a bad "
                                                                       "one is reported, the others imported")
    source: str = Field("", max_length=255, description="default source for rows without one")
    reoptin: bool = False


class _ImportEnvelope(_Strict):
    """SubscriberImport with the rows unchecked: each is validated on its own."""
    subscribers: list[Any] = Field(..., min_length=1)
    source: str = Field("", max_length=255)
    reoptin: bool = False


class AddressRef(_Strict):
    address: str = Field(..., max_length=320)


class ApiKeyCreate(_Strict):
    label: str = Field("", max_length=128)


class Consent(BaseModel):
    source: str
    requested_at: float
    requested_ip: str | None
    requested_user_agent: str | None
    confirmed_at: float | None
    confirmed_ip: str | None
    confirmed_user_agent: str | None


class SubscriberOut(BaseModel):
    address: str
    status: Literal["pending", "confirmed"]
    consent: Consent
    confirmation: str | None
    confirmation_sent_at: float | None
    confirmation_mails: int
    created_at: float


class AddOut(SubscriberOut):
    confirmation: Literal["sent", "failed", "queued"] = Field(
        ..., description="sent: the confirmation mail went out; failed: it could not be handed to the "
                         "upstream (resend later); queued: the account's budget of confirmation mails for "
                         "this window is used up, the gateway sends it in a later window")


def _import_schema() -> dict:
    """SubscriberImport's JSON schema with its row model inlined (the route reads the
    body itself, so FastAPI does not put the model into the components)."""
    schema = SubscriberImport.model_json_schema()
    defs = schema.pop("$defs", {})
    schema["properties"]["subscribers"]["items"] = defs["Evidence"]
    return schema


class ImportRow(BaseModel):
    address: str = Field(..., description="normalized; for an invalid row the value as given")
    result: Literal["queued", "exists", "suppressed", "rate_limited", "duplicate", "invalid"]
    reason: str
    field: str | None = Field(None, description="invalid rows: the bad field, e.g. subscribers[3].address "
                                                "(JSON) or address (CSV; 'line' when the row itself is bad)")
    index: int | None = Field(None, description="JSON body: the row's position in subscribers (0-based)")
    line: int | None = Field(None, description="CSV body: the line of the file the row starts on (1-based, the "
                                               "header is line 1)")


class ImportOut(BaseModel):
    queued: int
    invalid: int = Field(..., description="rows not imported because they are bad (result invalid)")
    results: list[ImportRow]


class SubscriberPage(BaseModel):
    subscribers: list[SubscriberOut]
    next_cursor: int | None


class RecipientStatusOut(BaseModel):
    address: str
    status: Literal["confirmed", "pending", "unsubscribed", "unknown"]


class Stats(BaseModel):
    confirmed: int
    pending: int
    unsubscribed: int
    confirmation_mails: dict[str, int]


class ErrorOut(BaseModel):
    error: str
    reason: str | None = None
    field: str | None = None
    errors: list[dict] | None = None


_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut}, 404: {"model": ErrorOut}, 422: {"model": ErrorOut}, 503: {"model": ErrorOut}}


# ------------------------------------------------------------------ errors
def _error(status: int, error: str, reason: str, field: str | None = None, headers=None) -> OrjsonResponse:
    body: dict[str, Any] = {"error": error, "reason": reason}
    if field:
        body["field"] = field
    if status == 422:
        body["errors"] = [{"field": field or "", "reason": reason}]
    return OrjsonResponse(body, status_code=status, headers=headers)


def _unavailable_response() -> OrjsonResponse:
    return _error(503, "unavailable", "the registry database is unavailable; try again shortly",
                  headers={"Retry-After": "5"})


class ApiError(Exception):
    def __init__(self, status: int, error: str, reason: str, headers: dict | None = None):
        self.status, self.error, self.reason, self.headers = status, error, reason, headers


def _field_name(loc: tuple) -> str:
    parts = [p for p in loc if p not in ("body", "query", "path", "header")]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def _is_registry_route(request: Request) -> bool:
    route = request.scope.get("route")
    return TAG in (getattr(route, "tags", None) or [])


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        if not _is_registry_route(request):
            return await request_validation_exception_handler(request, exc)
        errors = [{"field": _field_name(tuple(e.get("loc", ()))), "reason": e.get("msg", "invalid")}
                  for e in exc.errors()]
        return OrjsonResponse({"error": "validation", "reason": errors[0]["reason"] if errors else "invalid",
                               "field": errors[0]["field"] if errors else None,
                               "errors": jsonable_encoder(errors)}, status_code=422)

    @app.exception_handler(Invalid)
    async def _invalid(request: Request, exc: Invalid):
        return _error(422, "validation", exc.reason, exc.field)

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound):
        return _error(404, "not_found", str(exc))

    @app.exception_handler(Conflict)
    async def _conflict(request: Request, exc: Conflict):
        return _error(409, exc.code, exc.reason, exc.field)

    @app.exception_handler(RateLimited)
    async def _limited(request: Request, exc: RateLimited):
        return _error(429, "rate_limited", exc.reason, headers={"Retry-After": str(max(1, int(exc.retry_after)))})

    @app.exception_handler(RegistryUnavailable)
    async def _unavailable(request: Request, exc: RegistryUnavailable):
        return _unavailable_response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        # FastAPI's own 400 for a body it cannot parse (e.g. JSON nested deeper than
        # Python's json takes): the registry's error format on the registry's routes
        if not _is_registry_route(request):
            return await http_exception_handler(request, exc)
        return _error(exc.status_code, "bad_request" if exc.status_code == 400 else "http_error", str(exc.detail),
                      headers=exc.headers)

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError):
        return _error(exc.status, exc.error, exc.reason, headers=exc.headers)


def _bulk_limit(reg, rows: int) -> None:
    if rows > reg.settings.max_bulk:
        raise Invalid("subscribers", f"at most {reg.settings.max_bulk} rows per import ({rows} sent)")


# ------------------------------------------------------------------ credentials
def _key(authorization: str | None, x_api_key: str | None) -> str:
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    if x_api_key:
        return x_api_key.strip()
    raise ApiError(401, "unauthorized", "an API key is needed (Authorization: Bearer KEY)",
                   {"WWW-Authenticate": "Bearer"})


def _unknown_key() -> ApiError:
    return ApiError(401, "unauthorized", "unknown API key", {"WWW-Authenticate": "Bearer"})


_CHECKED = "api_key_account"   # scope["state"] key: (key, account) the gate found


def registry_gate(reg: "RegistryService", ctx: WebContext) -> Gate:
    """The API key (or admin key) checked from the headers before a body is read
    (web/limits.py): none or an unknown one is answered 401 at once; the account
    found is left in the request's state for the route's own dependency."""
    async def gate(scope: Scope) -> Response | None:
        headers = Headers(scope=scope)
        try:
            key = _key(headers.get("authorization"), headers.get("x-api-key"))
            if is_admin_key(ctx.http.admin_key, key):
                return None
            name = await reg.account_for_api_key(key)
        except ApiError as exc:
            return _error(exc.status, exc.error, exc.reason, headers=exc.headers)
        except RegistryUnavailable:
            return _unavailable_response()
        if name is None:
            refused = _unknown_key()
            return _error(refused.status, refused.error, refused.reason, headers=refused.headers)
        scope.setdefault("state", {})[_CHECKED] = (key, name)
        return None
    return gate


# ------------------------------------------------------------------ the router
def registry_router(reg: "RegistryService", ctx: WebContext) -> APIRouter:
    router = APIRouter(prefix="/api/v1", tags=[TAG], responses=_ERRORS)

    def _is_admin(key: str) -> bool:
        return is_admin_key(ctx.http.admin_key, key)

    async def account(request: Request, authorization: Annotated[str | None, Header()] = None,
                      x_api_key: Annotated[str | None, Header()] = None,
                      x_account: Annotated[str | None, Header(description="admin key only: the account "
                                                                          "to act for")] = None) -> str:
        key = _key(authorization, x_api_key)
        if _is_admin(key):
            if not x_account:
                raise Invalid("X-Account", "the admin key acts for the account named in the X-Account header")
            return x_account
        checked = request.scope.get("state", {}).get(_CHECKED)
        name = checked[1] if checked is not None and checked[0] == key else await reg.account_for_api_key(key)
        if name is None:
            raise _unknown_key()
        acc = ctx.accounts.cached(name)
        if acc is not None and acc.suspended:
            raise ApiError(403, "suspended", "this account is suspended (P-STRIKE)")
        return name

    async def admin(authorization: Annotated[str | None, Header()] = None,
                    x_api_key: Annotated[str | None, Header()] = None) -> None:
        if not _is_admin(_key(authorization, x_api_key)):
            raise ApiError(403, "forbidden", "this needs the operators' admin key")

    Account = Annotated[str, Depends(account)]
    ListPath = Annotated[str, Path(description="the list's id (16 hex digits)", max_length=64)]

    # --------------------------------------------------------------- lists
    @router.post("/lists", status_code=201, response_model=ListOut, summary="Register a mailing list")
    async def create_list(body: ListCreate, acc: Account):
        lst = await reg.create_list(acc, name=body.name, list_id=body.list_id, senders=body.senders,
                                    confirm_from=body.confirm_from)
        return lst.public()

    @router.get("/lists", response_model=dict[str, list[ListOut]], summary="The account's lists")
    async def get_lists(acc: Account):
        return {"lists": [lst.public() for lst in await reg.lists(acc)]}

    @router.get("/lists/{list_id}", response_model=ListOut, summary="One list")
    async def get_list(list_id: ListPath, acc: Account):
        return (await reg.get_list(acc, list_id)).public()

    @router.delete("/lists/{list_id}", status_code=204, summary="Delete a list, its subscribers and opt-outs")
    async def delete_list(list_id: ListPath, acc: Account):
        await reg.delete_list(acc, list_id)
        return Response(status_code=204)

    @router.get("/lists/{list_id}/stats", response_model=Stats, summary="Subscriber statistics")
    async def stats(list_id: ListPath, acc: Account):
        return await reg.list_stats(acc, list_id)

    # --------------------------------------------------------------- subscribers
    @router.post("/lists/{list_id}/subscribers", status_code=202, response_model=AddOut,
                 responses={409: {"model": ErrorOut}, 429: {"model": ErrorOut}},
                 summary="Add a subscriber: pending until they confirm the mail the gateway sends",
                 description="The confirmation mail is sent at once (confirmation: sent or failed), or queued "
                             "when the account's budget of confirmation mails for the current window is used "
                             "up (confirmation: queued; the gateway sends it in a later window).")
    async def add_subscriber(list_id: ListPath, body: SubscriberAdd, acc: Account):
        res = await reg.add_subscriber(acc, list_id, body.address, source=body.source, ip=body.ip,
                                       user_agent=body.user_agent, requested_at=body.requested_at,
                                       reoptin=body.reoptin)
        out = res.subscriber.public()
        out["confirmation"] = res.confirmation
        return out

    @router.post("/lists/{list_id}/subscribers/import", status_code=202, response_model=ImportOut,
                 response_model_exclude_none=True,
                 summary="Bulk import: each new address becomes pending; confirmation mails are queued",
                 description="A JSON body (SubscriberImport) or a CSV file (Content-Type: text/csv; header "
                             "address[,source,ip,user_agent,requested_at] or one address a line; `source` and "
                             "`reoptin` as query parameters). Each row is checked on its own: a bad row gets "
                             "`result: invalid` with `field` and `reason` (and `index`, its 0-based position in "
                             "`subscribers`, or `line`, the 1-based line of the CSV file it starts on), the good "
                             "rows are imported; the answer is 202 either way, `invalid` counts the bad rows. "
                             "422 only when the request as a whole is unusable (not JSON or CSV, no rows, more "
                             "than max_bulk rows, an unknown CSV column). The gateway sends the queued "
                             "confirmation mails in the background, at most the account's budget of "
                             "confirmation mails per window; the rest in later windows.",
                 openapi_extra={"requestBody": {"required": True, "content": {
                     "application/json": {"schema": _import_schema()},
                     "text/csv": {"schema": {"type": "string"}}}}})
    async def import_subscribers(list_id: ListPath, request: Request, acc: Account,
                                 source: Annotated[str, Query(max_length=255, description="CSV body: default "
                                                              "source for rows without one")] = "",
                                 reoptin: Annotated[bool, Query(description="CSV body: see reoptin")] = False):
        await reg.get_list(acc, list_id)   # 404 before reading the body
        ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        data = await request.body()
        if ctype == "text/csv":
            try:
                parsed = csvimport.parse(csvimport.decode(data))
            except csvimport.CsvFileError as exc:
                raise Invalid("body", f"line {exc.line}: {exc.reason}") from None
            _bulk_limit(reg, len(parsed.rows) + len(parsed.errors))
            results = await reg.import_subscribers(acc, list_id, parsed.rows, reoptin=reoptin, source=source)
            results = sorted(results + parsed.errors, key=lambda r: r["line"])
        elif ctype in ("application/json", ""):
            try:
                envelope = _ImportEnvelope.model_validate_json(data)
            except ValidationError as exc:
                raise RequestValidationError([{**e, "loc": ("body", *e.get("loc", ()))} for e in exc.errors()]) \
                    from None
            _bulk_limit(reg, len(envelope.subscribers))
            rows: list[Any] = []
            bad: dict[int, dict] = {}
            for i, raw in enumerate(envelope.subscribers):
                try:
                    rows.append(Evidence.model_validate(raw).model_dump())
                except ValidationError as exc:
                    err = exc.errors()[0]
                    rows.append(None)
                    given = raw.get("address") if isinstance(raw, dict) else None
                    bad[i] = {"address": given[:320] if isinstance(given, str) else "", "result": "invalid",
                              # rows are flat: the row's own field (a union's member tag is left out)
                              "field": f"subscribers[{i}]" + "".join(f".{p}" for p in err.get("loc", ())[:1]),
                              "reason": err.get("msg", "invalid")}
            good = [(i, r) for i, r in enumerate(rows) if r is not None]
            done = await reg.import_subscribers(acc, list_id, [r for _, r in good], reoptin=envelope.reoptin,
                                                source=envelope.source)
            results = [dict(bad[i]) if i in bad else {} for i in range(len(rows))]
            for (i, _), res in zip(good, done):
                results[i] = res
                if res["result"] == "invalid":
                    res["field"] = f"subscribers[{i}].{res['field']}"
            for i, res in enumerate(results):
                res["index"] = i
        else:
            raise ApiError(415, "unsupported_media_type", "send application/json (SubscriberImport) or text/csv")
        return {"queued": sum(1 for r in results if r["result"] == "queued"),
                "invalid": sum(1 for r in results if r["result"] == "invalid"), "results": results}

    @router.post("/lists/{list_id}/subscribers/resend", status_code=202,
                 responses={429: {"model": ErrorOut}, 409: {"model": ErrorOut}},
                 summary="Send the confirmation mail again (rate-limited)",
                 description="429 (with Retry-After) within resend_interval of the last mail, after "
                             "max_confirmation_mails, or while the account's budget of confirmation mails "
                             "for the current window is used up (Retry-After: until the next window).")
    async def resend(list_id: ListPath, body: AddressRef, acc: Account) -> dict:
        return {"confirmation": await reg.resend_confirmation(acc, list_id, body.address)}

    @router.get("/lists/{list_id}/subscribers", response_model=SubscriberPage,
                summary="Subscribers with consent evidence, a page at a time")
    async def list_subscribers(list_id: ListPath, acc: Account,
                               status: Literal["pending", "confirmed"] | None = None,
                               cursor: Annotated[int, Query(ge=0)] = 0,
                               limit: Annotated[int, Query(ge=1, le=1000)] = 100):
        page, nxt = await reg.subscribers(acc, list_id, status=status, cursor=cursor, limit=limit)
        return {"subscribers": [s.public() for s in page], "next_cursor": nxt}

    @router.get("/lists/{list_id}/subscribers/export", summary="Export all subscribers with consent evidence",
                responses={200: {"content": {"text/csv": {}, "application/x-ndjson": {}}}})
    async def export(list_id: ListPath, acc: Account, format: Literal["csv", "ndjson"] = "csv",
                     status: Literal["pending", "confirmed"] | None = None):
        await reg.get_list(acc, list_id)   # 404 before the stream starts
        columns = ["address", "status", "source", "requested_at", "requested_ip", "requested_user_agent",
                   "confirmed_at", "confirmed_ip", "confirmed_user_agent"]

        buf = io.StringIO()
        writer = csv.writer(buf)

        def line(values: list) -> bytes:   # one CSV row; the buffer is emptied for the next
            writer.writerow(values)
            out = buf.getvalue().encode()
            buf.seek(0)
            buf.truncate(0)
            return out

        async def rows():
            if format == "csv":
                yield line(columns)
            async for sub in reg.iter_subscribers(acc, list_id, status):
                p = sub.public()
                flat = {"address": p["address"], "status": p["status"], **p["consent"]}
                if format == "csv":
                    yield line(["" if flat[c] is None else flat[c] for c in columns])
                else:
                    yield orjson.dumps(flat) + b"\n"

        media = "text/csv; charset=utf-8" if format == "csv" else "application/x-ndjson"
        return StreamingResponse(rows(), media_type=media, headers={
            "Content-Disposition": f'attachment; filename="subscribers-{list_id}.{format}"'})

    @router.get("/lists/{list_id}/recipient-status", response_model=RecipientStatusOut,
                summary="What an RCPT of this list's mail would find (served from the cache)")
    async def recipient_status(list_id: ListPath, acc: Account, address: Annotated[str, Query(max_length=320)]):
        lst = await reg.get_list(acc, list_id)
        return {"address": address, "status": await reg.recipient_status(lst.id, address)}

    @router.get("/lists/{list_id}/subscribers/{address:path}", response_model=SubscriberOut,
                summary="One subscriber with consent evidence (404 also after an opt-out)")
    async def get_subscriber(list_id: ListPath, address: str, acc: Account):
        try:
            return (await reg.subscriber(acc, list_id, address)).public()
        except NotFound:
            if await reg.is_suppressed(acc, list_id, address):
                raise ApiError(404, "unsubscribed", "this address opted out of the list; only a keyed hash "
                               "of it is kept") from None
            raise

    @router.delete("/lists/{list_id}/subscribers/{address:path}", status_code=204,
                   summary="Remove a subscriber (permanent: like an opt-out, it cannot be re-added "
                           "without a fresh confirmed opt-in)")
    async def remove_subscriber(list_id: ListPath, address: str, acc: Account):
        await reg.remove_subscriber(acc, list_id, address)
        return Response(status_code=204)

    # --------------------------------------------------------------- admin
    @router.post("/admin/accounts/{name}/api-keys", status_code=201, dependencies=[Depends(admin)],
                 summary="Issue an API key for an account (admin key)")
    async def issue_key(name: str, body: ApiKeyCreate | None = None) -> dict:
        key = await reg.issue_api_key(name, body.label if body else "")
        return {"account": name, "api_key": key}

    return router


def install(app: FastAPI, registry: "RegistryService", ctx: WebContext) -> None:
    """Mount the registry API and the confirmation/unsubscribe pages over ``registry``."""
    from .pages import pages_router

    install_error_handlers(app)
    app.include_router(registry_router(registry, ctx))
    app.include_router(pages_router(registry))
