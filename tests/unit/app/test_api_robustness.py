"""Hostile and odd requests: each answers a problem+json 4xx (never a 5xx) and writes nothing."""

from __future__ import annotations

import base64
import io
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select

from app import models
from app.core import ml
from app.predictions import service
from tests.helpers import create_key, create_ready_task, png, query_files, runtime_of, support_files


def _problem(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["code"] == code and body["detail"]
    return body


def _nothing_written(client: TestClient) -> None:
    runtime = runtime_of(client)
    with runtime.sessions() as session:
        for table in (models.Task, models.SupportExample, models.Job, models.Prediction):
            assert session.scalar(select(func.count()).select_from(table)) == 0, table
    tasks = Path(runtime.settings.data_dir) / "artifacts" / "tasks"
    assert not tasks.exists() or not any(tasks.iterdir())


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _raw_json(client: TestClient, url: str, text: str, auth: dict[str, str]) -> Any:
    return client.post(
        url, content=text.encode(), headers={**auth, "content-type": "application/json"}
    )


# --- JSON bodies ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        "[" * 100_000 + "]" * 100_000,  # RecursionError in json.loads
        '{"steps": ' + "9" * 5000 + "}",  # ValueError: over Python's int digit limit
    ],
    ids=["deep-nesting", "huge-integer"],
)
def test_unparsable_json_is_invalid_json(
    client: TestClient, auth: dict[str, str], body: str
) -> None:
    _problem(_raw_json(client, "/v1/tasks", body, auth), 422, "invalid_json")
    _nothing_written(client)


@pytest.mark.parametrize(
    ("label", "name"),
    [("\\ud800", None), ("a\\u0000", None), ("a", "\\udfff"), ("a", "x\\u0000")],
    ids=["surrogate-label", "nul-label", "surrogate-name", "nul-name"],
)
def test_unstorable_text_in_json_is_rejected(
    client: TestClient, auth: dict[str, str], label: str, name: str | None
) -> None:
    # Written by hand: json.dumps cannot produce a lone surrogate escape from a str safely.
    examples = f'[{{"label": "{label}", "image": "{_b64(png(1))}"}}, '
    examples += f'{{"label": "b", "image": "{_b64(png(2))}"}}]'
    name_part = f', "name": "{name}"' if name is not None else ""
    response = _raw_json(client, "/v1/tasks", f'{{"examples": {examples}{name_part}}}', auth)
    _problem(response, 422, "validation_error")
    _nothing_written(client)


def test_nul_in_multipart_label_is_rejected(client: TestClient, auth: dict[str, str]) -> None:
    files, data = support_files(["a\x00", "b"])
    response = client.post("/v1/tasks", headers=auth, files=files, data=data)
    assert "U+0000" in _problem(response, 422, "validation_error")["detail"]
    _nothing_written(client)


@pytest.mark.parametrize("steps", [" 3 ", "3_0", "\u0663", "+3", "3.0", "9" * 12])
def test_multipart_steps_must_be_plain_digits(
    client: TestClient, auth: dict[str, str], steps: str
) -> None:
    files, data = support_files(["a", "b"])
    response = client.post("/v1/tasks", headers=auth, files=files, data={**data, "steps": steps})
    assert "steps must be an integer" in _problem(response, 422, "validation_error")["detail"]
    _nothing_written(client)


@pytest.mark.parametrize("steps", [True, "3"])
def test_json_steps_must_be_an_integer(
    client: TestClient, auth: dict[str, str], steps: Any
) -> None:
    body = {
        "examples": [{"label": "a", "image": _b64(png(1))}, {"label": "b", "image": _b64(png(2))}],
        "steps": steps,
    }
    _problem(client.post("/v1/tasks", headers=auth, json=body), 422, "validation_error")
    _nothing_written(client)


def test_framework_parsed_json_errors_are_invalid_json(
    client: TestClient, auth: dict[str, str]
) -> None:
    task = create_ready_task(client, auth)
    url = f"/v1/tasks/{task['id']}/adaptations"
    headers = {**auth, "content-type": "application/json"}
    _problem(client.post(url, content=b"{", headers=headers), 422, "invalid_json")
    _problem(client.post(url, content=b'{"x": "\xff"}', headers=headers), 422, "invalid_json")
    surrogate = '{"initialization_version": "\\ud800"}'
    _problem(_raw_json(client, url, surrogate, auth), 422, "validation_error")


def test_malformed_multipart_is_422(client: TestClient, auth: dict[str, str]) -> None:
    for content_type in ("multipart/form-data", "multipart/form-data; boundary=y"):
        response = client.post(
            "/v1/tasks", content=b"--x\r\n\r\n", headers={**auth, "content-type": content_type}
        )
        _problem(response, 422, "invalid_multipart")
    _nothing_written(client)


def test_malformed_multipart_on_a_framework_form_is_422(client: TestClient) -> None:
    admin = create_key(client, "ops", admin=True)
    body = b"--b\r\nTRUE--b--\r\n"
    response = client.post(
        "/v1/admin/datasets",
        content=body,
        headers={**admin, "content-type": "multipart/form-data; boundary=b"},
    )
    _problem(response, 422, "invalid_multipart")


# --- images -----------------------------------------------------------------------------------


def test_mpo_jpeg_is_accepted_as_jpeg(client: TestClient, auth: dict[str, str]) -> None:
    buffer = io.BytesIO()
    first, second = Image.new("RGB", (30, 30), (200, 10, 10)), Image.new("RGB", (30, 30))
    first.save(buffer, format="MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(buffer.getvalue())).format == "MPO"
    files = [
        ("images", ("a.jpg", buffer.getvalue(), "image/jpeg")),
        ("images", ("b.png", png(2), "image/png")),
    ]
    response = client.post("/v1/tasks", headers=auth, files=files, data={"labels": ["a", "b"]})
    assert response.status_code == 202, response.text


# --- ids before bodies ------------------------------------------------------------------------


def test_unknown_or_malformed_task_is_404_whatever_the_body(
    client: TestClient, auth: dict[str, str]
) -> None:
    for task_id in (str(uuid.uuid4()), "nope"):
        url = f"/v1/tasks/{task_id}/predictions"
        _problem(client.post(url, headers=auth, json={"images": []}), 404, "not_found")
        response = client.post(
            url, headers={**auth, "content-type": "text/plain"}, content=b"hello"
        )
        _problem(response, 404, "not_found")
        response = client.post(
            f"/v1/tasks/{task_id}/adaptations", headers=auth, json={"mode": "zzz"}
        )
        _problem(response, 404, "not_found")
        response = client.post(
            f"/v1/tasks/{task_id}/adaptations",
            headers={**auth, "content-type": "text/plain"},
            content=b"hello",
        )
        _problem(response, 404, "not_found")


def test_adaptation_body_of_another_media_type_is_415(
    client: TestClient, auth: dict[str, str]
) -> None:
    task = create_ready_task(client, auth)
    url = f"/v1/tasks/{task['id']}/adaptations"
    for content_type in ("text/plain", "multipart/form-data; boundary=x", None):
        headers = {**auth, **({"content-type": content_type} if content_type else {})}
        response = client.post(url, headers=headers, content=b'{"mode": "head"}')
        _problem(response, 415, "unsupported_media_type")
    jobs = client.get(f"/v1/tasks/{task['id']}/adaptations", headers=auth).json()["items"]
    assert len(jobs) == 1  # nothing re-adapted by the refused requests
    # A +json media type is JSON: it re-adapts (no body at all does too: tests/test_admin_api.py).
    problem_json = {**auth, "content-type": "application/merge-patch+json"}
    assert client.post(url, headers=problem_json, content=b'{"mode": "head"}').status_code == 202


# --- cursors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("t", ["2020-01-01", "2020-01-01T00:00:00", "9999-12-31T23:59:59-05:00"])
def test_tampered_cursor_is_invalid_cursor(
    client: TestClient, auth: dict[str, str], t: str
) -> None:
    raw = json.dumps({"t": t, "id": str(uuid.uuid4())}).encode()
    cursor = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    _problem(
        client.get("/v1/tasks", headers=auth, params={"cursor": cursor}), 422, "invalid_cursor"
    )
    task = create_ready_task(client, auth)
    response = client.get(
        f"/v1/tasks/{task['id']}/predictions", headers=auth, params={"cursor": cursor}
    )
    _problem(response, 422, "invalid_cursor")


# --- deletes racing other work ----------------------------------------------------------------


def test_delete_while_adapting_leaves_no_files(
    client: TestClient, auth: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import fewshot.fast

    runtime = runtime_of(client)
    real_adapt = fewshot.fast.adapt_fast_with_embeddings
    deleted: list[str] = []

    def adapt_then_delete(*args: Any, **kwargs: Any) -> Any:
        adapted = real_adapt(*args, **kwargs)
        # The client deletes the task while its adapt job computes (before the weights land).
        with runtime.sessions() as session:
            task = session.scalars(select(models.Task)).one()
            deleted.append(str(task.id))
        assert client.delete(f"/v1/tasks/{deleted[0]}", headers=auth).status_code == 204
        return adapted

    monkeypatch.setattr(ml, "adapt_fast_with_embeddings", adapt_then_delete)
    files, data = support_files(["a", "b", "c"])
    response = client.post("/v1/tasks?wait=30", headers=auth, files=files, data=data)
    assert response.status_code == 404 or response.status_code in (201, 202), response.text
    assert deleted
    _problem(
        client.post(f"/v1/tasks/{deleted[0]}/predictions", headers=auth, files=query_files(1)),
        404,
        "not_found",
    )
    # The weights written after the delete's file removal are removed by the job itself.
    assert not (Path(runtime.settings.data_dir) / "artifacts" / "tasks" / deleted[0]).exists()
    _nothing_written(client)


def test_prediction_racing_a_delete_is_404_not_500(
    client: TestClient, auth: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:

    task = create_ready_task(client, auth)
    real_insert = service.insert

    def insert_after_delete(table: Any) -> Any:
        # The DELETE commits between the task lookup and the prediction rows' INSERT.
        with runtime_of(client).sessions() as other:
            other.delete(other.get(models.Task, uuid.UUID(task["id"])))
            other.commit()
        return real_insert(table)

    monkeypatch.setattr(service, "insert", insert_after_delete)
    response = client.post(
        f"/v1/tasks/{task['id']}/predictions", headers=auth, files=query_files(2)
    )
    _problem(response, 404, "not_found")
    with runtime_of(client).sessions() as session:
        assert session.scalar(select(func.count()).select_from(models.Prediction)) == 0


# --- the OpenAPI document ---------------------------------------------------------------------


def test_openapi_documents_problem_bodies_and_json_bodies(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    assert "SupportSetJson" in components and "QueriesJson" in components
    assert "SupportExampleJson" in components
    job_404 = schema["paths"]["/v1/jobs/{job_id}"]["get"]["responses"]["404"]
    assert "application/problem+json" in job_404["content"]
    metrics = schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert all(media.startswith("text/plain") for media in metrics)
