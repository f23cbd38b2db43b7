"""The tenancy matrix: every route, which scopes may call it, and what another tenant's id answers.

A route added to the API without an entry here fails the first test, so each new route is
placed in the matrix (and so checked for scopes and for foreign ids) when it is written.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.keys import service as keys
from app.main import create_app
from app.models import ApiKey, Dataset, Initialization, Job, Tenant
from tests.admin_data import dataset_zip, tiny_run, upload
from tests.helpers import create_ready_task, make_settings, png, runtime_of, support_files

RANDOM_UUID = "5b0c4b4e-8d7e-4a59-9a51-7b8d1f0e2c3a"
RANDOM_VERSION = "no-such-version-7f3a"


@dataclass(frozen=True)
class Rule:
    """Who may call a route, and which of tenant A's ids (if any) it names."""

    scope: str  # "public", "user" or "admin" (operator-only variants are in OPERATOR_ONLY)
    names: str | None = None  # "task", "job", "version", "key", "dataset", "run"
    # Extra request arguments (a body) given the id the route names.
    request: Callable[[str], dict[str, Any]] | None = None


def _predict_body(_: str) -> dict[str, Any]:
    return {"files": [("images", ("q.png", png(7), "image/png"))]}


def _run_body(dataset_id: str) -> dict[str, Any]:
    return {"json": tiny_run(dataset_id)}


def _new_key_body(_: str) -> dict[str, Any]:
    return {"json": {"name": "probe"}}


def _task_body(_: str) -> dict[str, Any]:
    files, data = support_files(["x", "y"])
    return {"files": files, "data": data}


def _dataset_body(_: str) -> dict[str, Any]:
    return {"files": {"file": ("d.zip", b"PK", "application/zip")}, "data": {"name": "n"}}


MATRIX: dict[tuple[str, str], Rule] = {
    ("POST", "/v1/tasks"): Rule("user", request=_task_body),
    ("GET", "/v1/tasks"): Rule("user"),
    ("GET", "/v1/tasks/{task_id}"): Rule("user", "task"),
    ("DELETE", "/v1/tasks/{task_id}"): Rule("user", "task"),
    ("POST", "/v1/tasks/{task_id}/predictions"): Rule("user", "task", _predict_body),
    ("GET", "/v1/tasks/{task_id}/predictions"): Rule("user", "task"),
    ("POST", "/v1/tasks/{task_id}/adaptations"): Rule("user", "task"),
    ("GET", "/v1/tasks/{task_id}/adaptations"): Rule("user", "task"),
    ("GET", "/v1/jobs/{job_id}"): Rule("user", "job"),
    ("GET", "/v1/initializations"): Rule("user"),
    ("GET", "/v1/initializations/{version}"): Rule("user", "version"),
    ("POST", "/v1/admin/initializations/{version}/promote"): Rule("admin", "version"),
    ("POST", "/v1/admin/initializations/rollback"): Rule("admin"),
    ("POST", "/v1/admin/initializations/{version}/rollback"): Rule("admin", "version"),
    ("GET", "/v1/admin/promotions"): Rule("admin"),
    ("GET", "/v1/admin/keys"): Rule("admin"),
    ("POST", "/v1/admin/keys"): Rule("admin", request=_new_key_body),
    ("POST", "/v1/admin/keys/{key_id}/revoke"): Rule("admin", "key"),
    ("DELETE", "/v1/admin/keys/{key_id}"): Rule("admin", "key"),
    ("POST", "/v1/admin/keys/{key_id}/rotate"): Rule("admin", "key"),
    ("GET", "/v1/admin/datasets"): Rule("admin"),
    ("POST", "/v1/admin/datasets"): Rule("admin", request=_dataset_body),
    ("POST", "/v1/admin/datasets/omniglot"): Rule("admin"),
    ("GET", "/v1/admin/datasets/{dataset_id}"): Rule("admin", "dataset"),
    ("DELETE", "/v1/admin/datasets/{dataset_id}"): Rule("admin", "dataset"),
    ("GET", "/v1/admin/meta-trainings"): Rule("admin"),
    ("POST", "/v1/admin/meta-trainings"): Rule("admin", "dataset", _run_body),
    ("GET", "/v1/admin/meta-trainings/{job_id}"): Rule("admin", "run"),
    ("GET", "/v1/admin/meta-trainings/{job_id}/curve.png"): Rule("admin", "run"),
    ("POST", "/v1/admin/meta-trainings/{job_id}/cancel"): Rule("admin", "run"),
    ("GET", "/healthz"): Rule("public"),
    ("GET", "/readyz"): Rule("public"),
    ("GET", "/metrics"): Rule("public"),
}

# Variants only an operator key may call (an admin key gets 403 whatever the version).
OPERATOR_ONLY = [
    ("POST", "/v1/admin/initializations/{version}/promote?scope=global"),
    ("POST", "/v1/admin/initializations/rollback?scope=global"),
    ("POST", "/v1/admin/initializations/{version}/rollback?scope=global"),
]

# Request bodies that name a version or a dataset: another tenant's is a 404 too.
BODY_REFERENCES: list[tuple[str, str, str, Callable[[str, dict[str, str]], dict[str, Any]]]] = [
    (
        "POST",
        "/v1/admin/meta-trainings",
        "version",
        lambda v, own: {"json": {**tiny_run(own["dataset"], start=v), "model": None}},
    ),
    (
        "POST",
        "/v1/tasks/{own_task}/adaptations",
        "version",
        lambda v, _own: {"json": {"initialization_version": v}},
    ),
]


@dataclass
class World:
    """Two tenants (A with data of every kind, B probing) and an operator of a third."""

    client: TestClient
    headers: dict[str, dict[str, str]]  # "a-user", "a-admin", "b-user", "b-admin", "operator"
    a_ids: dict[str, str]  # task, job, version, key, dataset, run
    b_ids: dict[str, str]  # dataset, task
    secrets: list[str]  # strings of A that nobody else may ever see


def _headers(client: TestClient, tenant: str, **scopes: bool) -> tuple[dict[str, str], str]:
    runtime = runtime_of(client)
    with runtime.sessions() as session:
        row, key = keys.create_api_key(
            session=session,
            tenant=keys.get_or_create_tenant(session=session, name=tenant),
            pepper=runtime.settings.api_key_pepper.get_secret_value(),
            admin=scopes.get("admin", False),
            operator=scopes.get("operator", False),
        )
        session.commit()
        return {"Authorization": f"Bearer {key}"}, str(row.id)


def add_private_version(client: TestClient, tenant: str, version: str, dataset: str) -> None:
    """A ready version owned by `tenant` (the tiny weights), its metrics naming its dataset."""
    runtime = runtime_of(client)
    with runtime.sessions() as session:
        tenant_id = session.scalar(select(Tenant.id).where(Tenant.name == tenant))
        shipped = session.scalar(select(Initialization).where(Initialization.tenant_id.is_(None)))
        assert shipped is not None and tenant_id is not None
        session.add(
            Initialization(
                version=version,
                status="ready",
                source="trained",
                config=shipped.config,
                metrics={"dataset": {"name": dataset}, "iterations": 1},
                artifact_key=shipped.artifact_key,
                sha256=shipped.sha256,
                tenant_id=tenant_id,
                parent_version=shipped.version,
            )
        )
        session.commit()


def build_world(folder: Path, init_dir: Path) -> Iterator[World]:
    """Start an embedded app and fill it: see World."""
    # Every route is probed with the same few keys in quick succession: the per-key rate limit
    # (tested on its own) would answer 429 to a fast machine instead of the statuses under test.
    settings = make_settings(folder, init_dir, key_rate_per_second=10_000.0, key_rate_burst=10_000)
    with TestClient(create_app(settings)) as client:
        headers: dict[str, dict[str, str]] = {}
        headers["a-user"], a_key = _headers(client, "tenant-alpha")
        headers["a-admin"], _ = _headers(client, "tenant-alpha", admin=True)
        headers["b-user"], _ = _headers(client, "tenant-beta")
        headers["b-admin"], _ = _headers(client, "tenant-beta", admin=True)
        headers["operator"], _ = _headers(client, "operators", operator=True)
        task = create_ready_task(client, headers["a-user"])
        b_task = create_ready_task(client, headers["b-user"])
        data = dataset_zip(groups=1, classes=6, images=6)
        dataset = upload(client, headers["a-admin"], data, "alpha-secret-data").json()
        b_dataset = upload(client, headers["b-admin"], data, "beta-data").json()
        add_private_version(client, "tenant-alpha", "alpha-secret-v1", "alpha-secret-data")
        promoted = client.post(
            "/v1/admin/initializations/alpha-secret-v1/promote", headers=headers["a-admin"]
        )
        assert promoted.status_code == 200, promoted.text
        runtime = runtime_of(client)
        with runtime.sessions() as session:
            row = session.get(Dataset, uuid.UUID(dataset["id"]))
            assert row is not None
            run = Job(
                tenant_id=row.tenant_id,
                kind="meta_train",
                queue="train",
                state="cancelled",
                dataset_id=row.id,
                params={"dataset_name": row.name},
            )
            session.add(run)
            session.commit()
            run_id = str(run.id)
        a_ids = {
            "task": task["id"],
            "job": task["job"]["id"],
            "version": "alpha-secret-v1",
            "key": a_key,
            "dataset": dataset["id"],
            "run": run_id,
        }
        yield World(
            client=client,
            headers=headers,
            a_ids=a_ids,
            b_ids={"dataset": b_dataset["id"], "task": b_task["id"]},
            secrets=[*a_ids.values(), "alpha-secret-data", "tenant-alpha"],
        )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_init_dir: Path) -> Iterator[World]:
    """One world for the module (building it adapts two tasks)."""
    yield from build_world(tmp_path_factory.mktemp("tenancy") / "data", tiny_init_dir)


def _operations(client: TestClient) -> set[tuple[str, str]]:
    spec = client.app.openapi()  # type: ignore[attr-defined]
    return {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}


def _fill(path: str, value: str) -> str:
    return re.sub(r"\{[a-z_]+\}", value, path)


def test_every_route_is_in_the_tenancy_matrix(world: World) -> None:
    operations = _operations(world.client)
    assert operations - MATRIX.keys() == set(), "add these routes to MATRIX"
    assert MATRIX.keys() - operations == set(), "these MATRIX routes no longer exist"


LOWER = {"user": None, "admin": "b-user"}


@pytest.mark.parametrize(("method", "path"), sorted(MATRIX))
def test_scopes(world: World, method: str, path: str) -> None:
    rule = MATRIX[(method, path)]
    url = _fill(path, RANDOM_UUID)
    extra = rule.request(RANDOM_UUID) if rule.request else {}
    if rule.scope == "public":
        assert world.client.request(method, url).status_code == 200
        return
    anonymous = world.client.request(method, url, **extra)
    assert (anonymous.status_code, anonymous.json()["code"]) == (401, "missing_api_key")
    lower = LOWER[rule.scope]
    if lower is not None:
        response = world.client.request(method, url, headers=world.headers[lower], **extra)
        assert (response.status_code, response.json()["code"]) == (403, "forbidden")


@pytest.mark.parametrize(("method", "path"), OPERATOR_ONLY)
def test_operator_only_variants(world: World, method: str, path: str) -> None:
    for version in ("tiny-test-1", RANDOM_VERSION, world.a_ids["version"]):
        url = path.replace("{version}", version)
        for who in ("b-user", "b-admin", "a-admin"):
            response = world.client.request(method, url, headers=world.headers[who])
            assert response.status_code == 403, (who, url, response.text)


def _comparable(response: Any, *ids: str) -> tuple[int, str, str]:
    body = response.json()
    detail = body.get("detail", "")
    for value in ids:
        detail = detail.replace(value, "<id>")
    return response.status_code, body.get("code", ""), detail


FOREIGN = sorted(key for key, rule in MATRIX.items() if rule.names is not None)


@pytest.mark.parametrize(("method", "path"), FOREIGN)
def test_a_foreign_id_answers_as_an_unknown_one(world: World, method: str, path: str) -> None:
    rule = MATRIX[(method, path)]
    assert rule.names is not None
    foreign = world.a_ids[rule.names]
    unknown = RANDOM_VERSION if rule.names == "version" else RANDOM_UUID
    who = "b-admin" if rule.scope == "admin" else "b-user"
    answers = []
    for value in (foreign, unknown):
        url = _fill(path, value) if "{" in path else path
        extra = rule.request(value) if rule.request else {}
        answers.append(world.client.request(method, url, headers=world.headers[who], **extra))
    assert answers[0].status_code == 404, answers[0].text
    assert _comparable(answers[0], foreign) == _comparable(answers[1], unknown)
    for secret in world.secrets:
        assert secret not in answers[0].text.replace(foreign, "")


@pytest.mark.parametrize(("method", "path", "names", "request_of"), BODY_REFERENCES)
def test_a_foreign_id_in_a_body_answers_as_an_unknown_one(
    world: World, method: str, path: str, names: str, request_of: Any
) -> None:
    url = path.replace("{own_task}", world.b_ids["task"])
    foreign, unknown = world.a_ids[names], RANDOM_VERSION
    answers = [
        world.client.request(
            method, url, headers=world.headers["b-admin"], **request_of(value, world.b_ids)
        )
        for value in (foreign, unknown)
    ]
    assert answers[0].status_code == 404, answers[0].text
    assert _comparable(answers[0], foreign) == _comparable(answers[1], unknown)


@pytest.mark.parametrize("who", ["b-user", "b-admin", "operator"])
def test_no_answer_shows_another_tenants_names_or_ids(world: World, who: str) -> None:
    for (method, path), rule in sorted(MATRIX.items()):
        if method != "GET" or "{" in path:
            continue
        if (who, path) == ("operator", "/v1/admin/promotions"):
            continue  # the operator's audit lists every tenant's changes, by design
        response = world.client.get(path, headers=world.headers[who])
        if rule.scope == "admin" and who == "b-user":
            assert response.status_code == 403
            continue
        assert response.status_code == 200, (path, response.text)
        for secret in world.secrets:
            assert secret not in response.text, (who, path, secret)


def test_tenant_a_is_untouched_by_the_probes(world: World) -> None:
    client, a = world.client, world.headers["a-admin"]
    # Run last in the module (pytest keeps file order): every probe above answered 404.
    assert client.get(
        f"/v1/tasks/{world.a_ids['task']}", headers=world.headers["a-user"]
    ).is_success
    assert client.get(f"/v1/admin/datasets/{world.a_ids['dataset']}", headers=a).is_success
    listed = client.get("/v1/initializations", headers=world.headers["a-user"]).json()
    assert listed["active_version"] == "alpha-secret-v1"
    beta = client.get("/v1/initializations", headers=world.headers["b-user"]).json()
    assert beta["active_version"] == beta["global_version"] == "tiny-test-1"
    with runtime_of(client).sessions() as session:
        key = session.get(ApiKey, uuid.UUID(world.a_ids["key"]))
        assert key is not None and key.revoked_at is None
