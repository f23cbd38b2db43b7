"""The console and the API docs load from this server alone (no CDN, no web fonts)."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

_REFERENCE = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']|url\(\s*["']?([^"')]+)""")
_EXTERNAL = re.compile(r"(?:https?:)?//[A-Za-z0-9.-]+")


def _references(text: str) -> list[str]:
    return [a or b for a, b in _REFERENCE.findall(text)]


def _assets_of(client: TestClient, page: str) -> list[str]:
    response = client.get(page)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    assert not _EXTERNAL.search(html), f"{page} names an outside host: {_EXTERNAL.findall(html)}"
    references = [r for r in _references(html) if not r.startswith(("#", "data:"))]
    assert references, f"{page} references no assets"
    for url in references:
        asset = client.get(url)
        assert asset.status_code == 200, f"{page}: {url} is {asset.status_code}"
        assert asset.content, f"{page}: {url} is empty"
    return references


def test_swagger_ui_is_served_from_local_files(client: TestClient) -> None:
    assets = _assets_of(client, "/docs")
    assert any(a.endswith("swagger-ui-bundle.js") for a in assets)
    assert any(a.endswith("swagger-ui.css") for a in assets)
    html = client.get("/docs").text
    assert "'/openapi.json'" in html or '"/openapi.json"' in html
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/docs/oauth2-redirect").status_code == 200


def test_redoc_is_served_from_local_files_without_web_fonts(client: TestClient) -> None:
    assets = _assets_of(client, "/redoc")
    assert any(a.endswith("redoc.standalone.js") for a in assets)
    assert "fonts.googleapis" not in client.get("/redoc").text


def test_console_page_and_its_assets_are_local(client: TestClient) -> None:
    assets = _assets_of(client, "/")
    assert {"/console/static/app.js", "/console/static/style.css"} <= set(assets)
    for asset in ("/console/static/app.js", "/console/static/style.css"):
        text = client.get(asset).text
        assert not _EXTERNAL.search(text), f"{asset} names an outside host"
    # The console and docs pages are not API routes.
    paths = client.get("/openapi.json").json()["paths"]
    assert not {"/", "/docs", "/redoc"} & set(paths)
