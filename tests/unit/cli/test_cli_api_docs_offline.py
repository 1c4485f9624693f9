"""`/docs` works air-gapped: every asset the page names is served by the gateway itself."""

from __future__ import annotations

import re

import httpx

from moeflow.gateway.app import build_app
from moeflow.gateway.settings import GatewaySettings


async def test_docs_page_and_all_its_assets_come_from_the_gateway() -> None:
    app = build_app(GatewaySettings())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        page = await client.get("/docs")
        assert page.status_code == 200
        urls = re.findall(r"""(?:src|href)=["']([^"']+)["']|url: ?["']([^"']+)["']""", page.text)
        found = [a or b for a, b in urls]
        assert found, page.text
        assert not [u for u in found if u.startswith(("http:", "https:", "//"))], found
        for url in found:
            response = await client.get(url)
            assert response.status_code == 200, url
            assert len(response.content) > 100, url
        js = await client.get("/docs/assets/swagger-ui-bundle.js")
        assert "SwaggerUIBundle" in js.text
        assert (await client.get("/redoc")).status_code == 404
        assert (await client.get("/openapi.json")).json()["info"]["title"] == "MoEFlow gateway"
