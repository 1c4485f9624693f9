"""``/docs``: Swagger UI from files shipped in a Python package, never from a CDN.

FastAPI's default ``/docs`` page loads Swagger UI's JavaScript and CSS from jsdelivr; on an
air-gapped cluster (which the status page is built for) it renders blank. Here the page is
FastAPI's own, pointed at the assets of the ``swagger-ui-bundle`` distribution, served by the
gateway under ``/docs/assets``. ReDoc has no such package, so ``/redoc`` is off.

Contract: ``install_api_docs(app)`` must be given an app built with ``docs_url=None`` and
``redoc_url=None``; it adds ``GET /docs`` (HTML whose every script, stylesheet and icon is a
path on this server) and the static assets. ``/openapi.json`` is untouched.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_PATH = "/docs/assets"


def swagger_ui_dir() -> Path:
    """The folder holding swagger-ui-bundle.js and swagger-ui.css (from swagger-ui-bundle)."""
    import swagger_ui_bundle  # type: ignore[import-untyped]

    return Path(swagger_ui_bundle.swagger_ui_path)


def install_api_docs(app: FastAPI) -> None:
    """Serve ``/docs`` and its assets from this process (see the module docstring)."""
    app.mount(ASSETS_PATH, StaticFiles(directory=swagger_ui_dir()), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{app.title} - API docs",
            swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_PATH}/favicon-32x32.png",
        )
