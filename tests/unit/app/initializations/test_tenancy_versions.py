"""Versions and defaults per tenant: a tenant's versions are its own, its default is its own, and
only an operator changes what serves everyone."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.admin_data import dataset_zip, tiny_run, upload, wait_run
from tests.helpers import create_key, create_ready_task, runtime_of
from tests.unit.app.test_tenancy_routes import add_private_version


@pytest.fixture
def keys(client: TestClient) -> dict[str, dict[str, str]]:
    """User and admin keys of tenants a and b, and an operator key of tenant ops."""
    made = {
        "a-user": create_key(client, "a"),
        "a-admin": create_key(client, "a", admin=True),
        "b-user": create_key(client, "b"),
        "b-admin": create_key(client, "b", admin=True),
    }
    from app.keys import service

    runtime = runtime_of(client)
    with runtime.sessions() as session:
        _, key = service.create_api_key(
            session=session,
            tenant=service.get_or_create_tenant(session=session, name="ops"),
            admin=False,
            operator=True,
            pepper=runtime.settings.api_key_pepper.get_secret_value(),
        )
        session.commit()
    made["operator"] = {"Authorization": f"Bearer {key}"}
    return made


def _listing(client: TestClient, headers: dict[str, str]) -> dict[str, Any]:
    response = client.get("/v1/initializations", headers=headers)
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


def test_a_tenant_default_serves_only_that_tenant(
    client: TestClient, keys: dict[str, dict[str, str]]
) -> None:
    add_private_version(client, "a", "a-v1", "a-data")
    promoted = client.post("/v1/admin/initializations/a-v1/promote", headers=keys["a-admin"])
    assert promoted.json() == {"active_version": "a-v1", "previous_version": "tiny-test-1"}
    assert create_ready_task(client, keys["a-user"])["initialization_version"] == "a-v1"
    assert create_ready_task(client, keys["b-user"])["initialization_version"] == "tiny-test-1"
    mine = {i["version"]: i for i in _listing(client, keys["a-user"])["items"]}
    assert mine["a-v1"]["scope"] == "tenant" and mine["a-v1"]["is_active"]
    assert mine["a-v1"]["is_tenant_default"] and not mine["a-v1"]["is_global_default"]
    assert mine["tiny-test-1"]["is_global_default"] and not mine["tiny-test-1"]["is_active"]
    assert "a-v1" not in str(_listing(client, keys["b-user"]))

    # An admin cannot change the global default; the operator can, and tenant a keeps its own.
    refused = client.post(
        "/v1/admin/initializations/tiny-test-1/promote?scope=global", headers=keys["b-admin"]
    )
    assert refused.status_code == 403
    add_private_version(client, "ops", "ops-v1", "ops-secret-data")
    published = client.post(
        "/v1/admin/initializations/ops-v1/promote?scope=global", headers=keys["operator"]
    )
    assert published.json() == {"active_version": "ops-v1", "previous_version": "tiny-test-1"}
    assert _listing(client, keys["b-user"])["active_version"] == "ops-v1"
    assert _listing(client, keys["a-user"])["active_version"] == "a-v1"
    # Published for everyone: seen by all, without what named the operator tenant's data.
    seen = client.get("/v1/initializations/ops-v1", headers=keys["b-user"]).json()
    assert seen["scope"] == "global" and "dataset" not in seen["metrics"]
    assert "ops-secret-data" not in client.get("/v1/initializations", headers=keys["b-user"]).text

    # The tenant rolls back to following the global default; a second rollback has nothing.
    back = client.post("/v1/admin/initializations/rollback", headers=keys["a-admin"])
    assert back.json() == {"active_version": "ops-v1", "previous_version": "a-v1"}
    nothing = client.post("/v1/admin/initializations/rollback", headers=keys["a-admin"])
    assert (nothing.status_code, nothing.json()["code"]) == (409, "no_previous_version")
    globally = client.post(
        "/v1/admin/initializations/rollback?scope=global", headers=keys["operator"]
    )
    assert globally.json() == {"active_version": "tiny-test-1", "previous_version": "ops-v1"}


def test_promotions_show_a_tenant_only_its_own_changes(
    client: TestClient, keys: dict[str, dict[str, str]]
) -> None:
    add_private_version(client, "a", "a-v1", "a-data")
    client.post("/v1/admin/initializations/a-v1/promote", headers=keys["a-admin"])
    client.post(
        "/v1/admin/initializations/tiny-test-1/promote?scope=global", headers=keys["operator"]
    )
    add_private_version(client, "ops", "ops-v1", "ops-data")
    client.post("/v1/admin/initializations/ops-v1/promote?scope=global", headers=keys["operator"])

    seen_by_b = client.get("/v1/admin/promotions", headers=keys["b-admin"]).json()["items"]
    assert [(p["scope"], p["version"], p["actor"]) for p in seen_by_b] == [
        ("global", "ops-v1", "operator"),
        ("global", "tiny-test-1", "system"),
    ]
    seen_by_a = client.get("/v1/admin/promotions", headers=keys["a-admin"]).json()["items"]
    assert [(p["scope"], p["version"]) for p in seen_by_a] == [
        ("global", "ops-v1"),
        ("tenant", "a-v1"),
        ("global", "tiny-test-1"),
    ]
    assert seen_by_a[1]["actor"].startswith("key:") and seen_by_a[1]["tenant"] is None
    everything = client.get("/v1/admin/promotions", headers=keys["operator"]).json()["items"]
    assert [(p["version"], p["tenant"]) for p in everything] == [
        ("ops-v1", None),
        ("a-v1", "a"),
        ("tiny-test-1", None),
    ]
    assert everything[0]["actor"].startswith("key:")


def test_a_trained_version_belongs_to_its_tenant(
    client: TestClient, keys: dict[str, dict[str, str]]
) -> None:
    dataset = upload(client, keys["a-admin"], dataset_zip(groups=1, classes=8), "a-data").json()
    body = tiny_run(dataset["id"], start="tiny-test-1")
    del body["model"]
    body["algorithm"] = {**body["algorithm"], "outer_lr": 1e-7, "iterations": 2}
    body["validation_episodes"] = 20
    run = client.post("/v1/admin/meta-trainings", headers=keys["a-admin"], json=body).json()
    run = wait_run(client, keys["a-admin"], run["id"])
    assert run["state"] == "succeeded", run
    version = run["result"]["initialization_version"]
    # Tenant a's admin makes its own version its tenant's default.
    promoted = client.post(f"/v1/admin/initializations/{version}/promote", headers=keys["a-admin"])
    assert promoted.status_code == 200, promoted.text
    mine = client.get(f"/v1/initializations/{version}", headers=keys["a-user"]).json()
    assert mine["scope"] == "tenant" and mine["metrics"]["dataset"]["name"] == "a-data"
    assert _listing(client, keys["a-user"])["active_version"] == version
    # Tenant b: unaffected, and the version is as unknown as any.
    assert _listing(client, keys["b-user"])["active_version"] == "tiny-test-1"
    assert client.get(f"/v1/initializations/{version}", headers=keys["b-user"]).status_code == 404
    own = upload(client, keys["b-admin"], dataset_zip(groups=1, classes=8), "b-data").json()
    start_from_it = client.post(
        "/v1/admin/meta-trainings",
        headers=keys["b-admin"],
        json={**tiny_run(own["id"], start=version), "model": None},
    )
    assert (start_from_it.status_code, start_from_it.json()["code"]) == (404, "not_found")
