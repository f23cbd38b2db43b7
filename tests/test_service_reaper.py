"""worker.reaper: jobs whose message was lost are sent again, once per period, never twice at once."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta

from fastapi.testclient import TestClient
from sqlalchemy import update

from app.models import Job, utcnow
from app.runtime import Runtime
from tests.helpers import runtime_of, support_files
from worker.reaper import resend_stale_jobs, take_stale_jobs


def _unsent_job(client: TestClient, auth: dict[str, str]) -> uuid.UUID:
    """An adapt job committed as queued whose message never reached any worker."""
    client.app.state.dispatcher.submit = lambda *args: None  # type: ignore[attr-defined]
    files, data = support_files(["a", "b"])
    body = client.post("/v1/tasks", headers=auth, files=files, data=data).json()
    return uuid.UUID(body["job"]["id"])


def _set(runtime: Runtime, job_id: uuid.UUID, **values: object) -> None:
    with runtime.sessions() as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))
        session.commit()


def _age(runtime: Runtime, job_id: uuid.UUID, seconds: float) -> None:
    """Pretend the job was created (and last sent) `seconds` ago."""
    _set(runtime, job_id, created_at=utcnow() - timedelta(seconds=seconds))


def test_a_queued_job_is_resent_once_its_period_has_passed(
    client: TestClient, auth: dict[str, str]
) -> None:
    runtime = runtime_of(client)
    job_id = _unsent_job(client, auth)
    period = runtime.settings.job_lease_seconds
    assert take_stale_jobs(runtime) == []  # just sent: not lost yet
    _age(runtime, job_id, period + 1)
    sent: list[tuple[uuid.UUID, str, str]] = []
    assert resend_stale_jobs(runtime, lambda *job: sent.append(job)) == 1
    assert sent == [(job_id, "adapt", "adapt")]
    assert take_stale_jobs(runtime) == []  # sent_at was moved to now
    _set(runtime, job_id, sent_at=utcnow() - timedelta(seconds=period + 1))
    assert [j for j, _, _ in take_stale_jobs(runtime)] == [job_id]


def test_running_jobs_are_resent_only_when_their_lease_ran_out(
    client: TestClient, auth: dict[str, str]
) -> None:
    runtime = runtime_of(client)
    job_id = _unsent_job(client, auth)
    old = utcnow() - timedelta(seconds=runtime.settings.job_lease_seconds + 1)
    _set(
        runtime, job_id, state="running", created_at=old, lease_expires_at=utcnow() + timedelta(60)
    )
    assert take_stale_jobs(runtime) == []  # a live worker holds it
    _set(runtime, job_id, lease_expires_at=utcnow() - timedelta(seconds=1))
    assert [j for j, _, _ in take_stale_jobs(runtime)] == [job_id]


def test_finished_and_exhausted_jobs_are_left_alone(
    client: TestClient, auth: dict[str, str]
) -> None:
    runtime = runtime_of(client)
    done, exhausted = _unsent_job(client, auth), _unsent_job(client, auth)
    for job_id in (done, exhausted):
        _age(runtime, job_id, runtime.settings.job_lease_seconds + 1)
    _set(runtime, done, state="succeeded")
    _set(runtime, exhausted, attempts=3, max_attempts=3)
    assert take_stale_jobs(runtime) == []


def test_concurrent_reapers_never_take_the_same_job(
    client: TestClient, auth: dict[str, str]
) -> None:
    runtime = runtime_of(client)
    jobs = [_unsent_job(client, auth) for _ in range(6)]
    for job_id in jobs:
        _age(runtime, job_id, runtime.settings.job_lease_seconds + 1)
    taken: list[uuid.UUID] = []
    barrier = threading.Barrier(4)

    def reap() -> None:
        barrier.wait()
        taken.extend(j for j, _, _ in take_stale_jobs(runtime))

    threads = [threading.Thread(target=reap) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(taken) == sorted(jobs)
