"""MkDocs hook: the OpenAPI reference and the model cards' curves, added to the site at build time.

`reference/openapi.md` lists every operation of the service's OpenAPI document (built from
`app.main.create_app` with default settings: only `.openapi()` is called, so no database, broker
or model is touched) and `reference/openapi.json` is the whole document. The shipped
initializations' `curve.png` files are served from `fewshot/shipped/`, where they live.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

REPO = Path(__file__).resolve().parents[2]
CURVES = [
    "shipped/omniglot-conv4/curve.png",
    "shipped/photos-conv4/curve.png",
    "shipped/photos-conv4-fast/curve.png",
]


def openapi_document() -> dict[str, Any]:
    """The service's OpenAPI document, as `/openapi.json` serves it."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from app.core.config import Settings
    from app.main import create_app

    document: dict[str, Any] = create_app(Settings()).openapi()
    return document


def _cell(text: object) -> str:
    """Text fit for a Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _type(schema: dict[str, Any]) -> str:
    """A schema in a few words: its type (or referenced schema), enum and bounds."""
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    if "anyOf" in schema:
        kinds = [_type(s) for s in schema["anyOf"] if s.get("type") != "null"]
        return " or ".join(kinds) + (" or null" if len(kinds) < len(schema["anyOf"]) else "")
    text = str(schema.get("type", "any"))
    if "enum" in schema:
        text += " (" + ", ".join(f"`{v}`" for v in schema["enum"]) + ")"
    bounds = [f"{k} {schema[k]}" for k in ("minimum", "maximum", "maxLength") if k in schema]
    return text + (" [" + ", ".join(bounds) + "]" if bounds else "")


def _operation(method: str, path: str, op: dict[str, Any]) -> list[str]:
    lines = [f"## `{method.upper()} {path}`", "", f"**{op.get('summary', '')}**", ""]
    if op.get("description"):
        lines += [op["description"], ""]
    if op.get("parameters"):
        lines += ["| parameter | in | required | schema | description |", "|---|---|---|---|---|"]
        for p in op["parameters"]:
            description = p.get("description") or p["schema"].get("description", "")
            required = "yes" if p.get("required") else "no"
            lines.append(
                f"| `{p['name']}` | {p['in']} | {required} | {_cell(_type(p['schema']))} "
                f"| {_cell(description)} |"
            )
        lines.append("")
    if "requestBody" in op:
        types = ", ".join(f"`{t}`" for t in op["requestBody"]["content"])
        lines += [f"Request body: {types}.", ""]
    lines += ["| status | description | problem code (example) |", "|---|---|---|"]
    for status, response in op["responses"].items():
        code = ""
        for content in (response.get("content") or {}).values():
            example = content.get("example")
            if isinstance(example, dict) and "code" in example:
                code = f"`{example['code']}`"
        lines.append(f"| {status} | {_cell(response.get('description', ''))} | {code} |")
    return [*lines, ""]


def reference_page(document: dict[str, Any]) -> str:
    """The Markdown page listing every operation of `document`."""
    info = document["info"]
    lines = [
        "# OpenAPI reference",
        "",
        f"{info['title']} {info['version']}: {info.get('summary', '')} Generated at build time",
        "from the service's own OpenAPI document; a running service serves it at `/openapi.json`,",
        "with Swagger UI at `/docs` and ReDoc at `/redoc`. Download:",
        "[openapi.json](openapi.json). The [API guide](../api.md) explains the routes.",
        "",
    ]
    for path, operations in document["paths"].items():
        for method, op in operations.items():
            lines += _operation(method, path, op)
    return "\n".join(lines)


def on_files(files: Files, config: MkDocsConfig) -> Files:
    document = openapi_document()
    files.append(File.generated(config, "reference/openapi.md", content=reference_page(document)))
    text = json.dumps(document, indent=2) + "\n"
    files.append(File.generated(config, "reference/openapi.json", content=text))
    for curve in CURVES:
        files.append(File(curve, str(REPO / "fewshot"), config.site_dir, config.use_directory_urls))
    return files
