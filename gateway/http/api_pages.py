"""The API's description (`/openapi.json`) and its pages (`/docs`: Swagger UI, `/redoc`), served whole by
the gateway: their scripts and styles come from the `fastapi-offline` package's files, not from a CDN,
so the pages work in an air-gapped cluster. Each route declares its access (open, like the page at `/`)."""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from gateway.auth.scopes import requires

ASSETS = Path(fastapi_offline.__file__).parent / "static"
ASSETS_URL = "/docs/assets"
OPENAPI_URL = "/openapi.json"


def add_api_pages(app: FastAPI) -> None:
    assets = StaticFiles(directory=ASSETS)
    requires(None)(assets)
    app.mount(ASSETS_URL, assets, name="api-page-assets")

    @app.get(OPENAPI_URL, include_in_schema=False)
    @requires(None)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    @requires(None)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=OPENAPI_URL,
            title=f"{app.title} - API",
            swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_URL}/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False)
    @requires(None)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=OPENAPI_URL,
            title=f"{app.title} - API",
            redoc_js_url=f"{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{ASSETS_URL}/favicon.png",
            with_google_fonts=False,
        )
