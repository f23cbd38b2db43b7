"""Predicting query images with a task's current adapted model, and the record of it."""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.adaptations import service as adaptations
from app.core import metrics, ml
from app.core.config import Settings
from app.core.errors import Conflict, NotFound
from app.core.pagination import Page, paginate
from app.core.prediction_batcher import Expected
from app.core.runtime import Runtime
from app.jobs import service as jobs
from app.models import (
    AdaptedModel,
    Initialization,
    Prediction,
    Task,
    utcnow,
)
from app.uploads.bodies import QueriesIn


def list_predictions(
    *, session: Session, tenant_id: uuid.UUID, task_id: uuid.UUID, limit: int, cursor: str | None
) -> Page:
    """A task's recorded predictions, newest first."""
    query = select(Prediction).where(
        Prediction.tenant_id == tenant_id, Prediction.task_id == task_id
    )
    return paginate(session=session, query=query, model=Prediction, limit=limit, cursor=cursor)


@dataclass(frozen=True)
class PredictionOut:
    """One recorded prediction as the response shows it."""

    id: uuid.UUID
    label: str
    probabilities: dict[str, float]
    top_k: list[tuple[str, float]]
    score: float | None
    image_sha256: str


@dataclass(frozen=True)
class Predicted:
    """One request's predictions, the model that made them and the "unknown" threshold applied."""

    model_row: AdaptedModel
    request_id: uuid.UUID
    predictions: list[PredictionOut]
    threshold: float
    threshold_source: str


def resolve_threshold(
    requested: float | None, task_default: float | None, calibrated: float | None
) -> tuple[float | None, str]:
    """The threshold to pass to predict_scores (None: the model's own) and where it came from."""
    if requested is not None:
        return requested, "request"
    if task_default is not None:
        return task_default, "task"
    if calibrated is not None:
        return None, "initialization"
    return None, "none"


def expect_prediction(runtime: Runtime, task: Task) -> Expected | None:
    """Announce a prediction request of `task` to the shared batcher before its images are read
    (None when its model will not be batched): a batch then waits for it, and only for those."""
    if not runtime.models.batches(task.mode):
        return None
    return runtime.models.expect_prediction(**_batching(runtime.settings))


def _batching(settings: Settings) -> dict[str, Any]:
    """The prediction batcher's settings, as ModelCache takes them."""
    return {
        "wait_seconds": settings.predict_batch_wait_ms / 1000,
        "max_images": settings.predict_batch_max_images,
        "chunk": settings.predict_batch_chunk,
        "workers": settings.predict_batch_threads,
        "max_wait_seconds": settings.predict_max_wait_seconds,
    }


def predict(
    *,
    session: Session,
    runtime: Runtime,
    task: Task,
    queries: QueriesIn,
    expected: Expected | None = None,
) -> Predicted:
    """Predict every query with the task's current adapted model and record one row per image.

    Each image also gets a calibrated score and the label "unknown" when the score is below the
    threshold: the request's, else the task's, else the initialization's calibrated default.
    The rows are written by one INSERT statement executed for all of them (executemany), in the
    request's transaction.
    """
    model_row = _current_model_row(session, runtime, task)
    runtime.models.use_serving_threads()
    model = _load_model(session, runtime, task, model_row)
    x = ml.preprocess_images([image.decode() for image in queries.images], model.config)
    started = time.perf_counter()
    threshold, source = resolve_threshold(
        queries.unknown_threshold,
        task.unknown_threshold,
        model.unknown_threshold,
    )
    scores = runtime.models.predict_scores(
        model, x, threshold, expected=expected, **_batching(runtime.settings)
    )
    metrics.PREDICT_COMPUTE.observe(time.perf_counter() - started)
    metrics.PREDICTED_IMAGES.inc(len(queries.images))
    request_id = uuid.uuid4()
    out, values = _rows(task, model_row, request_id, queries, list(model.labels), scores)
    try:
        session.execute(insert(Prediction), values)
        session.commit()
    except IntegrityError:
        # A concurrent DELETE removed the task (its foreign key fails): 404, nothing written.
        # The rollback expires `task`, whose row may be gone: use the id read before.
        session.rollback()
        _raise_if_task_gone(session, values[0]["task_id"])
        raise
    return Predicted(model_row, request_id, out, scores.threshold, source)


def _current_model_row(session: Session, runtime: Runtime, task: Task) -> AdaptedModel:
    """The task's current adapted model; 409 while adapting or after a failure, 404 if gone."""
    model_row = adaptations.current_adapted_model(session=session, task_id=task.id)
    if model_row is not None:
        return model_row
    # A DELETE committed since the task was read removes its models too: that is a 404
    # (as for any request after it), never "still adapting".
    _raise_if_task_gone(session, task.id)
    if task.status == "failed":
        job = jobs.latest_job(session=session, task_id=task.id)
        why = (
            f" ({job.error_code}: {job.error_message})"
            if job is not None and job.error_code
            else ""
        )
        raise Conflict(
            f"adapting this task failed{why}; create the task again", code="adaptation_failed"
        )
    raise Conflict(
        "the task is still adapting; retry after the Retry-After delay or poll its job",
        code="not_adapted_yet",
        headers={"Retry-After": str(runtime.settings.retry_after_seconds)},
    )


def _load_model(
    session: Session, runtime: Runtime, task: Task, model_row: AdaptedModel
) -> ml.AdaptedModel:
    """The adapted model, from this process's cache or the store (with its initialization)."""
    # A cached model (e.g. the one this process just adapted) needs no initialization lookup.
    model = runtime.models.cached_adapted(model_row.id)
    if model is not None:
        return model
    init_row = session.get(Initialization, model_row.initialization_id)
    if init_row is None:
        raise Conflict(
            "the initialization this task's model was adapted from is gone; re-adapt the "
            "task (POST /v1/tasks/{id}/adaptations)",
            code="initialization_missing",
        )
    try:
        return runtime.models.adapted(model_row, runtime.models.initialization(init_row))
    except FileNotFoundError:
        # The task was deleted (with its weights) since it was read: the same 404 as after.
        _raise_if_task_gone(session, task.id)
        raise


def _rows(
    task: Task, model_row: AdaptedModel, request_id: uuid.UUID, queries: QueriesIn,
    labels: list[str], scores: ml.PredictionScores,
) -> tuple[list[PredictionOut], list[dict[str, Any]]]:  # fmt: skip
    """Each image's answer (label or "unknown", probabilities, top k, score) and its row."""
    top_k = min(queries.top_k or len(labels), len(labels))
    by_probability = itemgetter(1)
    out: list[PredictionOut] = []
    values: list[dict[str, Any]] = []
    for position, (image, row, label, score) in enumerate(
        zip(
            queries.images,
            scores.probabilities.tolist(),
            scores.labels,
            scores.score.tolist(),
            strict=True,
        )
    ):
        probs = dict(zip(labels, row, strict=True))
        order = sorted(probs.items(), key=by_probability, reverse=True)
        prediction = PredictionOut(
            id=uuid.uuid4(),
            # The most probable label, or "unknown" below the threshold.
            label=label,
            probabilities=probs,
            top_k=order[:top_k],
            score=None if math.isnan(score) else score,
            image_sha256=image.sha256,
        )
        out.append(prediction)
        values.append(
            {
                "id": prediction.id,
                "tenant_id": task.tenant_id,
                "task_id": task.id,
                "adapted_model_id": model_row.id,
                "request_id": request_id,
                "position": position,
                "image_sha256": image.sha256,
                "label": prediction.label,
                "probabilities": probs,
                # One timestamp per row, as rows made one by one had: newest-first lists keep
                # the images of a request in (reverse) order.
                "created_at": utcnow(),
            }
        )
    return out, values


def _raise_if_task_gone(session: Session, task_id: uuid.UUID) -> None:
    if session.scalar(select(Task.id).where(Task.id == task_id)) is None:
        raise NotFound(f"no task {task_id}")
