"""The OpenAPI document is worth reading: problem+json errors with the Problem schema, only the
statuses a route can answer, an example on every request and response (each valid against its
schema), and enums and bounds where the service has them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from app.core.config import Settings
from app.main import create_app
from tests.helpers import make_settings

PROBLEM = {"$ref": "#/components/schemas/Problem"}
MAX_STEPS = Settings.model_fields["max_steps"].default


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The app's OpenAPI document (the app is not started: the document needs no runtime)."""
    folder = tmp_path_factory.mktemp("openapi")
    document: dict[str, Any] = create_app(make_settings(folder / "data", folder / "init")).openapi()
    return document


def _operations(spec: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            yield method.upper(), path, operation


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    if "anyOf" in schema:
        # An optional body: its object branch.
        schema = next(_resolve(spec, s) for s in schema["anyOf"] if s.get("type") != "null")
    return schema


def _examples(spec: dict[str, Any], media: dict[str, Any]) -> list[Any]:
    """The examples a reader sees for a body: on the media type, else on its schema."""
    if "example" in media:
        return [media["example"]]
    if "examples" in media:
        return [example["value"] for example in media["examples"].values()]
    return list(_resolve(spec, media.get("schema", {})).get("examples", []))


def _validator(spec: dict[str, Any], schema: dict[str, Any]) -> Draft202012Validator:
    # Refs point into #/components: the document's components ride along with the schema.
    return Draft202012Validator({"allOf": [schema], "components": spec["components"]})


def test_every_error_is_problem_json_with_the_problem_schema(spec: dict[str, Any]) -> None:
    assert "Problem" in spec["components"]["schemas"]
    assert "HTTPValidationError" not in str(spec)
    errors = 0
    for method, path, operation in _operations(spec):
        for status, response in operation["responses"].items():
            if int(status) < 400:
                continue
            errors += 1
            where = f"{method} {path} {status}"
            assert list(response["content"]) == ["application/problem+json"], where
            media = response["content"]["application/problem+json"]
            assert media["schema"] == PROBLEM, where
            assert media["example"]["status"] == int(status), where
            _validator(spec, PROBLEM).validate(media["example"])
            if status in ("429", "503"):
                assert "Retry-After" in response["headers"], where
    assert errors > 100


def test_statuses_are_the_ones_a_route_can_answer(spec: dict[str, Any]) -> None:
    for method, path, operation in _operations(spec):
        statuses = {int(s) for s in operation["responses"]}
        where = f"{method} {path}: {sorted(statuses)}"
        keyed = path.startswith("/v1/")
        if keyed:
            # The key is checked (401), counted against its limits (429) in the database (503).
            assert {401, 429, 503} <= statuses, where
        if path.startswith("/v1/admin/"):
            assert 403 in statuses, where
        if "{" in path:
            # A malformed or unknown id is a 404.
            assert 404 in statuses, where
        if "requestBody" in operation:
            assert {408, 413, 422} <= statuses, where
        else:
            # Nothing is read: no stalled, oversized or unsupported body.
            assert not statuses & {408, 413, 415}, where
        if method == "GET":
            assert not statuses & {409, 413, 415}, where
        if not keyed:
            assert not statuses & {401, 403, 429}, where


def test_every_request_body_has_examples_valid_against_its_schema(spec: dict[str, Any]) -> None:
    bodies = 0
    for method, path, operation in _operations(spec):
        for media_type, media in operation.get("requestBody", {}).get("content", {}).items():
            bodies += 1
            examples = _examples(spec, media)
            assert examples, f"{method} {path} {media_type}: no example"
            if media_type == "application/json":
                for example in examples:
                    _validator(spec, media["schema"]).validate(example)
    assert bodies >= 10


def test_every_response_has_an_example_valid_against_its_schema(spec: dict[str, Any]) -> None:
    for method, path, operation in _operations(spec):
        for status, response in operation["responses"].items():
            for media_type, media in response.get("content", {}).items():
                if media_type.startswith("image/"):
                    continue
                examples = _examples(spec, media)
                assert examples, f"{method} {path} {status} {media_type}: no example"
                if media_type == "application/json" and "schema" in media:
                    for example in examples:
                        _validator(spec, media["schema"]).validate(example)


def test_mode_is_an_enum_and_steps_top_k_and_limit_are_bounded(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    support_form = spec["paths"]["/v1/tasks"]["post"]["requestBody"]["content"][
        "multipart/form-data"
    ]["schema"]["properties"]
    for mode in (
        _resolve(spec, schemas["SupportSetJson"]["properties"]["mode"]),
        support_form["mode"],
        _resolve(spec, schemas["AdaptationCreate"]["properties"]["mode"]),
        schemas["AlgorithmIn"]["properties"]["adapt_mode"],
    ):
        assert mode["enum"] == ["full", "head"], mode
    for steps in (
        _resolve(spec, schemas["SupportSetJson"]["properties"]["steps"]),
        _resolve(spec, schemas["AdaptationCreate"]["properties"]["steps"]),
        support_form["steps"],
    ):
        assert (steps["type"], steps["minimum"], steps["maximum"]) == ("integer", 0, MAX_STEPS)
    predictions = spec["paths"]["/v1/tasks/{task_id}/predictions"]
    query_form = predictions["post"]["requestBody"]["content"]["multipart/form-data"]
    top_ks = [
        _resolve(spec, schemas["QueriesJson"]["properties"]["top_k"]),
        query_form["schema"]["properties"]["top_k"],
        *[p["schema"] for p in predictions["post"]["parameters"] if p["name"] == "top_k"],
    ]
    assert len(top_ks) == 3 and all(t["minimum"] == 1 for t in top_ks), top_ks
    for path in ("/v1/tasks", "/v1/tasks/{task_id}/predictions", "/v1/admin/promotions"):
        (limit,) = [p for p in spec["paths"][path]["get"]["parameters"] if p["name"] == "limit"]
        schema = limit["schema"]
        bounds = _resolve(spec, schema)
        assert bounds.get("minimum") == 1, (path, schema)
        assert (schema.get("maximum") or bounds.get("maximum")) is not None, (path, schema)
    wait = [
        p for p in spec["paths"]["/v1/jobs/{job_id}"]["get"]["parameters"] if p["name"] == "wait"
    ]
    assert _resolve(spec, wait[0]["schema"])["minimum"] == 0


def test_the_document_is_served_and_equal_to_the_one_built(
    spec: dict[str, Any], tmp_path: Path, tiny_init_dir: Path
) -> None:
    from fastapi.testclient import TestClient

    with TestClient(create_app(make_settings(tmp_path / "data", tiny_init_dir))) as client:
        served = client.get("/openapi.json")
    assert served.status_code == 200
    assert served.json()["paths"].keys() == spec["paths"].keys()
    assert (
        served.json()["components"]["schemas"]["Problem"]
        == spec["components"]["schemas"]["Problem"]
    )
