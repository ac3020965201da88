"""HTTP side: health, readiness and metrics now; the registry API, the
confirmation/unsubscribe pages and the admin API mount here too.

The API docs (``/docs``: Swagger UI, ``/redoc``: ReDoc) load their scripts and
styles from the gateway itself (``/docs-assets/``: the Swagger UI and ReDoc
files the fastapi-offline package ships), never from a CDN, so they work
offline and behind a firewall. Their Content-Security-Policy keeps every
request on the gateway (ReDoc's bundle would fetch its logo from outside)."""
from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

from .context import WebContext
from .jsonresponse import OrjsonResponse
from .limits import BodyLimit, BodyLimits, Route


DOCS_ASSETS = "/docs-assets"   # Swagger UI and ReDoc files, served by the gateway
OPENAPI_URL = "/openapi.json"  # the schema both read
# Inline script/style: Swagger UI's start-up script, ReDoc's styled components.
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data: blob:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; "
            "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")


def _install_docs(app: FastAPI) -> None:
    """/docs and /redoc with their assets from the gateway itself."""
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(files("fastapi_offline") / "static")), name="docs-assets")

    def secured(page: HTMLResponse) -> HTMLResponse:
        page.headers["Content-Security-Policy"] = DOCS_CSP
        return page

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return secured(get_swagger_ui_html(
            openapi_url=OPENAPI_URL, title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js", swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png",
            # no validator badge: it would send the spec to an outside service
            swagger_ui_parameters={"validatorUrl": None}))

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return secured(get_redoc_html(
            openapi_url=OPENAPI_URL, title=f"{app.title} - ReDoc",
            redoc_js_url=f"{DOCS_ASSETS}/redoc.standalone.js", redoc_favicon_url=f"{DOCS_ASSETS}/favicon.png",
            with_google_fonts=False))


def create_app(ctx: WebContext) -> FastAPI:
    """The HTTP app over ``ctx`` (built once the gateway's services have started)."""
    from .. import __version__

    app = FastAPI(title="SMTP relay gateway", version=__version__, default_response_class=OrjsonResponse,
                  openapi_url=OPENAPI_URL, docs_url=None, redoc_url=None)
    _install_docs(app)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict:
        """The process is up (liveness)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    async def readyz() -> Response:
        """Listening, not draining, and an upstream whose breaker is not open
        (readiness for a load balancer); the upstreams' and counters' health."""
        state = ctx.readiness()
        body = {"status": state, **(ctx.health() if ctx.health is not None else {})}
        return OrjsonResponse(body, status_code=200 if state == "ready" else 503)

    @app.get("/metrics", tags=["ops"])
    async def metrics() -> Response:
        return Response(ctx.metrics(), media_type="text/plain; version=0.0.4")

    routes: list[Route] = []
    if ctx.registry is not None:
        from .registry_api import install as install_registry, registry_gate
        install_registry(app, ctx.registry, ctx)   # /api/v1 (lists, subscribers), /confirm, /unsubscribe
        gate = registry_gate(ctx.registry, ctx)
        routes += [Route("/api/v1/", suffix="/subscribers/import", method="POST", gate=gate,
                         limit=BodyLimit(ctx.http.max_import_body, ctx.http.import_body_timeout)),
                   Route("/api/v1/", gate=gate)]

    from .admin import admin_gate, admin_router
    app.include_router(admin_router(ctx))   # /admin (block lists), admin key
    routes.append(Route("/admin/", gate=admin_gate(ctx)))

    # Every request body bounded by size and time; credentials checked before one is read.
    app.add_middleware(BodyLimits, default=BodyLimit(ctx.http.max_body, ctx.http.body_timeout), routes=routes)
    return app
