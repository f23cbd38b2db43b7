"""A job that finds the artifact store unavailable waits for it, holding its claim, bounded."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.core.errors import StorageUnavailable
from app.core.runtime import Runtime
from app.jobs import clock, runner
from app.models import AdaptedModel, Job
from tests.helpers import runtime_of, support_files


def _queued_task(client: TestClient, auth: dict[str, str], seed: int = 0) -> uuid.UUID:
    """The job of a task that is committed but never sent anywhere."""
    client.app.state.dispatcher.submit = lambda *args: None  # type: ignore[attr-defined]
    files, data = support_files(["a", "b"], seed=seed)
    body = client.post("/v1/tasks", headers=auth, files=files, data=data).json()
    return uuid.UUID(body["job"]["id"])


def _job(runtime: Runtime, job_id: uuid.UUID) -> Job:
    with runtime.sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def _models(runtime: Runtime, job_id: uuid.UUID) -> int:
    with runtime.sessions() as session:
        return int(session.scalar(select(func.count()).where(AdaptedModel.job_id == job_id)) or 0)


def _store_down_for(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, failures: int | None
) -> list[Job | None]:
    """Weights PUTs fail `failures` times (None: always); each failure after the first records
    the job's row as the retried run found it."""
    real = runtime.store.put_bytes
    seen: list[Job | None] = []

    def flaky(key: str, data: bytes) -> str:
        if failures is None or len(seen) < failures:
            job_id = uuid.UUID(key.rsplit("/", 1)[1].split(".")[0])
            seen.append(_job(runtime, job_id) if seen else None)
            raise StorageUnavailable()
        return real(key, data)

    monkeypatch.setattr(runtime.store, "put_bytes", flaky)
    return seen


@pytest.fixture(autouse=True)
def _quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "STORAGE_BACKOFF", (0.05, 0.1))


def test_a_job_waits_for_the_store_holding_its_claim_and_its_attempt(
    client: TestClient, auth: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = runtime_of(client)
    job_id = _queued_task(client, auth)
    seen = _store_down_for(runtime, monkeypatch, failures=3)
    assert runner.run_job(runtime, job_id).status == "done"
    job = _job(runtime, job_id)
    assert job.state == "succeeded" and job.attempts == 1 and _models(runtime, job_id) == 1
    assert job.progress_detail == {"stage": "done"}
    # Between runs the job stayed claimed by this worker and said why it waited.
    assert len(seen) == 3
    for waiting in seen[1:]:
        assert waiting is not None and waiting.state == "running" and waiting.attempts == 1
        assert waiting.progress_detail["stage"] == runner.WAITING_FOR_STORAGE
        assert waiting.progress_detail["storage"]["waits"] >= 1
        assert waiting.lease_expires_at is not None


def test_the_wait_is_bounded_then_the_attempts_fail_with_a_code(
    client: TestClient, auth: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = runtime_of(client)
    runtime.settings.storage_wait_seconds = 0.2
    job_id = _queued_task(client, auth)
    _store_down_for(runtime, monkeypatch, failures=None)
    outcomes = [runner.run_job(runtime, job_id) for _ in range(runtime.settings.job_max_attempts)]
    assert [o.status for o in outcomes] == ["retry", "retry", "failed"]
    job = _job(runtime, job_id)
    assert job.state == "failed" and job.error_code == "storage_unavailable"
    assert job.attempts == runtime.settings.job_max_attempts and _models(runtime, job_id) == 0


def test_a_shutdown_while_waiting_hands_the_job_back(
    client: TestClient, auth: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = runtime_of(client)
    job_id = _queued_task(client, auth)
    real_pause = runner._pause

    def stop_then_pause(*args: Any) -> Any:
        runner.request_stop(runtime)
        return real_pause(*args)

    monkeypatch.setattr(runner, "_pause", stop_then_pause)
    _store_down_for(runtime, monkeypatch, failures=None)
    try:
        assert runner.run_job(runtime, job_id).status == "handed_back"
    finally:
        runner.clear_stop(runtime)
    job = _job(runtime, job_id)
    assert job.state == "queued" and job.attempts == 0


def test_jobs_of_a_batch_wait_each_on_their_own(
    client: TestClient, auth: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = runtime_of(client)
    jobs = [_queued_task(client, auth, seed=seed) for seed in range(3)]
    _store_down_for(runtime, monkeypatch, failures=4)
    assert runner.run_job(runtime, jobs[0]).status == "done"
    for job_id in jobs:
        job = _job(runtime, job_id)
        assert job.state == "succeeded" and job.attempts == 1, job_id
        assert _models(runtime, job_id) == 1


class _FakePostgres:
    """A session on a PostgreSQL server whose clock reads `at()`; counts the readings."""

    def __init__(self, at: Callable[[], datetime]) -> None:
        self.at = at
        self.readings = 0
        self.dialect = type("Dialect", (), {"name": "postgresql"})()
        self.engine = self

    def get_bind(self) -> Any:
        return self

    def execute(self, statement: Any) -> Any:
        self.readings += 1
        value = self.at()
        return type("Result", (), {"scalar_one": lambda _self: value})()


def test_leases_are_on_the_database_clock_read_once_a_minute(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ahead = timedelta(minutes=5)
    server = _FakePostgres(lambda: datetime.now(UTC) + ahead)
    ticks = [1000.0]
    monkeypatch.setattr(clock, "monotonic", lambda: ticks[0])
    clock.forget()
    try:
        first = clock.now(server)  # type: ignore[arg-type]
        assert abs((first - datetime.now(UTC)) - ahead) < timedelta(seconds=1)
        ticks[0] += 30
        # Carried forward on the monotonic clock, not read again.
        assert clock.now(server) - first == timedelta(seconds=30)  # type: ignore[arg-type]
        assert server.readings == 1
        ticks[0] += clock.REFRESH_SECONDS
        clock.now(server)  # type: ignore[arg-type]
        assert server.readings == 2
    finally:
        clock.forget()


def test_an_embedded_database_uses_this_hosts_clock(client: TestClient) -> None:
    with runtime_of(client).sessions() as session:
        assert abs(clock.now(session) - datetime.now(UTC)) < timedelta(seconds=1)
