"""Task lifecycle: create with its adapt job, wait, predict, delete (views -> service -> crud)."""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import crud, metrics
from app.api.bodies import QueriesIn, SupportSetIn
from app.dispatch import CeleryDispatcher, InProcessDispatcher
from app.errors import Conflict, NotFound, ServiceUnavailable
from app.models import AdaptedModel, Initialization, Job, Prediction, SupportExample, Task, utcnow
from app.runtime import Runtime
from app.storage import support_image_key, task_prefix

log = logging.getLogger(__name__)


def support_set_hash(labels: list[str], image_hashes: list[str]) -> str:
    """sha256 over the ordered (label, image sha256) pairs: what an adapted model was made from."""
    document = json.dumps(
        [[label, digest] for label, digest in zip(labels, image_hashes, strict=True)]
    )
    return hashlib.sha256(document.encode()).hexdigest()


def _fingerprint(support_hash: str, body: SupportSetIn, init_version: str) -> str:
    document = {
        "support": support_hash,
        "name": body.name,
        "mode": body.mode,
        "steps": body.steps,
        "initialization": init_version,
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def create_task(
    *,
    session: Session,
    runtime: Runtime,
    dispatcher: InProcessDispatcher | CeleryDispatcher,
    tenant_id: uuid.UUID,
    body: SupportSetIn,
    idempotency_key: str | None,
) -> tuple[Task, Job | None]:
    """Store the images, record task + examples + adapt job in one transaction, then enqueue.

    Returns the task and the adapt job created now, or None for the job when an earlier request
    with the same Idempotency-Key created the task. Nothing stays behind when any step fails.
    """
    init_row = crud.active_initialization(session=session)
    if init_row is None:
        raise ServiceUnavailable(
            "no active initialization is registered yet; an administrator must promote one",
            code="no_active_initialization",
        )
    support_hash = support_set_hash(body.labels, [i.sha256 for i in body.images])
    fingerprint = _fingerprint(support_hash, body, init_row.version)
    if idempotency_key is not None:
        earlier = crud.find_idempotent_job(
            session=session, tenant_id=tenant_id, key=idempotency_key
        )
        if earlier is not None:
            return _idempotent_replay(session, tenant_id, earlier, fingerprint), None

    task_id = uuid.uuid4()
    labels_in_order = list(dict.fromkeys(body.labels))
    try:
        examples = []
        # Content-addressed in a folder of this new task: a repeated image is stored once.
        files: dict[str, bytes] = {}
        for position, (image, label) in enumerate(zip(body.images, body.labels, strict=True)):
            key = support_image_key(task_id, image.sha256, image.format)
            files.setdefault(key, image.data)
            examples.append(
                SupportExample(
                    position=position,
                    label=label,
                    image_key=key,
                    sha256=image.sha256,
                    format=image.format,
                    width=image.width,
                    height=image.height,
                    size_bytes=len(image.data),
                )
            )
        runtime.store.put_many(files)
        task = Task(
            id=task_id,
            tenant_id=tenant_id,
            name=body.name,
            status="adapting",
            labels=labels_in_order,
            mode=body.mode,
            steps=body.steps,
            initialization_id=init_row.id,
            support_set_sha256=support_hash,
            example_count=len(examples),
            examples=examples,
        )
        job = Job(
            tenant_id=tenant_id,
            kind="adapt",
            queue="adapt",
            state="queued",
            task_id=task_id,
            initialization_id=init_row.id,
            params={"mode": body.mode, "steps": body.steps, "fingerprint": fingerprint},
            max_attempts=runtime.settings.job_max_attempts,
            idempotency_key=idempotency_key,
        )
        session.add(task)
        # Jobs have no ORM relationship to tasks, so the task row must exist before the job's.
        session.flush()
        session.add(job)
        session.commit()
    except IntegrityError:
        session.rollback()
        runtime.store.delete_tree(task_prefix(task_id))
        if idempotency_key is not None:
            earlier = crud.find_idempotent_job(
                session=session, tenant_id=tenant_id, key=idempotency_key
            )
            if earlier is not None:
                return _idempotent_replay(session, tenant_id, earlier, fingerprint), None
        raise
    except BaseException:
        session.rollback()
        runtime.store.delete_tree(task_prefix(task_id))
        raise
    _enqueue(session, dispatcher, job)
    return task, job


def _idempotent_replay(session: Session, tenant_id: uuid.UUID, job: Job, fingerprint: str) -> Task:
    if job.params.get("fingerprint") != fingerprint or job.task_id is None:
        raise Conflict(
            "this Idempotency-Key was already used for a different request; use a new key",
            code="idempotency_key_reused",
        )
    return crud.get_task(session=session, tenant_id=tenant_id, task_id=job.task_id)


def _enqueue(
    session: Session, dispatcher: InProcessDispatcher | CeleryDispatcher, job: Job
) -> None:
    try:
        dispatcher.submit(job.id, job.kind, job.queue)
    except Exception as exc:
        log.exception("could not enqueue job %s", job.id)
        now = utcnow()
        job.state, job.error_code, job.finished_at = "failed", "enqueue_failed", now
        job.error_message = f"the job could not be sent to the broker: {exc}"
        if job.task_id is not None:
            task = session.get(Task, job.task_id)
            if task is not None:
                task.status = "failed"
        session.commit()
        raise ServiceUnavailable(
            "the job queue is unreachable; the task was recorded as failed, try again shortly",
            code="broker_unavailable",
        ) from exc


# How often a waiter re-reads a job that its runner signals anyway (in-process executor): only a
# safety net for changes no run signals, such as the task being deleted meanwhile.
PUSHED_RECHECK_SECONDS = 0.25


def wait_for_job(
    *,
    runtime: Runtime,
    dispatcher: InProcessDispatcher | CeleryDispatcher,
    job_id: uuid.UUID,
    timeout: float,
) -> str:
    """Re-read the job row until it ends or `timeout` seconds pass; returns its last state.

    In-process jobs wake the waiter when a run ends, so the row is read once per run instead of
    being polled; Celery jobs are polled with a growing delay.
    """
    deadline = time.monotonic() + timeout
    delay = 0.002
    with dispatcher.watch(job_id) as watch:
        while True:
            with runtime.sessions() as session:
                state = session.scalar(select(Job.state).where(Job.id == job_id)) or "missing"
            remaining = deadline - time.monotonic()
            if state not in ("queued", "running") or remaining <= 0:
                return state
            watch.wait(min(PUSHED_RECHECK_SECONDS if watch.pushed else delay, remaining))
            delay = min(delay * 1.5, 0.1)


@dataclass(frozen=True)
class PredictionOut:
    """One recorded prediction as the response shows it."""

    id: uuid.UUID
    label: str
    probabilities: dict[str, float]
    top_k: list[tuple[str, float]]
    image_sha256: str


def predict(
    *, session: Session, runtime: Runtime, task: Task, queries: QueriesIn
) -> tuple[AdaptedModel, uuid.UUID, list[PredictionOut]]:
    """Predict every query with the task's current adapted model and record one row per image.

    The rows are written by one INSERT statement executed for all of them (executemany), in the
    request's transaction.
    """
    import fewshot

    model_row = crud.current_adapted_model(session=session, task_id=task.id)
    if model_row is None:
        if task.status == "failed":
            job = crud.latest_job(session=session, task_id=task.id)
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
    runtime.models.use_serving_threads()
    # A cached model (e.g. the one this process just adapted) needs no initialization lookup.
    model = runtime.models.cached_adapted(model_row.id)
    if model is None:
        init_row = session.get(Initialization, model_row.initialization_id)
        assert init_row is not None
        try:
            model = runtime.models.adapted(model_row, runtime.models.initialization(init_row))
        except FileNotFoundError:
            # The task was deleted (with its weights) since it was read: the same 404 as after.
            _raise_if_task_gone(session, task.id)
            raise
    x = fewshot.preprocess_images([image.decode() for image in queries.images], model.config)
    started = time.perf_counter()
    probabilities = model.predict_proba(x)
    metrics.PREDICT_COMPUTE.observe(time.perf_counter() - started)
    metrics.PREDICTED_IMAGES.inc(len(queries.images))

    request_id = uuid.uuid4()
    labels = list(model.labels)
    top_k = min(queries.top_k or len(labels), len(labels))
    by_probability = itemgetter(1)
    out: list[PredictionOut] = []
    values: list[dict[str, Any]] = []
    for position, (image, row) in enumerate(
        zip(queries.images, probabilities.tolist(), strict=True)
    ):
        probs = dict(zip(labels, row, strict=True))
        order = sorted(probs.items(), key=by_probability, reverse=True)
        prediction = PredictionOut(
            id=uuid.uuid4(),
            label=order[0][0],
            probabilities=probs,
            top_k=order[:top_k],
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
    try:
        session.execute(insert(Prediction), values)
        session.commit()
    except IntegrityError:
        # A concurrent DELETE removed the task (its foreign key fails): 404, nothing written.
        # The rollback expires `task`, whose row may be gone: use the id read before.
        session.rollback()
        _raise_if_task_gone(session, values[0]["task_id"])
        raise
    return model_row, request_id, out


def _raise_if_task_gone(session: Session, task_id: uuid.UUID) -> None:
    if session.scalar(select(Task.id).where(Task.id == task_id)) is None:
        raise NotFound(f"no task {task_id}")


def delete_task(*, session: Session, runtime: Runtime, task: Task) -> None:
    """Remove a task's rows (examples, jobs, models, predictions) and then its files."""
    model_ids = list(
        session.scalars(select(AdaptedModel.id).where(AdaptedModel.task_id == task.id))
    )
    session.delete(task)
    session.commit()
    runtime.store.delete_tree(task_prefix(task.id))
    runtime.models.forget(model_ids)
