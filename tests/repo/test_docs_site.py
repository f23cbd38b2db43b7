"""The documentation site builds in strict mode (broken links fail), offline; the README stays short."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README_MAX_LINES = 200

needs_mkdocs = pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None,
    reason="mkdocs and mkdocs-material are not installed (pip install -e '.[dev]')",
)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built once for this module with `mkdocs build --strict`."""
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=REPO,
        # Material's notice about MkDocs 2.0 is no warning of this build; keep the output short.
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@needs_mkdocs
def test_the_site_builds_strict_with_the_openapi_reference(site: Path) -> None:
    reference = (site / "reference" / "openapi" / "index.html").read_text()
    assert "/v1/tasks/{task_id}/predictions" in reference
    assert "not_adapted_yet" in reference  # a problem code of a documented response
    assert '"/v1/tasks"' in (site / "reference" / "openapi.json").read_text()
    for curve in ("omniglot-conv4", "photos-conv4", "photos-conv4-fast"):
        assert (site / "shipped" / curve / "curve.png").is_file()
    assert (site / "console.png").is_file()


@needs_mkdocs
def test_the_site_fetches_nothing(site: Path) -> None:
    # No web fonts or CDN assets: every page works offline.
    for page in site.rglob("*.html"):
        text = page.read_text()
        assert "fonts.googleapis.com" not in text and "fonts.gstatic.com" not in text, page


def test_the_readme_is_short_and_links_to_files_that_exist() -> None:
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    for link in links:
        if link.startswith(("http://", "https://", "#", "mailto:")):
            continue
        path = link.split("#", 1)[0]
        assert (REPO / path).exists(), f"README.md links to missing {link}"
