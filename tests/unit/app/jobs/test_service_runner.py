"""The job runner: claims, redelivery, leases, attempts and failures leave one consistent result."""

from __future__ import annotations

import os
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from app.adaptations import handler
from app.core import ml
from app.core.runtime import Runtime
from app.jobs import runner, state
from app.jobs.heartbeat import Heartbeat
from app.main import create_app
from app.models import AdaptedModel, Job, SupportExample, Task, utcnow
from tests.helpers import make_settings, query_files, runtime_of, support_files


def _queued_task(client: TestClient, auth: dict[str, str]) -> tuple[str, uuid.UUID]:
    """A task whose adapt job is committed but never sent anywhere."""
    client.app.state.dispatcher.submit = lambda *args: None  # type: ignore[attr-defined]
    files, data = support_files(["a", "b", "c"])
    body = client.post("/v1/tasks", headers=auth, files=files, data=data).json()
    return body["id"], uuid.UUID(body["job"]["id"])


def _job(runtime: Runtime, job_id: uuid.UUID) -> Job:
    with runtime.sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def _models(runtime: Runtime) -> int:
    with runtime.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(AdaptedModel)) or 0)


def test_running_the_adapt_job_twice_leaves_one_model(
    client: TestClient, auth: dict[str, str]
) -> None:
    runtime = runtime_of(client)
    _, job_id = _queued_task(client, auth)
    assert runner.run_job(runtime, job_id).status == "done"
    assert runner.run_job(runtime, job_id).status == "skipped"
    assert _models(runtime) == 1
    job = _job(runtime, job_id)
    assert job.state == "succeeded" and job.attempts == 1
    assert (
        len(list(runtime.store.root.rglob("*.safetensors"))) == 2
    )  # the initialization + one model


def test_the_celery_task_delivered_twice_leaves_one_model(
    client: TestClient, auth: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker import celery_tasks as tasks

    runtime = runtime_of(client)
    monkeypatch.setattr(tasks, "_runtime", runtime)
    monkeypatch.setattr(tasks, "_runtime_pid", os.getpid())
    _, job_id = _queued_task(client, auth)
    tasks.TASKS["adapt"].apply(args=[str(job_id)]).get()
    tasks.TASKS["adapt"].apply(args=[str(job_id)]).get()
    assert _models(runtime) == 1
    assert _job(runtime, job_id).attempts == 1


def test_an_expired_lease_is_reclaimed_and_still_gives_one_model(
    client: TestClient, auth: dict[str, str]
) -> None:
    runtime = runtime_of(client)
    _, job_id = _queued_task(client, auth)
    with runtime.sessions() as session:
        claim = state.claim(session, job_id, runtime.settings)
        assert isinstance(claim, state.Claim) and claim.attempt == 1
        # The first worker dies without finishing; its lease runs out.
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
        session.commit()
    assert runner.run_job(runtime, job_id).status == "done"
    assert _models(runtime) == 1
    job = _job(runtime, job_id)
    assert job.state == "succeeded" and job.attempts == 2
    # The dead worker's late finish cannot record a second model or flip the job back.
    late = handler.run_adapt(runtime, claim, Heartbeat(runtime, claim, stop=lambda: False))
    assert late.status == "skipped"
    assert _models(runtime) == 1


def test_a_redelivery_under_a_live_lease_is_dropped(
    client: TestClient, auth: dict[str, str]
) -> None:
    runtime = runtime_of(client)
    _, job_id = _queued_task(client, auth)
    with runtime.sessions() as session:
        assert isinstance(state.claim(session, job_id, runtime.settings), state.Claim)
    # No retry message: the reaper re-sends the job only if its holder stops renewing the lease.
    outcome = runner.run_job(runtime, job_id)
    assert outcome.status == "skipped" and outcome.retry_in is None
    assert _models(runtime) == 0
    job = _job(runtime, job_id)
    assert job.state == "running" and job.attempts == 1


def test_attempts_are_bounded(client: TestClient, auth: dict[str, str]) -> None:
    runtime = runtime_of(client)
    task_id, job_id = _queued_task(client, auth)
    with runtime.sessions() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(state="running", attempts=3, lease_expires_at=utcnow() - timedelta(seconds=1))
        )
        session.commit()
    assert runner.run_job(runtime, job_id).status == "failed"
    job = _job(runtime, job_id)
    assert job.state == "failed" and job.error_code == "attempts_exhausted"
    with runtime.sessions() as session:
        assert session.get(Task, uuid.UUID(task_id)).status == "failed"  # type: ignore[union-attr]


@pytest.mark.parametrize("stored", ["in_row", "in_file"])
def test_a_corrupt_image_fails_the_job_with_a_code(
    client: TestClient, auth: dict[str, str], stored: str
) -> None:
    runtime = runtime_of(client)
    if stored == "in_file":
        runtime.settings.support_inline_max_bytes = 0
    task_id, job_id = _queued_task(client, auth)
    with runtime.sessions() as session:
        example = session.scalars(select(SupportExample)).first()
        assert example is not None
        if stored == "in_file":
            assert example.data is None and example.image_key is not None
            runtime.store.path(example.image_key).write_bytes(b"tampered")
        else:
            assert example.image_key is None and example.data is not None
            example.data = b"tampered"
            session.commit()
    assert runner.run_job(runtime, job_id).status == "failed"
    task = client.get(f"/v1/tasks/{task_id}", headers=auth).json()
    assert task["status"] == "failed" and task["error"]["code"] == "artifact_corrupt"
    response = client.post(f"/v1/tasks/{task_id}/predictions", headers=auth, files=query_files(1))
    assert response.status_code == 409 and response.json()["code"] == "adaptation_failed"


def test_transient_errors_are_retried_then_fail(
    client: TestClient, auth: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("out of memory, say")

    monkeypatch.setattr(ml, "adapt_fast_with_embeddings", broken)
    runtime = runtime_of(client)
    _, job_id = _queued_task(client, auth)
    outcomes = [runner.run_job(runtime, job_id) for _ in range(3)]
    assert [o.status for o in outcomes] == ["retry", "retry", "failed"]
    job = _job(runtime, job_id)
    assert job.state == "failed" and job.attempts == 3 and job.error_code == "internal_error"
    # The error names the exception's type, never its text (which may hold internal details).
    assert "RuntimeError" in (job.error_message or "")
    assert "out of memory" not in (job.error_message or "")


def test_unfinished_jobs_resume_when_the_embedded_server_restarts(
    tmp_path: Path, tiny_init_dir: Path
) -> None:
    from tests.helpers import create_key

    settings = make_settings(tmp_path / "data", tiny_init_dir)
    with TestClient(create_app(settings)) as client:
        auth = create_key(client, "acme")
        task_id, _ = _queued_task(client, auth)
    with TestClient(create_app(settings)) as client:
        runtime = runtime_of(client)
        from app.jobs.service import wait_for_job

        with runtime.sessions() as session:
            job_id = session.scalar(select(Job.id))
        assert job_id is not None
        assert (
            wait_for_job(
                runtime=runtime, dispatcher=client.app.state.dispatcher, job_id=job_id, timeout=30
            )
            == "succeeded"
        )
        assert client.get(f"/v1/tasks/{task_id}", headers=auth).json()["status"] == "ready"
