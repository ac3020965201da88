"""The pages a subscriber sees: confirm a subscription, unsubscribe.

GET only shows a page with a button; the POST of that button acts. Mail
scanners that follow links therefore confirm and unsubscribe nothing. The
RFC 8058 one-click POST (body ``List-Unsubscribe=One-Click``) unsubscribes
directly; the page's own button posts ``unsubscribe=page``, so the two are
logged and counted apart. Every value put into a page is escaped; a bad or expired link gets
a page that says so.
"""
from __future__ import annotations

import html
import logging
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from ..registry.model import RegistryUnavailable, TokenError

if TYPE_CHECKING:  # pragma: no cover
    from ..registry.service import RegistryService

log = logging.getLogger("gateway.web")

_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                               "frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Robots-Tag": "noindex, nofollow",
}

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex, nofollow">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 36rem; margin: 3rem auto; padding: 0 1rem;
       line-height: 1.5; color: #1a1a1a; background: #fff; }}
h1 {{ font-size: 1.5rem; }}
button {{ font-size: 1.1rem; padding: .6rem 1.4rem; border: 2px solid #1a1a1a; border-radius: .3rem;
         background: #1a1a1a; color: #fff; cursor: pointer; }}
button:focus {{ outline: 3px solid #f5a623; outline-offset: 2px; }}
.note {{ color: #444; font-size: .95rem; }}
</style>
</head>
<body>
<main>
<h1>{title}</h1>
{body}
</main>
</body>
</html>
"""


def page(title: str, body_html: str, status: int = 200) -> HTMLResponse:
    """``body_html`` must be built from escaped values (see ``_p``)."""
    return HTMLResponse(_PAGE.format(title=html.escape(title), body=body_html), status_code=status,
                        headers=_HEADERS)


def _p(text: str, cls: str = "") -> str:
    attr = f' class="{cls}"' if cls else ""
    return f"<p{attr}>{html.escape(text)}</p>"


def _form(action: str, button: str, hidden: dict[str, str] | None = None) -> str:
    fields = "".join(f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
                     for k, v in (hidden or {}).items())
    return (f'<form method="post" action="{html.escape(action)}">{fields}'
            f'<button type="submit">{html.escape(button)}</button></form>')


def _bad_link(exc: TokenError) -> HTMLResponse:
    if exc.expired:
        return page("This link has expired",
                    _p("The confirmation link has expired, so nothing was changed.")
                    + _p("If you still want to subscribe, sign up again where you first did: "
                         "you will get a new mail with a fresh link.", "note"), 410)
    return page("This link is not valid",
                _p(f"We cannot use this link: {exc.reason}.")
                + _p("Nothing was changed. Check that you copied the whole link from the mail.", "note"), 400)


def _unavailable() -> HTMLResponse:
    return page("Please try again shortly",
                _p("The service is briefly unavailable and nothing was changed. Please try again in a minute."),
                503)


async def _small_body(request: Request, limit: int = 4096) -> bytes:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            break
    return body[:limit]


def pages_router(registry: RegistryService) -> APIRouter:
    router = APIRouter(tags=["pages"], include_in_schema=True)

    def _client(request: Request) -> tuple[str, str]:
        ip = request.client.host if request.client else ""
        return ip, request.headers.get("user-agent", "")[:512]

    # ------------------------------------------------------------- confirm
    @router.get("/confirm/{token}", response_class=HTMLResponse, summary="Confirmation page (confirms nothing)")
    async def confirm_page(token: str, request: Request):
        try:
            info = await registry.confirmation_view(token)
        except TokenError as exc:
            return _bad_link(exc)
        except RegistryUnavailable:
            return _unavailable()
        if info.state == "confirmed":
            return page("Subscription confirmed",
                        _p(f"{info.masked_address} is subscribed to \u201c{info.list_name}\u201d."))
        return page("Confirm your subscription",
                    _p(f"Please confirm that {info.masked_address} wants to receive the mailing list "
                       f"\u201c{info.list_name}\u201d.")
                    + _form(request.url.path, "Confirm subscription")
                    + _p("If you did not ask for this, just close this page: you will not be subscribed.",
                         "note"))

    @router.post("/confirm/{token}", response_class=HTMLResponse, summary="Confirm the subscription")
    async def confirm(token: str, request: Request):
        ip, ua = _client(request)
        try:
            info = await registry.confirm(token, ip=ip, user_agent=ua)
        except TokenError as exc:
            return _bad_link(exc)
        except RegistryUnavailable:
            return _unavailable()
        return page("Subscription confirmed",
                    _p(f"Thank you. {info.masked_address} is now subscribed to \u201c{info.list_name}\u201d.")
                    + _p("Every mail of the list has an unsubscribe link; you can leave at any time.", "note"))

    # ------------------------------------------------------------- unsubscribe
    @router.get("/unsubscribe/{token}", response_class=HTMLResponse,
                summary="Unsubscribe page (unsubscribes nothing by itself)")
    async def unsubscribe_page(token: str, request: Request):
        try:
            info = await registry.unsubscribe_view(token)
        except TokenError as exc:
            return _bad_link(exc)
        except RegistryUnavailable:
            return _unavailable()
        if info.state == "gone":
            return page("You are not subscribed", _p("This mailing list no longer exists."))
        if info.state == "unsubscribed":
            return page("You are unsubscribed",
                        _p(f"This address is not on \u201c{info.list_name}\u201d and will not be mailed "
                           f"through it again."))
        return page("Unsubscribe",
                    _p(f"Stop sending \u201c{info.list_name}\u201d to {info.masked_address}?")
                    + _form(request.url.path, "Unsubscribe", {"unsubscribe": "page"})
                    + _p("Your address is then deleted from the list.", "note"))

    @router.post("/unsubscribe/{token}", response_class=HTMLResponse,
                 summary="Unsubscribe: RFC 8058 one-click (body List-Unsubscribe=One-Click) or the page's button")
    async def unsubscribe(token: str, request: Request):
        # RFC 8058: a mail client's one-click POST carries exactly List-Unsubscribe=One-Click;
        # the page's button sends unsubscribe=page instead, so the two are told apart (logs,
        # metrics). Any other POST (no body, some other form) is a person acting on the link: page.
        body = await _small_body(request)
        one_click = parse_qs(body.decode("latin-1")).get("List-Unsubscribe") == ["One-Click"]
        try:
            result = await registry.unsubscribe_by_token(token, via="one-click" if one_click else "page")
        except TokenError as exc:
            return _bad_link(exc)
        except RegistryUnavailable:
            return _unavailable()
        name = result.list_name or "this mailing list"
        return page("You are unsubscribed",
                    _p(f"You will receive no more mail from \u201c{name}\u201d.")
                    + _p("Your address was deleted from the list. We keep only a one-way code of it so "
                         "that the list cannot mail you again unless you subscribe and confirm anew.", "note"))

    return router
