"""Reading jobs, waiting on them, and sending them once their rows are committed."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.core.errors import NotFound, ServiceUnavailable
from app.core.runtime import Runtime
from app.core.schemas import ErrorInfo
from app.jobs.dispatch import Dispatcher
from app.jobs.schemas import JobPublic
from app.models import Job

log = logging.getLogger(__name__)


def latest_job(*, session: Session, task_id: uuid.UUID) -> Job | None:
    """The task's newest adapt job."""
    return session.scalar(
        select(Job)
        .where(Job.task_id == task_id)
        .order_by(Job.created_at.desc(), Job.id.desc())
        .limit(1)
    )


def find_idempotent_job(*, session: Session, tenant_id: uuid.UUID, key: str) -> Job | None:
    """The job an earlier request with the same Idempotency-Key created."""
    return session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key))


def get_job(*, session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID) -> Job:
    """The tenant's job, or 404."""
    job = session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id))
    if job is None:
        raise NotFound(f"no job {job_id}")
    return job


# How often a waiter re-reads a job whose end is pushed to it anyway (in-process runs, Redis
# notices): only a safety net for a lost notice or a change nobody announces (the task deleted
# meanwhile). The interval doubles up to the cap: 32 waiters of multi-second jobs re-reading
# every 0.25 s spent a quarter of an API process on those reads.
PUSHED_RECHECK_SECONDS = 0.25
PUSHED_RECHECK_MAX_SECONDS = 2.0


def wait_for_job(
    *,
    runtime: Runtime,
    dispatcher: Dispatcher,
    job_id: uuid.UUID,
    timeout: float,
) -> str:
    """Re-read the job row until it ends or `timeout` seconds pass; returns its last state.

    In-process jobs and Redis notices wake the waiter when a run ends, and say the state a job
    ended in (committed before): then the row is not read at all. Without notices the row is
    polled with a growing delay.
    """
    deadline = time.monotonic() + timeout
    delay = 0.002
    recheck = PUSHED_RECHECK_SECONDS
    with dispatcher.watch(job_id) as watch:
        while True:
            if watch.ended is not None:
                return watch.ended
            state = _job_state(runtime, job_id)
            remaining = deadline - time.monotonic()
            if state not in ("queued", "running") or remaining <= 0:
                return state
            if watch.pushed:
                watch.wait(min(recheck, remaining))
                recheck = min(recheck * 2, PUSHED_RECHECK_MAX_SECONDS)
            else:
                watch.wait(min(delay, remaining))
                delay = min(delay * 1.5, 0.1)


def _job_state(runtime: Runtime, job_id: uuid.UUID) -> str:
    with runtime.sessions() as session:
        return session.scalar(select(Job.state).where(Job.id == job_id)) or "missing"


async def wait_for_job_async(
    *,
    runtime: Runtime,
    dispatcher: Dispatcher,
    job_id: uuid.UUID,
    timeout: float,
    sent_now: bool = False,
) -> str:
    """wait_for_job for the event loop: sleeps with asyncio, holding no thread or connection.

    Each read of the job row is a short session on the thread pool; between reads the waiter
    sleeps on the loop, woken by the end's announcement (in-process or a Redis notice, which
    gives the state: no read) or a growing delay (no notices). `sent_now`: the caller
    committed and sent the job just now, so it is not read on entry either (an end announced
    before the watch was taken is remembered by the watches; a lost notice costs the safety
    re-read).
    """
    deadline = time.monotonic() + timeout
    delay = 0.002
    recheck = PUSHED_RECHECK_SECONDS
    with dispatcher.watch(job_id) as watch:
        skip_read = sent_now and watch.pushed
        while True:
            if watch.ended is not None:
                return watch.ended
            if skip_read:
                skip_read = False
                state = "queued"
            else:
                state = await run_in_threadpool(_job_state, runtime, job_id)
            remaining = deadline - time.monotonic()
            if state not in ("queued", "running") or remaining <= 0:
                return state
            if watch.pushed:
                await watch.wait_async(min(recheck, remaining))
                recheck = min(recheck * 2, PUSHED_RECHECK_MAX_SECONDS)
            else:
                await asyncio.sleep(min(delay, remaining))
                delay = min(delay * 1.5, 0.1)


def job_public(job: Job) -> JobPublic:
    """A job with links to what it is about and what it produced."""
    links = {"self": f"/v1/jobs/{job.id}"}
    if job.task_id is not None:
        links["task"] = f"/v1/tasks/{job.task_id}"
    if job.result and "adapted_model_id" in job.result and job.task_id is not None:
        links["predictions"] = f"/v1/tasks/{job.task_id}/predictions"
    error = (
        ErrorInfo(code=job.error_code, message=job.error_message or "") if job.error_code else None
    )
    return JobPublic(
        id=job.id,
        kind=job.kind,
        state=job.state,  # type: ignore[arg-type]
        progress=job.progress,
        progress_detail=dict(job.progress_detail or {}),
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        error=error,
        result=job.result,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        updated_at=job.updated_at,
        links=links,
    )


def send(dispatcher: Dispatcher, job: Job, *, discard: Callable[[], None]) -> None:
    """Publish a committed job; if the broker refuses, `discard` its rows and files and answer 503.

    The request that made the job is then rejected as a whole, so its Idempotency-Key may be
    used again and nothing is left behind.
    """
    job_id, kind, queue = job.id, job.kind, job.queue
    try:
        dispatcher.submit(job_id, kind, queue)
    except Exception as exc:
        log.warning("could not enqueue job %s (%s); the request is withdrawn", job_id,
                    type(exc).__name__)  # fmt: skip
        discard()
        raise ServiceUnavailable(
            "the job queue is unreachable; nothing was recorded, try again shortly",
            code="broker_unavailable",
        ) from None
