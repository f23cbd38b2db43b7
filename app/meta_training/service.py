"""Admin meta-retraining: runs on the train queue, promotion and rollback, and re-adaptation."""

from __future__ import annotations

import logging
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core import ml
from app.core.errors import Conflict, InvalidRequest, NotFound, ServiceUnavailable
from app.core.runtime import Runtime
from app.core.schemas import ErrorInfo
from app.datasets.service import get_dataset
from app.initializations import registry
from app.jobs.dispatch import Dispatcher
from app.meta_training.schemas import MetaTrainingCreate, MetaTrainingPublic, TrainingProgress
from app.models import Job, utcnow

log = logging.getLogger(__name__)


def _submit(session: Session, dispatcher: Dispatcher, job: Job) -> None:
    try:
        dispatcher.submit(job.id, job.kind, job.queue)
    except Exception as exc:
        log.exception("could not enqueue job %s", job.id)
        job.state, job.error_code, job.finished_at = "failed", "enqueue_failed", utcnow()
        # The broker's message names its address: it goes to the log above, not to the job.
        job.error_message = "the job could not be sent to the broker"
        session.commit()
        raise ServiceUnavailable(
            "the job queue is unreachable; the job was recorded as failed, try again shortly",
            code="broker_unavailable",
        ) from exc


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
    start = (
        None if body.start == "scratch" else registry.ready_version(session, body.start, tenant_id)
    )
    if start is not None and body.model is not None:
        raise InvalidRequest(
            "model settings apply only to a run from scratch; a run from a version keeps its "
            "backbone",
            code="model_with_start_version",
        )
    # Validation holds out the groups fixed at registration; the rest must cover the ways.
    needed = body.algorithm.ways[1]
    held = (dataset.details or {}).get("validation_classes")
    if isinstance(held, int):
        usable = dataset.class_count - held
    else:  # registered before the split was recorded: about 15% held out
        usable = int(dataset.class_count * 0.85)
    if usable < needed:
        raise InvalidRequest(
            f"dataset {dataset.name!r} has {dataset.class_count} classes, about {usable} left for "
            f"training besides its validation groups; ways up to {needed} need more (lower "
            "algorithm.ways, or use a larger dataset)",
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
    curve = list((job.progress_detail or {}).get("curve") or [])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "curve.png"
        ml.plot_curve(curve, path)
        return path.read_bytes()


# --- versions in service ----------------------------------------------------------------------


# --- re-adaptation ----------------------------------------------------------------------------
