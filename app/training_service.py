"""Admin meta-retraining: runs on the train queue, promotion and rollback, and re-adaptation."""

from __future__ import annotations

import logging
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import crud
from app.datasets import get_dataset
from app.dispatch import CeleryDispatcher, InProcessDispatcher
from app.errors import Conflict, InvalidRequest, NotFound, ServiceUnavailable
from app.models import AdaptedModel, Initialization, Job, Task, utcnow
from app.runtime import Runtime
from app.schemas import ErrorInfo
from app.schemas_admin import (
    AdaptationCreate,
    MetaTrainingCreate,
    MetaTrainingPublic,
    TrainingProgress,
)

log = logging.getLogger(__name__)
Dispatcher = InProcessDispatcher | CeleryDispatcher


def _submit(session: Session, dispatcher: Dispatcher, job: Job) -> None:
    try:
        dispatcher.submit(job.id, job.kind, job.queue)
    except Exception as exc:
        log.exception("could not enqueue job %s", job.id)
        job.state, job.error_code, job.finished_at = "failed", "enqueue_failed", utcnow()
        job.error_message = f"the job could not be sent to the broker: {exc}"
        session.commit()
        raise ServiceUnavailable(
            "the job queue is unreachable; the job was recorded as failed, try again shortly",
            code="broker_unavailable",
        ) from exc


def _ready_version(session: Session, version: str) -> Initialization:
    row = crud.get_initialization(session=session, version=version)
    if row.status != "ready":
        raise Conflict(
            f"initialization {version!r} is {row.status}, not ready",
            code="initialization_not_ready",
        )
    return row


# --- meta-training runs -----------------------------------------------------------------------


# fewshot.training validates on 1-shot tasks with this many queries per class.
VALIDATION_QUERIES = 5


def start_meta_training(
    *,
    session: Session,
    runtime: Runtime,
    dispatcher: Dispatcher,
    tenant_id: uuid.UUID,
    body: MetaTrainingCreate,
) -> Job:
    """Check the request, record a meta_train job on the train queue, then enqueue it."""
    dataset = get_dataset(session=session, tenant_id=tenant_id, dataset_id=body.dataset_id)
    start = None if body.start == "scratch" else _ready_version(session, body.start)
    if start is not None and body.model is not None:
        raise InvalidRequest(
            "model settings apply only to a run from scratch; a run from a version keeps its "
            "backbone",
            code="model_with_start_version",
        )
    # Validation holds out a share of the classes; the rest must cover the largest way count.
    needed = body.algorithm.ways[1]
    usable = int(dataset.class_count * (1 - body.validation_split))
    if usable < needed:
        raise InvalidRequest(
            f"dataset {dataset.name!r} has {dataset.class_count} classes, about {usable} left for "
            f"training after the validation split; ways up to {needed} need more (lower "
            "algorithm.ways or validation_split, or use a larger dataset)",
            code="dataset_too_small",
        )
    # Training draws shots + queries images per class; validation draws 1 shot + 5 queries.
    per_class = max(body.algorithm.shots[1] + body.algorithm.queries, 1 + VALIDATION_QUERIES)
    smallest = int((dataset.details or {}).get("min_images_per_class", per_class))
    if smallest < per_class:
        raise InvalidRequest(
            f"dataset {dataset.name!r} has classes with only {smallest} images; these settings "
            f"draw {per_class} per class (shots up to {body.algorithm.shots[1]} + "
            f"{body.algorithm.queries} queries, and 1 + {VALIDATION_QUERIES} for validation); "
            "lower algorithm.shots or algorithm.queries, or use classes with more images",
            code="classes_too_small",
        )
    params: dict[str, Any] = body.model_dump(mode="json")
    params.update(
        dataset_name=dataset.name,
        start_version=None if start is None else start.version,
    )
    job = Job(
        tenant_id=tenant_id,
        kind="meta_train",
        queue="train",
        state="queued",
        dataset_id=dataset.id,
        initialization_id=None if start is None else start.id,
        params=params,
        progress_detail={
            "stage": "queued",
            "iteration": 0,
            "total": body.algorithm.iterations,
            "curve": [],
        },
        max_attempts=runtime.settings.job_max_attempts,
    )
    session.add(job)
    session.commit()
    _submit(session, dispatcher, job)
    return job


def get_meta_training(*, session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID) -> Job:
    """The tenant's meta-training job, or 404."""
    job = session.scalar(
        select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id, Job.kind == "meta_train")
    )
    if job is None:
        raise NotFound(f"no meta-training {job_id}; GET /v1/admin/meta-trainings lists them")
    return job


def list_meta_trainings(*, session: Session, tenant_id: uuid.UUID) -> Sequence[Job]:
    """The tenant's meta-training jobs, newest first."""
    return session.scalars(
        select(Job)
        .where(Job.tenant_id == tenant_id, Job.kind == "meta_train")
        .order_by(Job.created_at.desc())
        .limit(100)
    ).all()


def cancel_meta_training(*, session: Session, job: Job) -> Job:
    """Cancel now if still queued; otherwise ask the worker to stop at its next report."""
    if job.state in ("succeeded", "failed", "cancelled"):
        raise Conflict(f"the run is already {job.state}", code="job_finished")
    now = utcnow()
    if job.cancel_requested_at is None:
        job.cancel_requested_at = now
    if job.state == "queued":
        job.state, job.finished_at = "cancelled", now
        job.progress_detail = {**job.progress_detail, "stage": "cancelled"}
    session.commit()
    return job


def meta_training_public(job: Job) -> MetaTrainingPublic:
    """A meta-training job as the admin API shows it."""
    detail = dict(job.progress_detail or {})
    params = dict(job.params or {})
    base = f"/v1/admin/meta-trainings/{job.id}"
    links = {"self": base, "curve": f"{base}/curve.png", "cancel": f"{base}/cancel"}
    if job.result and job.result.get("initialization_version"):
        links["initialization"] = f"/v1/initializations/{job.result['initialization_version']}"
    error = (
        ErrorInfo(code=job.error_code, message=job.error_message or "") if job.error_code else None
    )
    return MetaTrainingPublic(
        id=job.id,
        state=job.state,  # type: ignore[arg-type]
        dataset_id=job.dataset_id,
        dataset_name=params.get("dataset_name"),
        start=params.get("start_version") or "scratch",
        settings={k: v for k, v in params.items() if k not in ("dataset_name", "start_version")},
        progress=TrainingProgress(
            stage=detail.get("stage"),
            fraction=job.progress,
            iteration=detail.get("iteration"),
            total=detail.get("total"),
            elapsed_seconds=detail.get("elapsed_seconds"),
            eta_seconds=detail.get("eta_seconds"),
            checkpoint_iteration=detail.get("checkpoint_iteration"),
            resumes=list(detail.get("resumes") or []),
        ),
        curve=list(detail.get("curve") or []),
        attempts=job.attempts,
        error=error,
        result=job.result,
        cancel_requested_at=job.cancel_requested_at,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        links=links,
    )


def curve_png(job: Job) -> bytes:
    """The run's curve so far (meta-train loss, validation accuracy) drawn as a PNG."""
    from fewshot.training import plot_curve

    curve = list((job.progress_detail or {}).get("curve") or [])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "curve.png"
        plot_curve(curve, path)
        return path.read_bytes()


# --- versions in service ----------------------------------------------------------------------


def promote(*, session: Session, version: str, actor: str) -> tuple[Initialization, str | None]:
    """Make a version the active one; returns it and the version it replaced."""
    row = _ready_version(session, version)
    current = crud.active_initialization(session=session)
    if current is not None and current.id == row.id:
        return row, None
    try:
        crud.make_active(session=session, row=row, action="promote", actor=actor)
        session.commit()
    except IntegrityError:
        session.rollback()
        raise Conflict(
            "another promotion happened at the same time; try again", code="promotion_conflict"
        ) from None
    return row, None if current is None else current.version


def rollback(
    *, session: Session, actor: str, version: str | None = None
) -> tuple[Initialization, str]:
    """Return to the version that was active before the current one (`version`, when named)."""
    current = crud.active_initialization(session=session)
    if current is None or current.promoted_at is None:
        raise Conflict("no version is active", code="no_active_initialization")
    if version is not None and version != current.version:
        crud.get_initialization(session=session, version=version)
        raise Conflict(
            f"{version} is not the active version ({current.version} is); only the active "
            "version can be rolled back",
            code="not_active",
        )
    previous = session.scalar(
        select(Initialization)
        .where(
            Initialization.id != current.id,
            Initialization.status == "ready",
            Initialization.promoted_at.is_not(None),
            Initialization.promoted_at <= current.promoted_at,
        )
        .order_by(Initialization.promoted_at.desc())
        .limit(1)
    )
    if previous is None:
        raise Conflict(
            f"{current.version} is the first version ever promoted; there is nothing to roll "
            "back to",
            code="no_previous_version",
        )
    try:
        # Leaving the promotion history, so a second rollback steps one version further back.
        current.is_active, current.promoted_at = False, None
        session.flush()
        previous.is_active = True
        crud.record_promotion(
            session=session,
            action="rollback",
            version=previous.version,
            previous=current.version,
            actor=actor,
        )
        session.commit()
    except IntegrityError:
        session.rollback()
        raise Conflict(
            "another promotion happened at the same time; try again", code="promotion_conflict"
        ) from None
    return previous, current.version


# --- re-adaptation ----------------------------------------------------------------------------


def readapt(
    *,
    session: Session,
    runtime: Runtime,
    dispatcher: Dispatcher,
    task: Task,
    body: AdaptationCreate,
) -> Job:
    """A new adapt job for a task from a named (or the active) version; old models are kept."""
    if body.initialization_version is not None:
        init_row = _ready_version(session, body.initialization_version)
    else:
        active = crud.active_initialization(session=session)
        if active is None:
            raise ServiceUnavailable(
                "no active initialization; an administrator must promote one",
                code="no_active_initialization",
            )
        init_row = active
    if body.steps is not None and body.steps > runtime.settings.max_steps:
        raise InvalidRequest(
            f"steps must be at most {runtime.settings.max_steps}", code="invalid_steps"
        )
    pending = session.scalar(
        select(Job.id).where(Job.task_id == task.id, Job.state.in_(("queued", "running")))
    )
    if pending is not None:
        raise Conflict(
            f"the task is adapting already (job {pending}); wait for it to finish",
            code="adaptation_in_progress",
        )
    job = Job(
        tenant_id=task.tenant_id,
        kind="adapt",
        queue="adapt",
        state="queued",
        task_id=task.id,
        initialization_id=init_row.id,
        params={"mode": body.mode or task.mode, "steps": body.steps, "readapt": True},
        max_attempts=runtime.settings.job_max_attempts,
    )
    session.add(job)
    session.commit()
    _submit(session, dispatcher, job)
    return job


def adapted_models(*, session: Session, task_id: uuid.UUID) -> Sequence[AdaptedModel]:
    """A task's adapted models, newest first."""
    return session.scalars(
        select(AdaptedModel)
        .where(AdaptedModel.task_id == task_id)
        .order_by(AdaptedModel.created_at.desc(), AdaptedModel.id.desc())
    ).all()
