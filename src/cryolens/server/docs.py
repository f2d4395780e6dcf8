"""Offline API documentation: Swagger UI and ReDoc served from the package's own assets, so
``/docs`` works on a cluster node with no internet access."""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).with_name("static")
STATIC_PREFIX = "/static"


def add_routes(app: FastAPI) -> None:
    """``/docs`` and ``/redoc`` from the packaged assets (``/static``), with no CDN."""
    app.mount(STATIC_PREFIX, StaticFiles(directory=STATIC_DIR), name="static")

    def static(request: Request, name: str) -> str:
        return f"{request.scope.get('root_path', '')}{STATIC_PREFIX}/{name}"

    def openapi_url(request: Request) -> str:
        return f"{request.scope.get('root_path', '')}{app.openapi_url}"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url(request), title=f"{app.title} - Swagger UI",
            swagger_js_url=static(request, "swagger-ui-bundle.js"),
            swagger_css_url=static(request, "swagger-ui.css"),
            swagger_favicon_url=static(request, "favicon-32x32.png"))

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        return get_redoc_html(
            openapi_url=openapi_url(request), title=f"{app.title} - ReDoc",
            redoc_js_url=static(request, "redoc.standalone.js"),
            redoc_favicon_url=static(request, "favicon-32x32.png"), with_google_fonts=False)
