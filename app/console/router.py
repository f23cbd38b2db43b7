"""The browser console (`/`) and Swagger UI / ReDoc served from local files (no CDN)."""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"
# Swagger UI and ReDoc bundles as shipped by the fastapi-offline wheel.
DOCS_ASSETS_DIR = Path(fastapi_offline.__file__).resolve().parent / "static"
CONSOLE_ASSETS = "/console/static"
DOCS_ASSETS = "/docs-assets"
_REPLACED = {"/", "/docs", "/docs/oauth2-redirect", "/redoc"}


def install(app: FastAPI) -> None:
    """Serve the console at `/` and the docs at /docs and /redoc from files in the package."""
    # FastAPI adds CDN-backed /docs and /redoc when it is built; these replace them.
    app.router.routes[:] = [
        r for r in app.router.routes if getattr(r, "path", None) not in _REPLACED
    ]
    app.mount(CONSOLE_ASSETS, StaticFiles(directory=STATIC_DIR), name="console-static")
    app.mount(DOCS_ASSETS, StaticFiles(directory=DOCS_ASSETS_DIR), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"
    title = app.title

    @app.get("/", include_in_schema=False)
    def console() -> FileResponse:
        """The browser console: tasks, predictions and (admin keys) meta-training."""
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        """Swagger UI from local files."""
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{title}: API",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{CONSOLE_ASSETS}/favicon.svg",
            oauth2_redirect_url="/docs/oauth2-redirect",
        )

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    def swagger_ui_redirect() -> HTMLResponse:
        """Swagger UI's OAuth2 redirect page."""
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        """ReDoc from local files, without web fonts."""
        return get_redoc_html(
            openapi_url=openapi_url,
            title=f"{title}: API reference",
            redoc_js_url=f"{DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{CONSOLE_ASSETS}/favicon.svg",
            with_google_fonts=False,
        )
