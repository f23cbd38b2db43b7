"""API keys: 401 without a valid one; a foreign id is the same 404 as a missing one."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.helpers import create_key, create_ready_task, query_files, support_files

ROUTES = [
    ("POST", "/v1/tasks"),
    ("GET", "/v1/tasks"),
    ("GET", "/v1/tasks/00000000-0000-4000-8000-000000000000"),
    ("DELETE", "/v1/tasks/00000000-0000-4000-8000-000000000000"),
    ("POST", "/v1/tasks/00000000-0000-4000-8000-000000000000/predictions"),
    ("GET", "/v1/tasks/00000000-0000-4000-8000-000000000000/predictions"),
    ("GET", "/v1/jobs/00000000-0000-4000-8000-000000000000"),
    ("GET", "/v1/initializations"),
    ("GET", "/v1/initializations/tiny-test-1"),
]


@pytest.mark.parametrize(("method", "url"), ROUTES)
def test_every_v1_route_needs_a_key(client: TestClient, method: str, url: str) -> None:
    missing = client.request(method, url)
    assert missing.status_code == 401
    assert missing.json()["code"] == "missing_api_key"
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    wrong = client.request(method, url, headers={"Authorization": "Bearer msk_not-a-real-key"})
    assert wrong.status_code == 401
    assert wrong.json()["code"] == "invalid_api_key"


def test_bad_input_is_not_parsed_before_auth(client: TestClient) -> None:
    response = client.post("/v1/tasks", content=b"junk", headers={"Content-Type": "text/plain"})
    assert response.status_code == 401


def test_tenants_are_isolated_on_every_route_with_an_id(client: TestClient) -> None:
    owner = create_key(client, "acme")
    other = create_key(client, "globex")
    task = create_ready_task(client, owner, ["a", "b"])
    task_id, job_id = task["id"], task["job"]["id"]
    assert (
        client.post(
            f"/v1/tasks/{task_id}/predictions", headers=owner, files=query_files(1)
        ).status_code
        == 200
    )

    for method, url in [
        ("GET", f"/v1/tasks/{task_id}"),
        ("GET", f"/v1/tasks/{task_id}/predictions"),
        ("GET", f"/v1/jobs/{job_id}"),
        ("DELETE", f"/v1/tasks/{task_id}"),
    ]:
        response = client.request(method, url, headers=other)
        assert response.status_code == 404, (method, url)
        assert response.json()["code"] == "not_found"
    foreign = client.post(f"/v1/tasks/{task_id}/predictions", headers=other, files=query_files(1))
    assert foreign.status_code == 404
    assert client.get("/v1/tasks", headers=other).json()["items"] == []

    # The owner still has everything, untouched.
    assert client.get(f"/v1/tasks/{task_id}", headers=owner).status_code == 200
    assert len(client.get(f"/v1/tasks/{task_id}/predictions", headers=owner).json()["items"]) == 1


def test_same_idempotency_key_in_two_tenants_is_independent(client: TestClient) -> None:
    first = create_key(client, "acme")
    second = create_key(client, "globex")
    files, data = support_files(["a", "b"])
    one = client.post(
        "/v1/tasks", headers={**first, "Idempotency-Key": "k"}, files=files, data=data
    )
    two = client.post(
        "/v1/tasks", headers={**second, "Idempotency-Key": "k"}, files=files, data=data
    )
    assert one.status_code in (201, 202) and two.status_code in (201, 202)
    assert one.json()["id"] != two.json()["id"]


def test_malformed_ids_are_the_same_404_as_unknown_ones(client: TestClient) -> None:
    key = create_key(client, "acme")
    for method, url in [
        ("GET", "/v1/tasks/not-a-uuid"),
        ("GET", "/v1/tasks/123/predictions"),
        ("GET", "/v1/jobs/zzz"),
        ("DELETE", "/v1/tasks/%20"),
    ]:
        response = client.request(method, url, headers=key)
        assert response.status_code == 404, (method, url)
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["code"] == "not_found"
