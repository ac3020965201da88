"""Request bodies bounded by size and time, and credentials checked before a
body is read (issue 11, item 6): the HTTP server shares its process with SMTP.

One ASGI middleware in front of the whole app. For every request it picks the
route's :class:`BodyLimit` (``[http]`` ``max_body``/``body_timeout``; the
subscriber import, which may carry a CSV file, ``max_import_body``/
``import_body_timeout``). A request that carries a body (a Content-Length
above 0, or Transfer-Encoding) is then, before one byte of it is read:

1. authenticated from its headers where its route needs a credential (the
   registry API's API key or admin key, the admin API's admin key): a request
   without a good one gets the route's own 401 (or 503) at once;
2. refused with 413 when its Content-Length is above the limit.

While the app reads the body the bytes are counted (chunked bodies have no
Content-Length): past the limit the request gets 413; a body not complete by
the deadline (counted from the request's headers) gets 408. Every one of
these answers closes the connection (``Connection: close``), so the rest of a
body nobody reads is never buffered, and so does any answer sent before the
app read the whole body. Once the body is complete nothing is timed any more
(a streamed export waits for a disconnect as long as it takes).
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .jsonresponse import OrjsonResponse

# A gate looks at a request's headers (the scope; the body is not read) and
# answers it (401, 503, ...) or lets it through (None). It may leave what it
# found in scope["state"] for the route.
Gate = Callable[[Scope], Awaitable[Response | None]]


@dataclass(frozen=True, slots=True)
class BodyLimit:
    max_bytes: int      # the largest body taken
    timeout: float      # seconds from the request's headers to the body's last byte


@dataclass(frozen=True, slots=True)
class Route:
    """Requests whose path starts with ``prefix`` (and, if given, ends with
    ``suffix``, method ``method``)."""
    prefix: str
    limit: BodyLimit | None = None   # None: the default limit
    gate: Gate | None = None
    suffix: str = ""
    method: str = ""

    def matches(self, method: str, path: str) -> bool:
        return (path.startswith(self.prefix) and path.endswith(self.suffix)
                and (not self.method or method == self.method))


class _Refused(Exception):
    """Raised into the app from ``receive``: the body broke its limit."""

    def __init__(self, status: int):
        self.status = status


def _refusal(status: int, limit: BodyLimit) -> Response:
    if status == 413:
        return OrjsonResponse({"error": "too_large", "reason": f"the request body is larger than this route "
                                                               f"takes ({limit.max_bytes} bytes)"}, status_code=413)
    if status == 408:
        return OrjsonResponse({"error": "timeout", "reason": f"the request body did not arrive within "
                                                             f"{limit.timeout:g} seconds"}, status_code=408)
    return OrjsonResponse({"error": "bad_request", "reason": "the Content-Length header is not a number"},
                          status_code=400)


def _closing(response: Response) -> Response:
    response.headers["Connection"] = "close"
    return response


class BodyLimits:
    """The ASGI middleware (``app.add_middleware(BodyLimits, default=..., routes=[...])``);
    the first route that matches a request decides its limit and gate."""

    def __init__(self, app: ASGIApp, *, default: BodyLimit, routes: Sequence[Route] = ()):
        self.app = app
        self.default = default
        self.routes = tuple(routes)

    def _route(self, method: str, path: str) -> Route | None:
        for route in self.routes:
            if route.matches(method, path):
                return route
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = self._route(scope["method"], scope["path"])
        limit = (route.limit if route is not None else None) or self.default
        headers = Headers(scope=scope)
        length = headers.get("content-length")
        chunked = "transfer-encoding" in headers
        if length is not None and not chunked:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared < 0:
                await _closing(_refusal(400, limit))(scope, receive, send)
                return
        else:
            declared = None
        has_body = chunked or bool(declared)
        if has_body and route is not None and route.gate is not None:
            answer = await route.gate(scope)
            if answer is not None:
                await _closing(answer)(scope, receive, send)
                return
        if declared is not None and declared > limit.max_bytes:
            await _closing(_refusal(413, limit))(scope, receive, send)
            return
        await _Guard(self.app, limit, has_body)(scope, receive, send)


class _Guard:
    """One request: its body counted and timed on the way into the app."""

    def __init__(self, app: ASGIApp, limit: BodyLimit, has_body: bool):
        self.app, self.limit = app, limit
        self.body_done = not has_body
        self.received = 0
        self.refused: int | None = None
        self.started = False
        self.deadline = asyncio.get_running_loop().time() + limit.timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def guarded_receive() -> Message:
            if self.refused is not None:
                raise _Refused(self.refused)
            if self.body_done:
                return await receive()
            remaining = self.deadline - asyncio.get_running_loop().time()
            try:
                async with asyncio.timeout(max(remaining, 0.0)):
                    message = await receive()
            except TimeoutError:
                self.refused = 408
                raise _Refused(408) from None
            if message["type"] == "http.request":
                self.received += len(message.get("body", b""))
                if self.received > self.limit.max_bytes:
                    self.refused = 413
                    raise _Refused(413)
                if not message.get("more_body", False):
                    self.body_done = True
            else:   # http.disconnect: nothing more comes
                self.body_done = True
            return message

        async def guarded_send(message: Message) -> None:
            if self.refused is not None:
                return   # the app's own answer to the broken body (a 400 of the body parser, ...)
            if message["type"] == "http.response.start":
                self.started = True
                if not self.body_done:   # answered before the body was read: close, do not buffer the rest
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except _Refused:
            pass
        except Exception:
            if self.refused is None:
                raise
        if self.refused is not None and not self.started:
            await _closing(_refusal(self.refused, self.limit))(scope, receive, send)


__all__ = ["BodyLimit", "BodyLimits", "Gate", "Route"]
