"""app.jobs.reaper: lost messages re-sent once per lease, backlogs not multiplied, spent jobs failed."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta

from fastapi.testclient import TestClient
from sqlalchemy import update

from app.core.runtime import Runtime
from app.jobs.reaper import reap
from app.models import Job, Task, utcnow
from tests.helpers import runtime_of, support_files

Sent = list[tuple[uuid.UUID, str, str]]


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


def _reap(runtime: Runtime, backlog: int | None = None) -> list[uuid.UUID]:
    sent: Sent = []
    reap(runtime, lambda *job: sent.append(job), lambda _queue: backlog)
    return [job_id for job_id, _, _ in sent]


def test_a_queued_job_is_resent_once_its_period_has_passed(
    client: TestClient, auth: dict[str, str]
) -> None:
    runtime = runtime_of(client)
    job_id = _unsent_job(client, auth)
    period = runtime.settings.job_lease_seconds
    assert _reap(runtime) == []  # just sent: not lost yet
    _age(runtime, job_id, period + 1)
    sent: Sent = []
    assert reap(runtime, lambda *job: sent.append(job)) == 1
    assert sent == [(job_id, "adapt", "adapt")]
    assert _reap(runtime) == []  # sent_at was moved to now
    _set(runtime, job_id, sent_at=utcnow() - timedelta(seconds=period + 1))
    assert _reap(runtime) == [job_id]


def test_a_backlog_waiting_in_the_broker_is_not_sent_again(
    client: TestClient, auth: dict[str, str]
) -> None:
    runtime = runtime_of(client)
    jobs = [_unsent_job(client, auth) for _ in range(5)]
    for job_id in jobs:
        _age(runtime, job_id, runtime.settings.job_lease_seconds + 1)
    # All five messages are still in line: nothing is lost, nothing is sent.
    assert _reap(runtime, backlog=5) == []
    # The broker lost two of them (e.g. restarted without persistence): the two oldest go again.
    assert sorted(_reap(runtime, backlog=3)) == sorted(jobs[:2])


def test_running_jobs_are_resent_only_when_their_lease_ran_out(
    client: TestClient, auth: dict[str, str]
) -> None:
    runtime = runtime_of(client)
    job_id = _unsent_job(client, auth)
    old = utcnow() - timedelta(seconds=runtime.settings.job_lease_seconds + 1)
    _set(
        runtime,
        job_id,
        state="running",
        attempts=1,
        created_at=old,
        lease_expires_at=utcnow() + timedelta(60),
    )
    assert _reap(runtime, backlog=0) == []  # a live worker holds it
    _set(runtime, job_id, lease_expires_at=utcnow() - timedelta(seconds=1))
    assert _reap(runtime, backlog=0) == [job_id]


def test_a_spent_job_whose_worker_died_is_failed_not_left_running(
    client: TestClient, auth: dict[str, str]
) -> None:
    runtime = runtime_of(client)
    job_id = _unsent_job(client, auth)
    _set(
        runtime,
        job_id,
        state="running",
        attempts=3,
        max_attempts=3,
        lease_expires_at=utcnow() - timedelta(seconds=1),
    )
    assert _reap(runtime) == []
    with runtime.sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.state == "failed"
        assert job.error_code == "attempts_exhausted"
        task = session.get(Task, job.task_id)
        assert task is not None and task.status == "failed"


def test_finished_jobs_are_left_alone(client: TestClient, auth: dict[str, str]) -> None:
    runtime = runtime_of(client)
    done = _unsent_job(client, auth)
    _age(runtime, done, runtime.settings.job_lease_seconds + 1)
    _set(runtime, done, state="succeeded")
    assert _reap(runtime) == []


def test_concurrent_reapers_never_take_the_same_job(
    client: TestClient, auth: dict[str, str]
) -> None:
    runtime = runtime_of(client)
    jobs = [_unsent_job(client, auth) for _ in range(6)]
    for job_id in jobs:
        _age(runtime, job_id, runtime.settings.job_lease_seconds + 1)
    taken: list[uuid.UUID] = []
    barrier = threading.Barrier(4)

    def one_reaper() -> None:
        barrier.wait()
        taken.extend(_reap(runtime))

    threads = [threading.Thread(target=one_reaper) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(taken) == sorted(jobs)
