"""HTTP side: health, readiness and metrics now; the registry API, the
confirmation/unsubscribe pages and the admin API mount here too.

The API docs (``/docs``: Swagger UI, ``/redoc``: ReDoc) load their scripts and
styles from the gateway itself (``/docs-assets/``, the files the
fastapi-offline package ships), never from a CDN, so they work offline and
behind a firewall."""
from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.responses import Response
from fastapi_offline import FastAPIOffline

from .jsonresponse import OrjsonResponse

if TYPE_CHECKING:  # pragma: no cover
    from ..app import Gateway


DOCS_ASSETS = "/docs-assets"   # Swagger UI and ReDoc files, served by the gateway


def create_app(gateway: "Gateway") -> FastAPI:
    from .. import __version__

    app: FastAPI = FastAPIOffline(title="SMTP relay gateway", version=__version__,
                                  default_response_class=OrjsonResponse, static_url=DOCS_ASSETS,
                                  favicon_url=f"{DOCS_ASSETS}/favicon.png",
                                  # Swagger UI's validator badge would call an outside service
                                  swagger_ui_parameters={"validatorUrl": None})

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict:
        """The process is up (liveness)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    async def readyz() -> Response:
        """Listening and not draining (readiness for a load balancer)."""
        if gateway.ready and not gateway.draining:
            return OrjsonResponse({"status": "ready"})
        return OrjsonResponse({"status": "draining" if gateway.draining else "starting"}, status_code=503)

    @app.get("/metrics", tags=["ops"])
    async def metrics() -> Response:
        return Response(gateway.metrics.render(), media_type="text/plain; version=0.0.4")

    if getattr(gateway, "registry", None) is not None:
        from .registry_api import install as install_registry
        install_registry(app, gateway)   # /api/v1 (lists, subscribers), /confirm, /unsubscribe

    from .admin import admin_router
    app.include_router(admin_router(gateway))   # /admin (block lists), admin key

    return app
