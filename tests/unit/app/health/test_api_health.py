"""Health, readiness, metrics and the initializations list."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.helpers import create_ready_task, query_files


def test_healthz_and_readyz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {
        "database": True,
        "broker": True,
        "initialization": "tiny-test-1",
    }


def test_readyz_is_503_without_an_initialization(tmp_path, tiny_init_dir) -> None:  # type: ignore[no-untyped-def]
    from app.main import create_app
    from tests.helpers import make_settings

    settings = make_settings(tmp_path / "data", tmp_path / "nothing-here")
    with TestClient(create_app(settings)) as client:
        response = client.get("/readyz")
        assert response.status_code == 503
        assert response.json()["code"] == "not_ready"
        assert response.json()["checks"]["initialization"] is None


def test_initializations_list_the_active_version(client: TestClient, auth: dict[str, str]) -> None:
    listed = client.get("/v1/initializations", headers=auth).json()
    assert listed["active_version"] == "tiny-test-1"
    (item,) = listed["items"]
    assert item["is_active"] is True and item["source"] == "shipped"
    assert item["metrics"] == {"note": "random weights"}
    assert item["config"]["width"] == 16
    one = client.get("/v1/initializations/tiny-test-1", headers=auth).json()
    assert one["sha256"] == item["sha256"] and one["promoted_at"]


def test_metrics_expose_requests_jobs_compute_and_cache(
    client: TestClient, auth: dict[str, str]
) -> None:
    task = create_ready_task(client, auth, ["a", "b"])
    client.post(f"/v1/tasks/{task['id']}/predictions", headers=auth, files=query_files(2))
    client.post(f"/v1/tasks/{task['id']}/predictions", headers=auth, files=query_files(2))
    text = client.get("/metrics").text
    assert (
        'maml_serve_http_requests_total{method="POST",route="/v1/tasks/{task_id}/predictions",status="200"}'
        in text
    )
    for name in (
        "maml_serve_http_request_duration_seconds_bucket",
        "maml_serve_job_queue_seconds_bucket",
        "maml_serve_job_duration_seconds_bucket",
        "maml_serve_adaptation_compute_seconds_bucket",
        "maml_serve_prediction_compute_seconds_bucket",
        'maml_serve_model_cache_hits_total{cache="adapted"}',
    ):
        assert name in text, name


def test_openapi_documents_both_body_types(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    content = spec["paths"]["/v1/tasks"]["post"]["requestBody"]["content"]
    assert set(content) == {"multipart/form-data", "application/json"}
    assert client.get("/docs").status_code == 200


def test_a_new_shipped_version_is_registered_but_not_activated_on_restart(
    tmp_path,
    tiny_init_dir,  # type: ignore[no-untyped-def]
) -> None:
    import fewshot
    from app.main import create_app
    from tests.helpers import create_key, make_settings

    data = tmp_path / "data"
    with TestClient(create_app(make_settings(data, tiny_init_dir))) as client:
        admin = create_key(client, "ops", admin=True)
    newer = fewshot.Initialization.load(tiny_init_dir)
    newer.metadata["version"] = "tiny-test-2"
    newer.save(tmp_path / "newer")
    for _ in range(2):  # a second restart registers nothing more
        with TestClient(create_app(make_settings(data, tmp_path / "newer"))) as client:
            listed = client.get("/v1/initializations", headers=admin).json()
            assert listed["active_version"] == "tiny-test-1"
            assert sorted(i["version"] for i in listed["items"]) == ["tiny-test-1", "tiny-test-2"]
    with TestClient(create_app(make_settings(data, tmp_path / "newer"))) as client:
        promoted = client.post("/v1/admin/initializations/tiny-test-2/promote", headers=admin)
        assert promoted.json()["active_version"] == "tiny-test-2"
