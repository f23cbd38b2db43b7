"""Past the adaptation backlog bounds, POST /v1/tasks is answered 429/503 with Retry-After at once."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.jobs import runner
from app.main import create_app
from app.models import Job, Task
from tests.helpers import create_key, make_settings, runtime_of, support_files


@contextmanager
def bounded_client(data_dir: Path, init_dir: Path, **settings: Any) -> Iterator[TestClient]:
    """An app whose jobs are never sent (they wait), with small backlog bounds."""
    app_settings = make_settings(
        data_dir,
        init_dir,
        max_queued_adaptations_per_tenant=2,
        max_queued_adaptations=3,
        retry_after_seconds=4,
        **settings,
    )
    with TestClient(create_app(app_settings)) as client:
        client.app.state.dispatcher.submit = lambda *args: None  # type: ignore[attr-defined]
        yield client


@pytest.fixture
def bounded(tmp_path: Path, tiny_init_dir: Path) -> Iterator[TestClient]:
    """An embedded app (SQLite) with small backlog bounds whose jobs wait."""
    with bounded_client(tmp_path / "data", tiny_init_dir) as client:
        yield client


def _post(client: TestClient, auth: dict[str, str], seed: int) -> tuple[int, dict[str, str], float]:
    files, data = support_files(["a", "b"], seed=seed)
    started = time.perf_counter()
    response = client.post("/v1/tasks", headers=auth, files=files, data=data)
    return response.status_code, dict(response.headers), time.perf_counter() - started


def _tasks(client: TestClient) -> int:
    with runtime_of(client).sessions() as session:
        return int(session.scalar(select(func.count()).select_from(Task)) or 0)


def test_tenant_and_service_bounds_refuse_new_work_and_accepted_jobs_finish(
    bounded: TestClient,
) -> None:
    check_bounds(bounded)


def check_bounds(bounded: TestClient) -> None:
    """Two tenants fill the bounds (2 each, 3 in all): 429, then 503; the rest still runs."""
    acme, beta = create_key(bounded, "acme"), create_key(bounded, "beta")
    assert [_post(bounded, acme, seed)[0] for seed in (1, 2)] == [202, 202]
    status, headers, _ = _post(bounded, acme, 3)
    assert status == 429 and headers["retry-after"] == "4"
    assert headers["content-type"].startswith("application/problem+json")
    assert _post(bounded, beta, 4)[0] == 202
    status, headers, seconds = _post(bounded, beta, 5)
    assert status == 503 and headers["retry-after"] == "4"
    assert seconds < 1.0
    assert _tasks(bounded) == 3  # nothing of a refused request was stored

    runtime = runtime_of(bounded)
    with runtime.sessions() as session:
        queued = list(session.scalars(select(Job.id).where(Job.state == "queued")))
    for job_id in queued:
        runner.run_job(runtime, uuid.UUID(str(job_id)))
    with runtime.sessions() as session:
        states = list(session.scalars(select(Job.state)))
    assert states == ["succeeded"] * 3
    assert _post(bounded, acme, 6)[0] == 202
