"""Admin meta-retraining on the embedded default: datasets, runs, promotion, re-adaptation."""

from __future__ import annotations

import io
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.core.config import Settings
from app.keys import service as keys
from app.main import create_app
from app.models import AdaptedModel, Dataset, Job
from tests.admin_data import dataset_zip, tiny_run, upload, wait_run
from tests.helpers import create_key, create_ready_task, make_settings, png, runtime_of


@pytest.fixture
def admin(client: TestClient) -> dict[str, str]:
    """Headers with an admin key of tenant "acme"."""
    return create_key(client, "acme", admin=True)


@pytest.fixture(scope="module")
def good_zip() -> bytes:
    """4 groups x 8 generated classes x 6 images."""
    return dataset_zip()


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _classes(count: int = 6) -> dict[str, bytes]:
    return {f"c{c}/{i}.png": png(c * 10 + i) for c in range(count) for i in range(2)}


def _symlink_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in _classes().items():
            archive.writestr(name, data)
        link = zipfile.ZipInfo("c0/link.png")
        link.external_attr = (0o120777 << 16) | 0x20
        archive.writestr(link, "/etc/passwd")
    return buffer.getvalue()


ADMIN_ROUTES = [
    ("post", "/v1/admin/datasets"),
    ("post", "/v1/admin/datasets/omniglot"),
    ("get", "/v1/admin/datasets"),
    ("get", "/v1/admin/datasets/00000000-0000-0000-0000-000000000000"),
    ("delete", "/v1/admin/datasets/00000000-0000-0000-0000-000000000000"),
    ("post", "/v1/admin/meta-trainings"),
    ("get", "/v1/admin/meta-trainings"),
    ("get", "/v1/admin/meta-trainings/00000000-0000-0000-0000-000000000000"),
    ("get", "/v1/admin/meta-trainings/00000000-0000-0000-0000-000000000000/curve.png"),
    ("post", "/v1/admin/meta-trainings/00000000-0000-0000-0000-000000000000/cancel"),
    ("post", "/v1/admin/initializations/tiny-test-1/promote"),
    ("post", "/v1/admin/initializations/tiny-test-1/rollback"),
    ("post", "/v1/admin/initializations/rollback"),
    ("get", "/v1/admin/promotions"),
    ("get", "/v1/admin/keys"),
    ("post", "/v1/admin/keys"),
    ("post", "/v1/admin/keys/00000000-0000-0000-0000-000000000000/revoke"),
    ("delete", "/v1/admin/keys/00000000-0000-0000-0000-000000000000"),
    ("post", "/v1/admin/keys/00000000-0000-0000-0000-000000000000/rotate"),
]


def test_every_admin_route_needs_an_admin_key(client: TestClient, auth: dict[str, str]) -> None:
    spec = client.get("/openapi.json").json()["paths"]
    operations = [m for path, ops in spec.items() if path.startswith("/v1/admin") for m in ops]
    assert len(operations) == len(ADMIN_ROUTES)  # every admin route is checked below
    for method, path in ADMIN_ROUTES:
        response = client.request(method, path, headers=auth)
        assert response.status_code == 403, (method, path, response.text)
        assert response.json()["code"] == "forbidden"
        response = client.request(method, path)
        assert response.status_code == 401, (method, path)


@pytest.mark.parametrize(
    ("members", "code", "status"),
    [
        ({"a.png": png(1), "b.png": png(2)}, "no_class_folders", 422),
        ({}, "no_class_folders", 422),
        ({**_classes(), "c0/notes.txt": b"hello"}, "non_image_file", 422),
        ({**_classes(), "c1/fake.png": b"not an image"}, "invalid_image", 422),
        ({**_classes(), "../evil/0.png": png(3)}, "unsafe_dataset_path", 422),
        ({**_classes(), "/abs/c/0.png": png(3)}, "unsafe_dataset_path", 422),
        ({**_classes(), "c2\\..\\..\\x.png": png(3)}, "unsafe_dataset_path", 422),
        (_classes(3), "too_few_classes", 422),
        ({**_classes(), "empty/": b""}, "empty_class", 422),
        (b"PK but not a zip", "invalid_dataset_archive", 422),
        (_symlink_zip(), "unsafe_dataset_path", 422),
    ],
)
def test_bad_dataset_zips_are_rejected_and_leave_nothing(
    client: TestClient, admin: dict[str, str], members: Any, code: str, status: int
) -> None:
    data = members if isinstance(members, bytes) else _zip(members)
    response = upload(client, admin, data, "bad")
    assert response.status_code == status, response.text
    assert response.json()["code"] == code
    assert response.headers["content-type"].startswith("application/problem+json")
    _assert_no_datasets(client)


def test_too_large_dataset_is_rejected_and_leaves_nothing(
    tmp_path: Path, tiny_init_dir: Path, good_zip: bytes
) -> None:
    settings = make_settings(tmp_path / "data", tiny_init_dir, max_dataset_bytes=len(good_zip) // 2)
    with TestClient(create_app(settings)) as client:
        admin = create_key(client, "acme", admin=True)
        response = upload(client, admin, good_zip, "big")
        assert response.status_code == 413, response.text
        assert response.json()["code"] == "dataset_too_large"
        _assert_no_datasets(client)


def _assert_no_datasets(client: TestClient) -> None:
    runtime = runtime_of(client)
    with runtime.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Dataset)) == 0
    folder = runtime.store.root / "datasets"
    assert not folder.exists() or not any(folder.rglob("*.*")), list(folder.rglob("*"))


def test_upload_list_show_and_duplicate_name(
    client: TestClient, admin: dict[str, str], good_zip: bytes
) -> None:
    response = upload(client, admin, good_zip, "generated")
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["class_count"], body["image_count"]) == (32, 192)
    assert body["details"]["layout"] == "grouped" and body["details"]["groups"] == 4
    assert response.headers["Location"] == f"/v1/admin/datasets/{body['id']}"
    listed = client.get("/v1/admin/datasets", headers=admin).json()["items"]
    assert [d["id"] for d in listed] == [body["id"]]
    assert client.get(f"/v1/admin/datasets/{body['id']}", headers=admin).json() == body
    again = upload(client, admin, good_zip, "generated")
    assert again.status_code == 409 and again.json()["code"] == "dataset_name_taken"
    other_admin = create_key(client, "other", admin=True)
    assert client.get(f"/v1/admin/datasets/{body['id']}", headers=other_admin).status_code == 404


def test_omniglot_is_registered_only_from_the_settings_path(
    tmp_path: Path, tiny_init_dir: Path, good_zip: bytes
) -> None:
    settings = make_settings(tmp_path / "a", tiny_init_dir)
    with TestClient(create_app(settings)) as client:
        admin = create_key(client, "acme", admin=True)
        response = client.post("/v1/admin/datasets/omniglot", headers=admin, json={})
        assert response.status_code == 503 and response.json()["code"] == "omniglot_not_configured"
        sneaky = client.post("/v1/admin/datasets/omniglot", headers=admin, json={"path": "/etc"})
        assert sneaky.status_code == 422
    source = tmp_path / "background.zip"
    source.write_bytes(dataset_zip(groups=3, classes=8))
    settings = make_settings(tmp_path / "b", tiny_init_dir, omniglot_path=source)
    with TestClient(create_app(settings)) as client:
        admin = create_key(client, "acme", admin=True)
        response = client.post("/v1/admin/datasets/omniglot", headers=admin, json={})
        assert response.status_code == 201, response.text
        assert response.json()["name"] == "omniglot-background"
        assert response.json()["details"]["source"] == "omniglot"


def test_meta_training_promotion_readaptation_and_rollback(
    client: TestClient, admin: dict[str, str], auth: dict[str, str], good_zip: bytes
) -> None:
    old_task = create_ready_task(client, auth)
    assert old_task["initialization_version"] == "tiny-test-1"
    dataset = upload(client, admin, good_zip, "generated").json()
    started = client.post("/v1/admin/meta-trainings", headers=admin, json=tiny_run(dataset["id"]))
    assert started.status_code == 202, started.text
    run = started.json()
    assert run["state"] == "queued" and run["progress"]["total"] == 8
    seen: set[int] = set()

    def record(body: dict[str, Any]) -> bool:
        seen.add(body["progress"]["iteration"] or 0)
        return body["state"] not in ("queued", "running")

    run = wait_run(client, admin, run["id"], until=record)
    assert run["state"] == "succeeded", run
    assert run["progress"]["iteration"] == 8 and run["progress"]["fraction"] == 1.0
    assert len(run["curve"]) == 4 and "val_5w1s" in run["curve"][-1]
    version = run["result"]["initialization_version"]
    metrics = run["result"]["metrics"]
    assert set(metrics["validation"]["5w1s"]) == {"accuracy", "ci95", "episodes"}
    assert metrics["baseline"]["version"] == "tiny-test-1"
    assert "5w1s" in metrics["comparison"]
    assert run["result"]["promoted"] is False
    png_response = client.get(run["links"]["curve"], headers=admin)
    assert png_response.status_code == 200
    assert png_response.content.startswith(b"\x89PNG")

    listed = client.get("/v1/initializations", headers=auth).json()
    assert listed["active_version"] == "tiny-test-1"
    new = next(i for i in listed["items"] if i["version"] == version)
    assert new["metrics"]["wall_time_s"] >= 0 and new["parent_version"] is None

    promoted = client.post(f"/v1/admin/initializations/{version}/promote", headers=admin)
    assert promoted.json() == {"active_version": version, "previous_version": "tiny-test-1"}
    new_task = create_ready_task(client, auth)
    assert new_task["initialization_version"] == version
    assert new_task["adapted_model"]["initialization_version"] == version
    # The old task keeps its version until it is re-adapted; then it has two models.
    assert (
        client.get(f"/v1/tasks/{old_task['id']}", headers=auth).json()["initialization_version"]
        == "tiny-test-1"
    )
    readapt = client.post(f"/v1/tasks/{old_task['id']}/adaptations", headers=auth)
    assert readapt.status_code == 202, readapt.text
    _wait_job(client, auth, readapt.json()["id"])
    task = client.get(f"/v1/tasks/{old_task['id']}", headers=auth).json()
    assert task["initialization_version"] == version
    assert task["adapted_model"]["initialization_version"] == version
    models = client.get(f"/v1/tasks/{old_task['id']}/adaptations", headers=auth).json()["items"]
    assert [m["initialization_version"] for m in models] == [version, "tiny-test-1"]
    named = client.post(
        f"/v1/tasks/{old_task['id']}/adaptations",
        headers=auth,
        json={"initialization_version": "tiny-test-1", "steps": 1},
    )
    _wait_job(client, auth, named.json()["id"])
    task = client.get(f"/v1/tasks/{old_task['id']}", headers=auth).json()
    assert task["adapted_model"]["initialization_version"] == "tiny-test-1"
    predicted = client.post(
        f"/v1/tasks/{old_task['id']}/predictions",
        headers=auth,
        files=[("images", ("q.png", png(5), "image/png"))],
    )
    assert predicted.status_code == 200
    assert predicted.json()["adapted_model_id"] == task["adapted_model"]["id"]

    back = client.post("/v1/admin/initializations/rollback", headers=admin)
    assert back.json() == {"active_version": "tiny-test-1", "previous_version": version}
    assert client.get("/v1/initializations", headers=auth).json()["active_version"] == "tiny-test-1"
    nothing = client.post("/v1/admin/initializations/rollback", headers=admin)
    assert nothing.status_code == 409 and nothing.json()["code"] == "no_previous_version"
    history = client.get("/v1/admin/promotions", headers=admin).json()["items"]
    key = f"key:{_key_id(client, admin)}"
    assert [(h["action"], h["version"], h["previous_version"], h["actor"]) for h in history] == [
        ("rollback", "tiny-test-1", version, key),
        ("promote", version, "tiny-test-1", key),
        ("initial", "tiny-test-1", None, "system"),
    ]
    assert len(client.get("/v1/admin/promotions?limit=1", headers=admin).json()["items"]) == 1
    assert client.get("/v1/admin/promotions?limit=0", headers=admin).status_code == 422
    with runtime_of(client).sessions() as session:
        assert (
            session.scalar(
                select(func.count())
                .select_from(AdaptedModel)
                .where(AdaptedModel.task_id == uuid.UUID(old_task["id"]))
            )
            == 3
        )


def _key_id(client: TestClient, headers: dict[str, str]) -> uuid.UUID:
    token = headers["Authorization"].removeprefix("Bearer ")
    runtime = runtime_of(client)
    with runtime.sessions() as session:
        key = keys.authenticate(
            session=session, key=token, pepper=runtime.settings.api_key_pepper.get_secret_value()
        )
        assert key is not None
        return key.id


def _wait_job(client: TestClient, headers: dict[str, str], job_id: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if job["state"] not in ("queued", "running"):
            assert job["state"] == "succeeded", job
            return
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish")


def test_bad_runs_are_refused(client: TestClient, admin: dict[str, str], good_zip: bytes) -> None:
    dataset = upload(client, admin, good_zip, "generated").json()
    cases = [
        (tiny_run(dataset["id"], algorithm={"ways": [5, 40]}), 422, "dataset_too_small"),
        (tiny_run(dataset["id"], start="no-such-version"), 404, "not_found"),
        (tiny_run("00000000-0000-0000-0000-000000000000"), 404, "not_found"),
        (tiny_run(dataset["id"], algorithm={"ways": [6, 5]}), 422, "validation_error"),
        ({**tiny_run(dataset["id"]), "start": "tiny-test-1"}, 422, "model_with_start_version"),
    ]
    for body, status, code in cases:
        response = client.post("/v1/admin/meta-trainings", headers=admin, json=body)
        assert (response.status_code, response.json()["code"]) == (status, code), response.text


def test_auto_promote_and_start_from_a_version(
    client: TestClient, admin: dict[str, str], auth: dict[str, str], good_zip: bytes
) -> None:
    dataset = upload(client, admin, good_zip, "generated").json()
    body = tiny_run(dataset["id"], start="tiny-test-1", auto_promote=True)
    del body["model"]
    # Starting from the active version with a tiny outer step cannot get much worse.
    body["algorithm"] = {**body["algorithm"], "outer_lr": 1e-7, "iterations": 2}
    body["validation_episodes"] = 20
    run = client.post("/v1/admin/meta-trainings", headers=admin, json=body).json()
    run = wait_run(client, admin, run["id"])
    assert run["state"] == "succeeded", run
    assert run["start"] == "tiny-test-1"
    # The held-out group has 8 classes: no 20-way check, so no auto-promotion (promotions that
    # go through: tests/test_promotion_api.py).
    assert run["result"]["promoted"] is False
    reasons = run["result"]["promotion"]["reasons"]
    assert "20-way 1-shot: the validation data cannot supply this shape" in reasons
    version = run["result"]["initialization_version"]
    assert client.get("/v1/initializations", headers=auth).json()["active_version"] == "tiny-test-1"
    assert (
        client.get(f"/v1/initializations/{version}", headers=auth).json()["parent_version"]
        == "tiny-test-1"
    )


def test_cancel_stops_a_run(client: TestClient, admin: dict[str, str], good_zip: bytes) -> None:
    dataset = upload(client, admin, good_zip, "generated").json()
    body = tiny_run(dataset["id"], algorithm={"iterations": 100_000})
    run = client.post("/v1/admin/meta-trainings", headers=admin, json=body).json()
    wait_run(client, admin, run["id"], until=lambda b: (b["progress"]["iteration"] or 0) >= 2)
    cancelled = client.post(run["links"]["cancel"], headers=admin)
    assert cancelled.status_code == 202 and cancelled.json()["cancel_requested_at"]
    run = wait_run(client, admin, run["id"], timeout=30)
    assert run["state"] == "cancelled" and run["result"] is None
    assert run["progress"]["iteration"] < 100_000
    again = client.post(run["links"]["cancel"], headers=admin)
    assert again.status_code == 409 and again.json()["code"] == "job_finished"


def test_delete_dataset_waits_for_its_runs_then_removes_row_and_zip(
    client: TestClient, admin: dict[str, str], good_zip: bytes
) -> None:
    dataset = upload(client, admin, good_zip, "generated").json()
    url = f"/v1/admin/datasets/{dataset['id']}"
    other_admin = create_key(client, "other", admin=True)
    assert client.delete(url, headers=other_admin).status_code == 404
    body = tiny_run(dataset["id"], algorithm={"iterations": 100_000})
    run = client.post("/v1/admin/meta-trainings", headers=admin, json=body).json()
    busy = client.delete(url, headers=admin)
    assert busy.status_code == 409 and busy.json()["code"] == "dataset_in_use"
    assert run["id"] in busy.json()["detail"]
    assert client.get(url, headers=admin).status_code == 200
    client.post(run["links"]["cancel"], headers=admin)
    wait_run(client, admin, run["id"], timeout=30)
    assert client.delete(url, headers=admin).status_code == 204
    assert client.get(url, headers=admin).status_code == 404
    assert client.delete(url, headers=admin).status_code == 404
    _assert_no_datasets(client)
    # The finished run still says which dataset it read.
    ended = client.get(f"/v1/admin/meta-trainings/{run['id']}", headers=admin).json()
    assert ended["state"] == "cancelled"
    assert ended["dataset_id"] is None and ended["dataset_name"] == "generated"
    assert upload(client, admin, good_zip, "generated").status_code == 201  # the name is free


def test_an_interrupted_run_resumes_from_its_checkpoint_on_restart(
    settings: Settings, good_zip: bytes
) -> None:
    with TestClient(create_app(settings)) as client:
        admin = create_key(client, "acme", admin=True)
        dataset = upload(client, admin, good_zip, "generated").json()
        body = tiny_run(dataset["id"], algorithm={"iterations": 60})
        run = client.post("/v1/admin/meta-trainings", headers=admin, json=body).json()
        wait_run(
            client,
            admin,
            run["id"],
            until=lambda b: (b["progress"]["checkpoint_iteration"] or 0) >= 4,
        )
    # Shutting down checkpointed the run and put it back in the queue.
    with TestClient(create_app(settings)) as client:
        with runtime_of(client).sessions() as session:
            job = session.get(Job, uuid.UUID(run["id"]))
            assert job is not None
        stopped_at = job.progress_detail["checkpoint_iteration"]
        run = wait_run(client, admin, run["id"])
        assert run["state"] == "succeeded", run
        resume = run["progress"]["resumes"][0]
        assert resume["iteration"] >= stopped_at > 0
        assert run["progress"]["iteration"] == 60


def test_a_run_whose_classes_are_too_small_is_refused_up_front(
    client: TestClient, admin: dict[str, str]
) -> None:
    # Two images per class: training episodes fit (1 shot + 1 query), validation ones (1 + 5) do not.
    dataset = upload(client, admin, dataset_zip(images=2), "small-classes").json()
    response = client.post("/v1/admin/meta-trainings", headers=admin, json=tiny_run(dataset["id"]))
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "classes_too_small"
    assert "only 2 images" in response.json()["detail"]
    listed = client.get("/v1/admin/meta-trainings", headers=admin).json()
    assert listed["items"] == []
