"""GET /v1/jobs/{id}?wait (held without a thread, bounded by the settings) and the optional body
of POST /v1/admin/datasets/omniglot."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.jobs import runner
from app.main import create_app
from tests.admin_data import dataset_zip
from tests.helpers import create_key, make_settings, support_files


def _gate_jobs(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Jobs start only once the returned event is set (or after 20 s)."""
    gate = threading.Event()
    run_job = runner.run_job

    def gated(*args: Any, **kwargs: Any) -> Any:
        gate.wait(20)
        return run_job(*args, **kwargs)

    monkeypatch.setattr(runner, "run_job", gated)
    return gate


def _start_task(client: TestClient, headers: dict[str, str], seed: int = 0) -> str:
    files, data = support_files(["a", "b"], seed=seed)
    response = client.post("/v1/tasks", headers=headers, files=files, data=data)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["job"]["id"]
    return job_id


def test_job_wait_answers_once_the_job_ends_and_holds_no_thread(
    tmp_path: Path, tiny_init_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = _gate_jobs(monkeypatch)
    # Two threads for sync routes and dependencies: three waiters holding one each would starve
    # the listing below until their jobs end.
    settings = make_settings(tmp_path / "data", tiny_init_dir, api_threads=2)
    with TestClient(create_app(settings)) as client:
        auth = create_key(client, "acme")
        job_ids = [_start_task(client, auth, seed) for seed in range(3)]
        assert client.get(f"/v1/jobs/{job_ids[0]}", headers=auth).json()["state"] in (
            "queued",
            "running",
        )
        answers: dict[str, dict[str, Any]] = {}

        def wait(job_id: str) -> None:
            response = client.get(f"/v1/jobs/{job_id}", headers=auth, params={"wait": 30})
            assert response.status_code == 200, response.text
            answers[job_id] = response.json()

        waiters = [threading.Thread(target=wait, args=(job_id,)) for job_id in job_ids]
        for waiter in waiters:
            waiter.start()
        time.sleep(0.3)
        started = time.monotonic()
        listed = client.get("/v1/tasks", headers=auth)
        listing_took = time.monotonic() - started
        gate.set()
        for waiter in waiters:
            waiter.join(30)
        assert listed.status_code == 200
        # Held threads would keep it waiting until the gate opens (20 s).
        assert listing_took < 5.0, listing_took
        assert {job_id: body["state"] for job_id, body in answers.items()} == dict.fromkeys(
            job_ids, "succeeded"
        )
        assert all(body["finished_at"] is not None for body in answers.values())


def test_job_wait_is_bounded_by_max_wait_seconds_and_404s_like_a_plain_read(
    tmp_path: Path, tiny_init_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = _gate_jobs(monkeypatch)
    settings = make_settings(tmp_path / "data", tiny_init_dir, max_wait_seconds=0.5)
    with TestClient(create_app(settings)) as client:
        auth = create_key(client, "acme")
        job_id = _start_task(client, auth)
        started = time.monotonic()
        response = client.get(f"/v1/jobs/{job_id}?wait=30", headers=auth)
        took = time.monotonic() - started
        assert response.status_code == 200 and response.json()["state"] in ("queued", "running")
        assert 0.4 <= took < 2.0, took
        other = create_key(client, "other")
        hidden = client.get(f"/v1/jobs/{job_id}?wait=5", headers=other)
        assert hidden.status_code == 404 and hidden.json()["code"] == "not_found"
        negative = client.get(f"/v1/jobs/{job_id}?wait=-1", headers=auth)
        assert negative.status_code == 422
        gate.set()


def test_omniglot_registers_without_a_body(tmp_path: Path, tiny_init_dir: Path) -> None:
    source = tmp_path / "background.zip"
    source.write_bytes(dataset_zip(groups=3, classes=8))
    settings = make_settings(tmp_path / "data", tiny_init_dir, omniglot_path=source)
    with TestClient(create_app(settings)) as client:
        admin = create_key(client, "acme", admin=True)
        response = client.post("/v1/admin/datasets/omniglot", headers=admin)
        assert response.status_code == 201, response.text
        assert response.json()["name"] == "omniglot-background"
        named = client.post("/v1/admin/datasets/omniglot", headers=admin, json={"name": "omni-2"})
        assert named.status_code == 201 and named.json()["name"] == "omni-2"
        sneaky = client.post("/v1/admin/datasets/omniglot", headers=admin, json={"path": "/etc"})
        assert sneaky.status_code == 422
