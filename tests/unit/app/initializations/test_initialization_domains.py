"""Initializations are domains, chosen per task: a photo and a character version side by side."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from app.main import create_app
from app.models import Initialization
from tests.helpers import (
    PHOTO_VERSION,
    colour_jpeg,
    create_key,
    make_settings,
    operator_key,
    runtime_of,
    support_files,
)
from tests.unit.app.test_tenancy_routes import add_private_version


@pytest.fixture
def two_domains(tmp_path: Path, tiny_init_dir: Path, photo_init_dir: Path) -> Iterator[TestClient]:
    """An embedded app serving the tiny character version and the tiny photo version."""
    settings = make_settings(
        tmp_path / "data", tiny_init_dir, extra_initialization_paths=[photo_init_dir]
    )
    with TestClient(create_app(settings)) as client:
        yield client


def photo_support(labels: list[str], shots: int = 2) -> tuple[list[Any], dict[str, Any]]:
    """Multipart files of colour JPEGs, `shots` per label."""
    files, names = [], []
    for i, label in enumerate(labels):
        for j in range(shots):
            files.append(("images", (f"{label}{j}.jpg", colour_jpeg(10 * i + j), "image/jpeg")))
            names.append(label)
    return files, {"labels": names}


def _listing(client: TestClient, headers: dict[str, str]) -> dict[str, Any]:
    response = client.get("/v1/initializations", headers=headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_both_domains_are_served_and_say_what_they_expect(two_domains: TestClient) -> None:
    headers = create_key(two_domains, "acme")
    body = _listing(two_domains, headers)
    items = {i["version"]: i for i in body["items"]}
    assert items[PHOTO_VERSION]["domain"] == "photos"
    assert items[PHOTO_VERSION]["config"]["in_channels"] == 3
    assert items[PHOTO_VERSION]["config"]["image_size"] == 16
    assert items["tiny-test-1"]["domain"] == "handwritten characters"
    # Each domain's first version is that domain's active one; the default domain's serves
    # tasks that name none.
    assert items[PHOTO_VERSION]["is_domain_default"] and items["tiny-test-1"]["is_domain_default"]
    assert body["active_version"] == "tiny-test-1"
    assert body["domain_versions"] == {
        "handwritten characters": "tiny-test-1",
        "photos": PHOTO_VERSION,
    }


def test_a_photo_task_adapts_and_predicts_from_the_named_version(two_domains: TestClient) -> None:
    headers = create_key(two_domains, "acme")
    files, data = photo_support(["cat", "dog", "car"])
    response = two_domains.post(
        "/v1/tasks?wait=30", headers=headers, files=files,
        data={**data, "initialization": PHOTO_VERSION},
    )  # fmt: skip
    assert response.status_code == 201, response.text
    task = response.json()
    assert task["initialization_version"] == PHOTO_VERSION and task["status"] == "ready"
    queries = [
        ("images", (f"q{i}.jpg", colour_jpeg(100 + i, (30, 90)), "image/jpeg")) for i in range(3)
    ]
    predicted = two_domains.post(
        f"/v1/tasks/{task['id']}/predictions", headers=headers, files=queries
    )
    assert predicted.status_code == 200, predicted.text
    labels = {p["label"] for p in predicted.json()["predictions"]}
    assert labels <= {"cat", "dog", "car", "unknown"}
    # Without a name the default domain's version serves, as before.
    files, data = support_files(["a", "b"])
    plain = two_domains.post("/v1/tasks?wait=30", headers=headers, files=files, data=data)
    assert plain.status_code == 201 and plain.json()["initialization_version"] == "tiny-test-1"


def test_json_bodies_name_the_initialization_too(two_domains: TestClient) -> None:
    import base64

    headers = create_key(two_domains, "acme")
    examples = [
        {"label": label, "image": base64.b64encode(colour_jpeg(seed)).decode()}
        for seed, label in enumerate(["x", "x", "y", "y"])
    ]
    response = two_domains.post(
        "/v1/tasks?wait=30", headers=headers,
        json={"examples": examples, "initialization": PHOTO_VERSION},
    )  # fmt: skip
    assert response.status_code == 201, response.text
    assert response.json()["initialization_version"] == PHOTO_VERSION


def test_unknown_foreign_and_unready_versions_are_refused_and_nothing_is_stored(
    two_domains: TestClient,
) -> None:
    a = create_key(two_domains, "a")
    b = create_key(two_domains, "b")
    add_private_version(two_domains, "a", "a-own", "a-data")

    def create(headers: dict[str, str], version: str) -> Any:
        files, data = support_files(["a", "b"])
        return two_domains.post(
            "/v1/tasks", headers=headers, files=files, data={**data, "initialization": version}
        )

    unknown = create(a, "no-such-version")
    assert unknown.status_code == 404
    assert unknown.headers["content-type"].startswith("application/problem+json")
    assert "no-such-version" in unknown.json()["detail"]
    # Another tenant's version is answered exactly as an unknown one.
    foreign = create(b, "a-own")
    assert foreign.status_code == 404 and "a-own" in foreign.json()["detail"]
    assert create(a, "a-own").status_code == 202
    runtime = runtime_of(two_domains)
    with runtime.sessions() as session:
        session.execute(
            update(Initialization)
            .where(Initialization.version == PHOTO_VERSION)
            .values(status="pending")
        )
        session.commit()
    unready = create(a, PHOTO_VERSION)
    assert unready.status_code == 409 and unready.json()["code"] == "initialization_not_ready"
    blank = create(a, "   ")
    assert blank.status_code == 422 and blank.json()["code"] == "invalid_initialization"
    tasks = two_domains.get("/v1/tasks", headers=b).json()["items"]
    assert tasks == []
    assert len(two_domains.get("/v1/tasks", headers=a).json()["items"]) == 1


def test_promotion_and_rollback_act_within_one_domain(two_domains: TestClient) -> None:
    operator = operator_key(two_domains)
    runtime = runtime_of(two_domains)
    with runtime.sessions() as session:
        photo = session.scalar(
            select(Initialization).where(Initialization.version == PHOTO_VERSION)
        )
        assert photo is not None
        session.add(
            Initialization(
                version="tiny-photos-2", status="ready", source="imported", domain="photos",
                config=photo.config, metrics={}, artifact_key=photo.artifact_key,
                sha256=photo.sha256,
            )
        )  # fmt: skip
        session.commit()
    promoted = two_domains.post(
        "/v1/admin/initializations/tiny-photos-2/promote?scope=global", headers=operator
    )
    assert promoted.status_code == 200, promoted.text
    assert promoted.json() == {"active_version": "tiny-photos-2", "previous_version": PHOTO_VERSION}
    body = _listing(two_domains, operator)
    # The character domain's version still serves tasks that name none.
    assert body["global_version"] == "tiny-test-1"
    assert body["domain_versions"]["photos"] == "tiny-photos-2"
    back = two_domains.post(
        "/v1/admin/initializations/tiny-photos-2/rollback?scope=global", headers=operator
    )
    assert back.status_code == 200, back.text
    assert back.json() == {"active_version": PHOTO_VERSION, "previous_version": "tiny-photos-2"}
    body = _listing(two_domains, operator)
    assert body["domain_versions"] == {
        "handwritten characters": "tiny-test-1",
        "photos": PHOTO_VERSION,
    }


def test_a_new_installation_serves_every_shipped_folder_with_photos_conv4_active(
    tmp_path: Path,
) -> None:
    import json

    from fewshot.initialization import (
        shipped_initialization_paths,
        shipped_photo_initialization_path,
    )

    folders = [p for p in shipped_initialization_paths() if (p / "weights.safetensors").is_file()]
    photo = shipped_photo_initialization_path()
    if photo not in folders:
        pytest.skip("no shipped photo initialization (fewshot/shipped/photos-conv4)")

    def version(folder: Path) -> str:
        return str(json.loads((folder / "config.json").read_text())["metadata"]["version"])

    settings = make_settings(tmp_path / "data", tmp_path / "unused", initialization_path=None)
    with TestClient(create_app(settings)) as client:
        body = _listing(client, create_key(client, "acme"))
    items = {i["version"]: i for i in body["items"]}
    assert set(items) == {version(f) for f in folders}
    # photos-conv4/ is the photo domain's active version; other photo folders are offered beside it.
    assert body["domain_versions"]["photos"] == version(photo)
    for folder in folders:
        if items[version(folder)]["domain"] == "photos":
            assert items[version(folder)]["is_domain_default"] == (folder == photo), folder.name
