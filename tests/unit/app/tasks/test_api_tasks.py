"""The task flow on the embedded default: create, wait, read, list, predict, delete."""

from __future__ import annotations

import base64
import time
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.models import AdaptedModel, Job, Prediction, SupportExample, Task
from tests.helpers import create_ready_task, jpeg, png, query_files, runtime_of, support_files


def _count(client: TestClient, model: Any) -> int:
    with runtime_of(client).sessions() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def test_create_returns_202_then_becomes_ready(client: TestClient, auth: dict[str, str]) -> None:
    files, data = support_files(["cat", "dog", "cat"])
    response = client.post("/v1/tasks", headers=auth, files=files, data={**data, "name": "pets"})
    assert response.status_code in (201, 202), response.text
    body = response.json()
    assert response.headers["Location"] == f"/v1/tasks/{body['id']}"
    assert body["labels"] == ["cat", "dog"]
    assert body["counts"] == {"cat": 2, "dog": 1}
    assert body["name"] == "pets"
    assert body["initialization_version"] == "tiny-test-1"
    assert body["links"]["job"] == f"/v1/jobs/{body['job']['id']}"
    deadline = time.monotonic() + 30
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = client.get(body["links"]["job"], headers=auth).json()
        if job["state"] in ("succeeded", "failed"):
            break
        time.sleep(0.05)
    assert job["state"] == "succeeded", job
    assert job["kind"] == "adapt" and job["attempts"] == 1 and job["progress"] == 1.0
    assert job["started_at"] and job["finished_at"]
    task = client.get(f"/v1/tasks/{body['id']}", headers=auth).json()
    assert task["status"] == "ready"
    assert task["adapted_model"]["id"] == job["result"]["adapted_model_id"]
    assert 0.0 <= task["adapted_model"]["support_accuracy"] <= 1.0


def test_wait_returns_201_and_predictions_are_recorded(
    client: TestClient, auth: dict[str, str]
) -> None:
    task = create_ready_task(client, auth, ["a", "b", "c"])
    response = client.post(
        f"/v1/tasks/{task['id']}/predictions",
        headers=auth,
        files=query_files(4),
        data={"top_k": "2"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["adapted_model_id"] == task["adapted_model"]["id"]
    assert len(body["predictions"]) == 4
    for prediction in body["predictions"]:
        probabilities = prediction["probabilities"]
        assert list(probabilities) == ["a", "b", "c"]
        assert abs(sum(probabilities.values()) - 1.0) < 1e-4
        assert len(prediction["top_k"]) == 2
        assert (
            prediction["top_k"][0]["label"]
            == prediction["label"]
            == max(probabilities, key=probabilities.get)
        )
    listed = client.get(f"/v1/tasks/{task['id']}/predictions", headers=auth).json()
    assert {p["id"] for p in listed["items"]} == {p["id"] for p in body["predictions"]}
    assert _count(client, Prediction) == 4


def test_prediction_of_an_image_does_not_depend_on_its_batch(
    client: TestClient, auth: dict[str, str]
) -> None:
    task = create_ready_task(client, auth, ["a", "b"])
    url = f"/v1/tasks/{task['id']}/predictions"
    together = client.post(url, headers=auth, files=query_files(3)).json()["predictions"]
    alone = client.post(url, headers=auth, files=query_files(3)[1:2]).json()["predictions"]
    for label in ("a", "b"):
        assert abs(together[1]["probabilities"][label] - alone[0]["probabilities"][label]) < 1e-5


def test_json_bodies_are_accepted(client: TestClient, auth: dict[str, str]) -> None:
    examples = [
        {"label": "x", "image": base64.b64encode(png(1)).decode()},
        {"label": "y", "image": base64.b64encode(jpeg(2)).decode()},
    ]
    response = client.post(
        "/v1/tasks?wait=30", headers=auth, json={"examples": examples, "mode": "head", "steps": 3}
    )
    assert response.status_code == 201, response.text
    task = response.json()
    assert task["mode"] == "head" and task["adapted_model"]["steps"] == 3
    queries = {
        "images": [base64.b64encode(png(5, size=(105, 105), mode="RGBA")).decode()],
        "top_k": 1,
    }
    response = client.post(f"/v1/tasks/{task['id']}/predictions", headers=auth, json=queries)
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["label"] in ("x", "y")


def test_list_tasks_paginates_with_a_cursor(client: TestClient, auth: dict[str, str]) -> None:
    created = [create_ready_task(client, auth, ["a", "b"])["id"] for _ in range(3)]
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/v1/tasks", headers=auth, params=params).json()
        seen += [t["id"] for t in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(created))
    bad = client.get("/v1/tasks", headers=auth, params={"cursor": "nonsense"})
    assert bad.status_code == 422 and bad.json()["code"] == "invalid_cursor"


def test_delete_removes_rows_images_and_weights(client: TestClient, auth: dict[str, str]) -> None:
    # Every image in a file, so there are image files to remove.
    runtime_of(client).settings.support_inline_max_bytes = 0
    task = create_ready_task(client, auth, ["a", "b"])
    client.post(f"/v1/tasks/{task['id']}/predictions", headers=auth, files=query_files(2))
    folder = runtime_of(client).store.path(f"tasks/{task['id']}")
    assert any(folder.rglob("*.safetensors")) and any(folder.rglob("*.png"))
    assert client.delete(f"/v1/tasks/{task['id']}", headers=auth).status_code == 204
    assert not folder.exists()
    for model in (Task, SupportExample, Job, AdaptedModel, Prediction):
        assert _count(client, model) == 0, model.__name__
    assert client.get(f"/v1/tasks/{task['id']}", headers=auth).status_code == 404


def test_idempotency_key_replays_the_same_task(client: TestClient, auth: dict[str, str]) -> None:
    files, data = support_files(["a", "b"])
    headers = {**auth, "Idempotency-Key": "req-1"}
    first = client.post("/v1/tasks?wait=30", headers=headers, files=files, data=data).json()
    second = client.post("/v1/tasks", headers=headers, files=files, data=data)
    assert second.json()["id"] == first["id"]
    assert _count(client, Task) == 1
    other_files, other_data = support_files(["c", "d"], seed=7)
    reused = client.post("/v1/tasks", headers=headers, files=other_files, data=other_data)
    assert reused.status_code == 409 and reused.json()["code"] == "idempotency_key_reused"
    assert _count(client, Task) == 1


def test_any_size_and_mode_is_converted(client: TestClient, auth: dict[str, str]) -> None:
    files = [
        ("images", ("a.png", png(1, size=(105, 105)), "image/png")),
        ("images", ("b.jpg", jpeg(2, size=(300, 200)), "image/jpeg")),
        ("images", ("c.png", png(3, size=(7, 50), mode="RGBA"), "image/png")),
    ]
    response = client.post(
        "/v1/tasks?wait=30", headers=auth, files=files, data={"labels": ["a", "b", "c"]}
    )
    assert response.status_code == 201, response.text
    with runtime_of(client).sessions() as session:
        sizes = sorted((e.width, e.height) for e in session.scalars(select(SupportExample)))
    assert sizes == [(7, 50), (105, 105), (300, 200)]
