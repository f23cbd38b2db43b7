"""The one job state machine: every change of a job's state is a function of this module.

    queued --claim--> running --finish--> succeeded
      ^                  |  \\--fail----> failed      (error, or attempts spent)
      |                  |   \\-cancel--> cancelled
      +--hand_back/release+
    queued --cancel--> cancelled

Each transition is one conditional UPDATE. A claim counts an attempt and takes a lease; every
later transition of that run names the attempt it claimed with (the fence), so a worker that
was presumed dead and replaced can no longer change the job. A task's status follows from its
jobs in `sync_task_status`, called by the transitions that end an adapt job. Every time a
transition writes or compares (leases above all) is the database's (app.jobs.clock), never the
worker's own clock, which may be minutes off.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, cast

from sqlalchemy import (
    CursorResult,
    Result,
    Uuid,
    and_,
    bindparam,
    case,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session

from app.core import metrics
from app.core.config import Settings
from app.jobs import clock
from app.jobs.kinds import KINDS, kind_of
from app.models import AdaptedModel, Job, Task, UTCDateTime

log = logging.getLogger(__name__)

TERMINAL_STATES = ("succeeded", "failed", "cancelled")
ACTIVE_STATES = ("queued", "running")


@dataclass(frozen=True)
class Outcome:
    """What one delivery of a job did; `retry_in` asks the caller to deliver it again later."""

    status: Literal["done", "skipped", "failed", "retry", "handed_back"]
    retry_in: float | None = None


@dataclass(frozen=True)
class Claim:
    """A job this worker holds: its id, kind and the attempt number it claimed it with."""

    job_id: uuid.UUID
    kind: str
    attempt: int
    worker: str


def worker_name() -> str:
    """host:pid:thread, recorded on the job a worker claims."""
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def _rowcount(result: Result[Any]) -> int:
    return cast(CursorResult[Any], result).rowcount


def _fenced(claim: Claim) -> tuple[Any, ...]:
    return (Job.id == claim.job_id, Job.state == "running", Job.attempts == claim.attempt)


def lease_seconds(settings: Settings, kind: str) -> float:
    """The lease of a kind of job (the adapt lease for a kind this version does not know)."""
    known = kind_of(kind)
    return known.lease_seconds(settings) if known else settings.job_lease_seconds


# --- creation ---------------------------------------------------------------------------------


def new_job(*, kind: str, settings: Settings, **fields: Any) -> Job:
    """A queued job row of a known kind on its queue (the caller adds and commits it)."""
    return Job(
        kind=kind,
        queue=KINDS[kind].queue,
        state="queued",
        max_attempts=settings.job_max_attempts,
        **fields,
    )


# --- a worker's run ---------------------------------------------------------------------------


def claim(session: Session, job_id: uuid.UUID, settings: Settings) -> Claim | Outcome:
    """Take a queued job, or a running one whose lease ran out; counts an attempt, commits.

    A job held by a live worker is left alone (the reaper re-sends it if that worker dies); a
    job whose attempts are spent is failed. The common case is one UPDATE ... RETURNING.
    """
    now = clock.now(session)
    worker = worker_name()
    leases = {
        f"lease_{kind.name}": now + timedelta(seconds=kind.lease_seconds(settings))
        for kind in KINDS.values()
    }
    row = session.execute(
        _claim_statement(),
        {
            "job_id": job_id,
            "now": now,
            "worker": worker,
            "lease_default": now + timedelta(seconds=settings.job_lease_seconds),
            **leases,
        },
    ).one_or_none()
    session.commit()
    if row is not None:
        metrics.JOB_ATTEMPTS.labels(row.kind).inc()
        if row.attempts == 1:
            metrics.JOB_QUEUE_TIME.labels(row.kind).observe((now - row.created_at).total_seconds())
        return Claim(job_id=job_id, kind=row.kind, attempt=row.attempts, worker=worker)
    job = session.get(Job, job_id)
    if job is None:
        log.info("job %s no longer exists; nothing to do", job_id)
        return Outcome("skipped")
    if job.state in TERMINAL_STATES:
        log.info("job %s is already %s; delivery ignored", job_id, job.state)
        return Outcome("skipped")
    if job.state == "running" and job.lease_expires_at is not None and job.lease_expires_at >= now:
        log.info("job %s is held by %s; duplicate delivery ignored", job_id, job.claimed_by)
        return Outcome("skipped")
    fail_exhausted(session, job_id)
    return Outcome("failed")


@functools.cache
def _claim_statement() -> Any:
    # Built once, every value a parameter: building this UPDATE and its CASE per job cost more
    # CPU than running it. The lease ends by the job's kind (one SQL CASE over the kinds).
    now = bindparam("now", type_=UTCDateTime())
    lease_end = case(
        *[(Job.kind == name, bindparam(f"lease_{name}", type_=UTCDateTime())) for name in KINDS],
        else_=bindparam("lease_default", type_=UTCDateTime()),
    )
    return (
        update(Job)
        .where(
            Job.id == bindparam("job_id"),
            Job.attempts < Job.max_attempts,
            or_(Job.state == "queued", and_(Job.state == "running", Job.lease_expires_at < now)),
        )
        .values(
            state="running",
            attempts=Job.attempts + 1,
            lease_expires_at=lease_end,
            claimed_by=bindparam("worker"),
            started_at=func.coalesce(Job.started_at, now),
            updated_at=now,
        )
        .returning(Job.kind, Job.attempts, Job.created_at)
        .execution_options(synchronize_session=False)
    )


def claim_queued(
    session: Session, job_ids: list[uuid.UUID], kind: str, settings: Settings
) -> list[Claim]:
    """Claim those of `job_ids` that are still queued, with one conditional UPDATE; commits.

    The same transition as `claim` for a queued job (an attempt counted, a lease taken), for a
    worker that takes several waiting jobs into one batch; jobs another worker claimed first,
    or that ended, are left out.
    """
    if not job_ids:
        return []
    now = clock.now(session)
    now_param = bindparam("now", now, type_=UTCDateTime())
    worker = worker_name()
    rows = session.execute(
        update(Job)
        .where(
            Job.id.in_(job_ids),
            Job.kind == kind,
            Job.state == "queued",
            Job.attempts < Job.max_attempts,
        )
        .values(
            state="running",
            attempts=Job.attempts + 1,
            lease_expires_at=now + timedelta(seconds=lease_seconds(settings, kind)),
            claimed_by=worker,
            started_at=func.coalesce(Job.started_at, now_param),
            updated_at=now,
        )
        .returning(Job.id, Job.attempts, Job.created_at)
        .execution_options(synchronize_session=False)
    ).all()
    session.commit()
    claims = []
    for job_id, attempts, created_at in rows:
        if attempts == 1:
            metrics.JOB_QUEUE_TIME.labels(kind).observe((now - created_at).total_seconds())
        claims.append(Claim(job_id=job_id, kind=kind, attempt=attempts, worker=worker))
    return claims


def renew(session: Session, claim: Claim, settings: Settings, **values: Any) -> bool:
    """Extend the lease (and write progress values); False once another attempt took over."""
    now = clock.now(session)
    lease = lease_seconds(settings, claim.kind)
    result = session.execute(
        update(Job)
        .where(*_fenced(claim))
        .values(lease_expires_at=now + timedelta(seconds=lease), updated_at=now, **values)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return _rowcount(result) == 1


def cancel_requested(session: Session, job_id: uuid.UUID) -> bool:
    """True once someone asked to cancel the job."""
    return session.scalar(select(Job.cancel_requested_at).where(Job.id == job_id)) is not None


def hand_back(session: Session, claim: Claim) -> bool:
    """Return a claimed job to the queue without spending its attempt (a clean shutdown)."""
    result = session.execute(
        update(Job)
        .where(*_fenced(claim))
        .values(
            state="queued",
            attempts=Job.attempts - 1,
            lease_expires_at=None,
            claimed_by=None,
            updated_at=clock.now(session),
        )
        .execution_options(synchronize_session=False)
    )
    session.commit()
    metrics.JOB_HAND_BACKS.labels(claim.kind).inc()
    return _rowcount(result) == 1


def release(session: Session, claim: Claim) -> bool:
    """Return a claimed job to the queue after a transient failure (the attempt stays spent)."""
    result = session.execute(
        update(Job)
        .where(*_fenced(claim))
        .values(
            state="queued", lease_expires_at=None, claimed_by=None, updated_at=clock.now(session)
        )
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return _rowcount(result) == 1


EndListener = Callable[[uuid.UUID, str], None]
# Told after the commit that ends a job (e.g. app.jobs.notices publishes it to waiting requests).
_end_listeners: list[EndListener] = []


def add_end_listener(listener: EndListener) -> None:
    """Call `listener(job_id, state)` after each commit that ends a job in this process."""
    _end_listeners.append(listener)


def remove_end_listener(listener: EndListener) -> None:
    """Stop calling a listener added with add_end_listener."""
    if listener in _end_listeners:
        _end_listeners.remove(listener)


def _announce_end(job_id: uuid.UUID, state: str) -> None:
    for listener in list(_end_listeners):
        try:
            listener(job_id, state)
        except Exception:
            log.exception("job-end listener failed for job %s", job_id)


def _end(session: Session, job_id: uuid.UUID, where: list[Any], state: str, **values: Any) -> bool:
    """Move a job matching `where` to a terminal state, and commit; False when none matched.

    Rows the caller added to the transaction are committed with the change, or rolled back
    when it is refused.
    """
    now = clock.now(session)
    # RETURNING gives what the task's status and the metrics need without another query.
    ended = session.execute(
        update(Job)
        .where(Job.id == job_id, *where)
        .values(state=state, finished_at=now, lease_expires_at=None, updated_at=now, **values)
        .returning(Job.kind, Job.task_id, Job.started_at)
        .execution_options(synchronize_session=False)
    ).one_or_none()
    if ended is None:
        session.rollback()
        return False
    _after_end(session, state, ended.kind, ended.task_id, ended.started_at)
    session.commit()
    _announce_end(job_id, state)
    return True


def finish(session: Session, claim: Claim, *, result: dict[str, Any], **values: Any) -> bool:
    """Mark the claimed run succeeded, with what the caller added to the transaction."""
    return _end(
        session, claim.job_id, list(_fenced(claim)), "succeeded", progress=1.0, result=result,
        **values,
    )  # fmt: skip


def fail(
    session: Session, job_id: uuid.UUID, *, attempt: int | None, code: str, message: str
) -> bool:
    """Mark a job failed (fenced by `attempt` when given), and commit."""
    where: list[Any] = [Job.state.in_(ACTIVE_STATES)]
    if attempt is not None:
        where.append(Job.attempts == attempt)
    return _end(session, job_id, where, "failed", error_code=code, error_message=message[:2000])


def fail_exhausted(session: Session, job_id: uuid.UUID) -> bool:
    """Fail a running job whose lease ran out with no attempt left."""
    where = [
        Job.state == "running",
        Job.attempts >= Job.max_attempts,
        Job.lease_expires_at < clock.now(session),
    ]
    return _end(
        session,
        job_id,
        where,
        "failed",
        error_code="attempts_exhausted",
        error_message=(
            "gave up after every attempt ended without finishing (each worker stopped or "
            "lost its lease)"
        ),
    )


def end_fenced(session: Session, claim: Claim, state: str, **values: Any) -> bool:
    """End the claimed run in `state` (e.g. cancelled at a worker's checkpoint), and commit."""
    return _end(session, claim.job_id, list(_fenced(claim)), state, **values)


def cancel(session: Session, job: Job) -> bool:
    """Cancel a queued job now, or ask the worker of a running one to stop; False if it ended."""
    now = clock.now(session)
    session.execute(
        update(Job)
        .where(Job.id == job.id, Job.state.in_(ACTIVE_STATES), Job.cancel_requested_at.is_(None))
        .values(cancel_requested_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    stopped = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.state == "queued")
        .values(
            state="cancelled",
            finished_at=now,
            progress_detail={**(job.progress_detail or {}), "stage": "cancelled"},
            updated_at=now,
        )
        .returning(Job.kind, Job.task_id, Job.started_at)
        .execution_options(synchronize_session=False)
    ).one_or_none()
    if stopped is not None:
        _after_end(session, "cancelled", stopped.kind, stopped.task_id, stopped.started_at)
    session.commit()
    if stopped is not None:
        _announce_end(job.id, "cancelled")
    session.refresh(job)
    return job.state in ACTIVE_STATES or stopped is not None


# --- the reaper's transitions -----------------------------------------------------------------


def fail_all_exhausted(session: Session) -> list[uuid.UUID]:
    """Fail every running job whose lease ran out with no attempt left; returns their ids."""
    now = clock.now(session)
    ids = list(
        session.scalars(
            select(Job.id).where(
                Job.state == "running",
                Job.attempts >= Job.max_attempts,
                Job.lease_expires_at < now,
            )
        )
    )
    return [job_id for job_id in ids if fail_exhausted(session, job_id)]


def take_abandoned(session: Session, settings: Settings) -> list[tuple[uuid.UUID, str]]:
    """Running jobs whose worker died (lease expired, attempts left), not re-sent this lease.

    Marks them sent (one conditional UPDATE, so concurrent reapers never take the same job) and
    returns (id, kind).
    """
    now = clock.now(session)
    taken: list[tuple[uuid.UUID, str]] = []
    for kind in KINDS.values():
        threshold = now - timedelta(seconds=kind.lease_seconds(settings))
        rows = session.execute(
            update(Job)
            .where(
                Job.kind == kind.name,
                Job.state == "running",
                Job.attempts < Job.max_attempts,
                Job.lease_expires_at < now,
                func.coalesce(Job.sent_at, Job.created_at) < threshold,
            )
            .values(sent_at=now)
            .returning(Job.id, Job.kind)
            .execution_options(synchronize_session=False)
        ).all()
        taken.extend((row.id, row.kind) for row in rows)
    session.commit()
    return taken


def take_unsent(
    session: Session, settings: Settings, queue: str, limit: int | None
) -> list[tuple[uuid.UUID, str]]:
    """Up to `limit` (None: all) queued jobs of a queue not sent for a lease, oldest first.

    The caller passes how many messages the broker lacks, so a backlog waiting in line is not
    sent again. Marks them sent and returns (id, kind).
    """
    if limit is not None and limit <= 0:
        return []
    now = clock.now(session)
    taken: list[tuple[uuid.UUID, str]] = []
    for kind in KINDS.values():
        if kind.queue != queue:
            continue
        threshold = now - timedelta(seconds=kind.lease_seconds(settings))
        candidates = (
            select(Job.id)
            .where(
                Job.kind == kind.name,
                Job.state == "queued",
                func.coalesce(Job.sent_at, Job.created_at) < threshold,
            )
            .order_by(func.coalesce(Job.sent_at, Job.created_at))
        )
        if limit is not None:
            candidates = candidates.limit(limit - len(taken))
        rows = session.execute(
            update(Job)
            .where(
                Job.id.in_(candidates.scalar_subquery()),
                Job.state == "queued",
                func.coalesce(Job.sent_at, Job.created_at) < threshold,
            )
            .values(sent_at=now)
            .returning(Job.id, Job.kind)
            .execution_options(synchronize_session=False)
        ).all()
        taken.extend((row.id, row.kind) for row in rows)
        if limit is not None and len(taken) >= limit:
            break
    session.commit()
    return taken


# --- task status ------------------------------------------------------------------------------


def sync_task_status(session: Session, task_id: uuid.UUID) -> None:
    """Set a task's status from its rows: ready with a model, adapting with a live job, else failed."""
    session.execute(_sync_statement(), {"task_id": task_id, "now": clock.now(session)})


@functools.cache
def _sync_statement() -> Any:
    # Built once (see _claim_statement): the task and the time are parameters.
    task_id = bindparam("task_id", type_=Uuid())
    has_model = select(AdaptedModel.id).where(AdaptedModel.task_id == task_id).exists()
    has_live_job = (
        select(Job.id).where(Job.task_id == task_id, Job.state.in_(ACTIVE_STATES)).exists()
    )
    newest = (
        select(AdaptedModel.initialization_id)
        .where(AdaptedModel.task_id == task_id)
        .order_by(AdaptedModel.created_at.desc(), AdaptedModel.id.desc())
        .limit(1)
        .scalar_subquery()
    )
    return (
        update(Task)
        .where(Task.id == task_id)
        .values(
            status=case((has_model, "ready"), (has_live_job, "adapting"), else_="failed"),
            initialization_id=case((has_model, newest), else_=Task.initialization_id),
            updated_at=bindparam("now", type_=UTCDateTime()),
        )
        .execution_options(synchronize_session=False)
    )


def _after_end(
    session: Session,
    state: str,
    kind: str,
    task_id: uuid.UUID | None,
    started_at: datetime | None,
) -> None:
    if task_id is not None:
        sync_task_status(session, task_id)
    metrics.JOBS_FINISHED.labels(kind, state).inc()
    if started_at is not None:
        metrics.JOB_DURATION.labels(kind, state).observe(
            (clock.now(session) - started_at).total_seconds()
        )
