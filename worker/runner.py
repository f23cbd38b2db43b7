"""Running jobs: claim the row, do the work once, record the result under unique constraints.

Celery tasks and the in-process executor both call `run_job`. A message that arrives twice, or
after a crash, finds the job finished (or leased by a live worker) and does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, cast

from sqlalchemy import (
    BindParameter,
    CursorResult,
    Result,
    and_,
    bindparam,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from app import metrics
from app.models import (
    AdaptedModel,
    Initialization,
    Job,
    SupportExample,
    Task,
    UTCDateTime,
    utcnow,
)
from app.runtime import Runtime
from app.storage import ArtifactCorrupt, adapted_weights_key, sha256_file, task_prefix

log = logging.getLogger(__name__)

TERMINAL_STATES = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class Outcome:
    """What one delivery of a job did; `retry_in` asks the caller to deliver it again later."""

    status: Literal["done", "skipped", "failed", "retry"]
    retry_in: float | None = None


class PermanentJobError(Exception):
    """A failure that another attempt would repeat (bad data, corrupt artifact)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Claim:
    """A job this worker holds: its id and the attempt number it claimed it with."""

    job_id: uuid.UUID
    attempt: int
    worker: str


def worker_name() -> str:
    """host:pid:thread, recorded on the job a worker claims."""
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def _now_param() -> tuple[datetime, BindParameter[datetime]]:
    now = utcnow()
    return now, bindparam("now", now, type_=UTCDateTime())


def _rowcount(result: Result[Any]) -> int:
    return cast(CursorResult[Any], result).rowcount


def claim_job(session: Session, job_id: uuid.UUID, lease_seconds: float) -> Claim | Outcome:
    """Atomically take a queued job, or a running one whose lease expired; attempts + 1."""
    now, now_param = _now_param()
    worker = worker_name()
    result = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.attempts < Job.max_attempts,
            or_(Job.state == "queued", and_(Job.state == "running", Job.lease_expires_at < now)),
        )
        .values(
            state="running",
            attempts=Job.attempts + 1,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            claimed_by=worker,
            started_at=func.coalesce(Job.started_at, now_param),
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    session.commit()
    job = session.get(Job, job_id, populate_existing=True)
    if _rowcount(result) == 1 and job is not None:
        if job.attempts == 1:
            metrics.JOB_QUEUE_TIME.labels(job.kind).observe((now - job.created_at).total_seconds())
        return Claim(job_id=job_id, attempt=job.attempts, worker=worker)
    if job is None:
        log.info("job %s no longer exists; nothing to do", job_id)
        return Outcome("skipped")
    if job.state in TERMINAL_STATES:
        log.info("job %s is already %s; redelivery ignored", job_id, job.state)
        return Outcome("skipped")
    if job.state == "running" and job.lease_expires_at is not None and job.lease_expires_at >= now:
        # Held by a live worker; look again once its lease has run out.
        return Outcome("retry", retry_in=(job.lease_expires_at - now).total_seconds() + 1.0)
    fail_job(
        session,
        job_id,
        attempt=None,
        code="attempts_exhausted",
        message=f"gave up after {job.attempts} attempts; the last worker stopped before finishing",
    )
    return Outcome("failed")


def fail_job(
    session: Session, job_id: uuid.UUID, *, attempt: int | None, code: str, message: str
) -> None:
    """Mark a job (and its task) failed, unless another attempt has since taken it over."""
    now = utcnow()
    conditions = [Job.id == job_id, Job.state.in_(("queued", "running"))]
    if attempt is not None:
        conditions.append(Job.attempts == attempt)
    result = session.execute(
        update(Job)
        .where(*conditions)
        .values(
            state="failed",
            error_code=code,
            error_message=message[:2000],
            finished_at=now,
            lease_expires_at=None,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    job = session.get(Job, job_id, populate_existing=True)
    if _rowcount(result) == 1 and job is not None:
        if job.task_id is not None:
            # A failed re-adaptation leaves a task that still has an adapted model ready.
            has_model = select(AdaptedModel.id).where(AdaptedModel.task_id == job.task_id).exists()
            session.execute(
                update(Task)
                .where(Task.id == job.task_id, ~has_model)
                .values(status="failed", updated_at=now)
            )
        _observe_end(job, "failed")
    session.commit()


def release_job(session: Session, claim: Claim) -> None:
    """Give a claimed job back to the queue after a transient failure."""
    session.execute(
        update(Job)
        .where(Job.id == claim.job_id, Job.state == "running", Job.attempts == claim.attempt)
        .values(state="queued", lease_expires_at=None, claimed_by=None, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    session.commit()


def _observe_end(job: Job, state: str) -> None:
    metrics.JOBS_FINISHED.labels(job.kind, state).inc()
    if job.started_at is not None:
        metrics.JOB_DURATION.labels(job.kind, state).observe(
            (utcnow() - job.started_at).total_seconds()
        )


# --- adapt ------------------------------------------------------------------------------------


def _finish_adapt(session: Session, claim: Claim, job: Job, model_row: AdaptedModel | None) -> bool:
    """Record the adapted model, the job's success and the task's readiness in one transaction."""
    now = utcnow()
    if model_row is not None:
        session.add(model_row)
        session.flush()
    else:
        model_row = session.scalar(select(AdaptedModel).where(AdaptedModel.job_id == job.id))
        if model_row is None:
            return False
    done = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.state == "running", Job.attempts == claim.attempt)
        .values(
            state="succeeded",
            progress=1.0,
            progress_detail={"stage": "done"},
            result={
                "adapted_model_id": str(model_row.id),
                "task_id": str(model_row.task_id),
                "support_accuracy": model_row.support_accuracy,
            },
            finished_at=now,
            lease_expires_at=None,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    if _rowcount(done) != 1:
        session.rollback()
        return False
    session.execute(
        update(Task)
        .where(Task.id == model_row.task_id)
        .values(status="ready", initialization_id=model_row.initialization_id, updated_at=now)
    )
    session.commit()
    _observe_end(job, "succeeded")
    return True


def _forget_if_task_deleted(runtime: Runtime, session: Session, task_id: uuid.UUID) -> bool:
    """Remove the files of a task deleted while it adapted (the weights just written would
    otherwise outlive it); True when it was deleted."""
    if session.scalar(select(Task.id).where(Task.id == task_id)) is not None:
        return False
    log.info("task %s was deleted while adapting; its files are removed", task_id)
    runtime.store.delete_tree(task_prefix(task_id))
    return True


def run_adapt(runtime: Runtime, claim: Claim) -> Outcome:
    """Adapt the task's pinned initialization to its support set and store the weights."""
    import fewshot

    with runtime.sessions() as session:
        job = session.get(Job, claim.job_id)
        task = (
            session.get(Task, job.task_id) if job is not None and job.task_id is not None else None
        )
        if job is None or task is None:
            return Outcome("skipped")
        existing = session.scalar(select(AdaptedModel).where(AdaptedModel.job_id == job.id))
        if existing is not None:
            # An earlier delivery did the work and died before marking the job; just finish it.
            _finish_adapt(session, claim, job, None)
            return Outcome("skipped")
        examples = list(
            session.scalars(
                select(SupportExample)
                .where(SupportExample.task_id == task.id)
                .order_by(SupportExample.position)
            )
        )
        # A re-adaptation names its own version; a first adaptation uses the task's pinned one.
        init_row = (
            session.get(Initialization, job.initialization_id)
            if job.initialization_id is not None
            else None
        ) or task.initialization
        mode = str(job.params.get("mode", task.mode))
        steps_param = job.params.get("steps", task.steps)
        runtime.models.use_serving_threads()
        try:
            init = runtime.models.initialization(init_row)
            images = [
                fewshot.decode_image(runtime.store.read_bytes(e.image_key, sha256=e.sha256))
                for e in examples
            ]
            labels = [e.label for e in examples]
            support = fewshot.preprocess_images(images, init.config)
            started = time.perf_counter()
            model = fewshot.adapt(
                init,
                support,
                labels,
                mode="head" if mode == "head" else "full",
                steps=None if steps_param is None else int(steps_param),
                device=runtime.models.device,
            )
            compute = time.perf_counter() - started
        except fewshot.EpisodeError as exc:
            raise PermanentJobError("invalid_support_set", str(exc)) from exc
        except fewshot.CheckpointError as exc:
            raise PermanentJobError("initialization_unreadable", str(exc)) from exc
        except ArtifactCorrupt as exc:
            raise PermanentJobError("artifact_corrupt", exc.detail) from exc
        except FileNotFoundError as exc:
            raise PermanentJobError(
                "artifact_missing", f"a stored file is missing: {exc.filename}"
            ) from exc
        metrics.ADAPT_COMPUTE.labels(model.mode).observe(compute)
        key = adapted_weights_key(task.id, job.id)
        path = model.save(runtime.store.path(key))
        support_hash = task.support_set_sha256
        row = AdaptedModel(
            task_id=task.id,
            job_id=job.id,
            initialization_id=init_row.id,
            initialization_version=init_row.version,
            mode=model.mode,
            steps=model.steps,
            step_size=None,
            seed=0,
            support_set_sha256=support_hash,
            support_accuracy=float(model.support_accuracy),
            labels=list(model.labels),
            weights_key=key,
            sha256=sha256_file(path),
            size_bytes=path.stat().st_size,
            compute_seconds=compute,
            device=str(runtime.models.device),
        )
        job_id, task_id = job.id, task.id
        try:
            finished = _finish_adapt(session, claim, job, row)
        except IntegrityError:
            # A concurrent delivery recorded this job's model first (job_id is unique), or the
            # task was deleted meanwhile (its foreign key fails).
            session.rollback()
            if not _forget_if_task_deleted(runtime, session, task_id):
                log.info("job %s: adapted model already recorded by another delivery", job_id)
            return Outcome("skipped")
        if not finished:
            _forget_if_task_deleted(runtime, session, task_id)
            return Outcome("skipped")
        runtime.models.put_adapted(row.id, model)
        return Outcome("done")


# --- dispatch ---------------------------------------------------------------------------------

Handler = Callable[[Runtime, Claim], Outcome]
HANDLERS: dict[str, Handler] = {"adapt": run_adapt}


def register_handler(kind: str, handler: Handler) -> None:
    """Add the runner of another job kind (e.g. meta_train)."""
    HANDLERS[kind] = handler


def run_job(runtime: Runtime, job_id: uuid.UUID) -> Outcome:
    """Deliver one job: claim it, run its handler, record success or failure."""
    settings = runtime.settings
    try:
        with runtime.sessions() as session:
            claimed = claim_job(session, job_id, settings.job_lease_seconds)
            if isinstance(claimed, Outcome):
                return claimed
            job = session.get(Job, job_id)
            kind = job.kind if job is not None else ""
            max_attempts = job.max_attempts if job is not None else settings.job_max_attempts
    except OperationalError:
        log.exception("job %s: database unavailable while claiming", job_id)
        return Outcome("retry", retry_in=5.0)
    handler = HANDLERS.get(kind)
    try:
        if handler is None:
            raise PermanentJobError("unknown_job_kind", f"no runner for jobs of kind {kind!r}")
        return handler(runtime, claimed)
    except PermanentJobError as exc:
        log.warning("job %s failed: %s: %s", job_id, exc.code, exc.message)
        with runtime.sessions() as session:
            fail_job(session, job_id, attempt=claimed.attempt, code=exc.code, message=exc.message)
        return Outcome("failed")
    except Exception as exc:
        log.exception("job %s: attempt %d failed", job_id, claimed.attempt)
        with runtime.sessions() as session:
            if claimed.attempt >= max_attempts:
                fail_job(
                    session,
                    job_id,
                    attempt=claimed.attempt,
                    code="internal_error",
                    message=f"{type(exc).__name__}: {exc}",
                )
                return Outcome("failed")
            release_job(session, claimed)
        return Outcome("retry", retry_in=float(2**claimed.attempt))


# Other job kinds register their handlers when imported (after the helpers above exist).
import worker.training  # noqa: E402, F401
