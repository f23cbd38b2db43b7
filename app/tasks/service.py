"""Task lifecycle: create with its adapt job, read, list, delete."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Select, bindparam, delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from app.core.errors import Conflict, InvalidRequest, NotFound, ServiceUnavailable
from app.core.pagination import Page, paginate
from app.core.runtime import Runtime
from app.core.schemas import ErrorInfo
from app.core.storage import delete_owned, support_image_key, task_prefix
from app.initializations import registry
from app.jobs import service as jobs
from app.jobs import state
from app.jobs.admission import admit_adaptation
from app.jobs.dispatch import Dispatcher
from app.models import (
    AdaptedModel,
    Initialization,
    Job,
    SupportExample,
    Task,
)
from app.tasks.schemas import AdaptedModelPublic, JobRef, SupportDiagnosticsPublic, TaskPublic
from app.uploads.bodies import SupportSetIn

log = logging.getLogger(__name__)


def support_set_hash(labels: list[str], image_hashes: list[str]) -> str:
    """sha256 over the ordered (label, image sha256) pairs: what an adapted model was made from."""
    document = json.dumps(
        [[label, digest] for label, digest in zip(labels, image_hashes, strict=True)]
    )
    return hashlib.sha256(document.encode()).hexdigest()


def _fingerprint(support_hash: str, body: SupportSetIn) -> str:
    # What the client sent, nothing the server chose: a retry after a promotion is the same
    # request (and is replayed), although a new request would now adapt from another version.
    document: dict[str, Any] = {
        "support": support_hash,
        "name": body.name,
        "mode": body.mode or "full",  # as before mode could be left to the initialization
        "steps": body.steps,
    }
    if body.initialization is not None:
        document["initialization"] = body.initialization
    if body.unknown_threshold is not None:
        # Only when given: fingerprints of requests without it stay as they were.
        document["unknown_threshold"] = body.unknown_threshold
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def create_task(
    *,
    session: Session,
    runtime: Runtime,
    dispatcher: Dispatcher,
    tenant_id: uuid.UUID,
    body: SupportSetIn,
    idempotency_key: str | None,
) -> tuple[Task, Job | None]:
    """Store the images, record task + examples + adapt job in one transaction, then enqueue.

    Returns the task and the adapt job created now, or None for the job when an earlier request
    with the same Idempotency-Key created the task. Nothing stays behind when any step fails.
    """
    if idempotency_key is not None and not idempotency_key.strip():
        raise InvalidRequest(
            "the Idempotency-Key header is empty; send a unique non-empty value (e.g. a UUID) "
            "or leave the header out",
            code="invalid_idempotency_key",
        )
    support_hash = support_set_hash(body.labels, [i.sha256 for i in body.images])
    fingerprint = _fingerprint(support_hash, body)
    if idempotency_key is not None:
        earlier = jobs.find_idempotent_job(
            session=session, tenant_id=tenant_id, key=idempotency_key
        )
        if earlier is not None:
            return _idempotent_replay(session, tenant_id, earlier, fingerprint), None
    # Past the backlog bounds the request is refused before anything is stored.
    admit_adaptation(session, runtime.settings, tenant_id)
    init_row = _initialization_for(session, tenant_id, body.initialization)
    mode = body.mode or str(init_row.config.get("default_mode") or "full")
    task_id = uuid.uuid4()
    try:
        examples = _store_examples(runtime, task_id, body)
        task, job = _task_and_job(
            runtime, tenant_id, task_id, init_row, body, mode, examples, support_hash,
            fingerprint, idempotency_key,
        )  # fmt: skip
        session.add(task)
        # Jobs have no ORM relationship to tasks, so the task row must exist before the job's.
        session.flush()
        session.add(job)
        session.commit()
    except IntegrityError:
        session.rollback()
        delete_owned(runtime.store, task_prefix(task_id))
        if idempotency_key is not None:
            earlier = jobs.find_idempotent_job(
                session=session, tenant_id=tenant_id, key=idempotency_key
            )
            if earlier is not None:
                return _idempotent_replay(session, tenant_id, earlier, fingerprint), None
        raise
    except BaseException:
        session.rollback()
        delete_owned(runtime.store, task_prefix(task_id))
        raise

    def discard() -> None:
        # The broker refused the job: withdraw the whole request (rows, files, the key).
        session.rollback()
        session.execute(delete(Task).where(Task.id == task_id))
        session.commit()
        delete_owned(runtime.store, task_prefix(task_id))

    jobs.send(dispatcher, job, discard=discard)
    return task, job


def _task_and_job(
    runtime: Runtime, tenant_id: uuid.UUID, task_id: uuid.UUID, init_row: Initialization,
    body: SupportSetIn, mode: str, examples: list[SupportExample], support_hash: str,
    fingerprint: str, idempotency_key: str | None,
) -> tuple[Task, Job]:  # fmt: skip
    """The new task's row (with its examples) and its adapt job's, not yet added."""
    task = Task(
        id=task_id,
        tenant_id=tenant_id,
        name=body.name,
        status="adapting",
        labels=list(dict.fromkeys(body.labels)),
        mode=mode,
        steps=body.steps,
        initialization_id=init_row.id,
        support_set_sha256=support_hash,
        example_count=len(examples),
        unknown_threshold=body.unknown_threshold,
        examples=examples,
    )
    job = state.new_job(
        kind="adapt",
        settings=runtime.settings,
        tenant_id=tenant_id,
        task_id=task_id,
        initialization_id=init_row.id,
        params={
            "mode": mode,
            "steps": body.steps,
            "fingerprint": fingerprint,
            "unknown_threshold": body.unknown_threshold,
        },
        idempotency_key=idempotency_key,
    )
    return task, job


def _initialization_for(
    session: Session, tenant_id: uuid.UUID, version: str | None
) -> Initialization:
    """The named ready version, else the tenant's default; 503 when there is none at all."""
    init_row = (
        registry.default_for(session=session, tenant_id=tenant_id)
        if version is None
        else registry.ready_version(session, version, tenant_id)
    )
    if init_row is None:
        raise ServiceUnavailable(
            "no active initialization is registered yet; an operator must promote one",
            code="no_active_initialization",
        )
    return init_row


def _store_examples(
    runtime: Runtime, task_id: uuid.UUID, body: SupportSetIn
) -> list[SupportExample]:
    """The support rows; images too large for a row are written to the new task's folder."""
    examples = []
    # Small images go in their rows; the others, content-addressed in a folder of this new
    # task (a repeated image is stored once).
    inline_max = runtime.settings.support_inline_max_bytes
    files: dict[str, bytes] = {}
    for position, (image, label) in enumerate(zip(body.images, body.labels, strict=True)):
        key = None
        if len(image.data) > inline_max:
            key = support_image_key(task_id, image.sha256, image.format)
            files.setdefault(key, image.data)
        examples.append(
            SupportExample(
                position=position,
                label=label,
                image_key=key,
                data=image.data if key is None else None,
                sha256=image.sha256,
                format=image.format,
                width=image.width,
                height=image.height,
                size_bytes=len(image.data),
            )
        )
    if files:
        runtime.store.put_many(files)
    return examples


def _idempotent_replay(session: Session, tenant_id: uuid.UUID, job: Job, fingerprint: str) -> Task:
    if job.params.get("fingerprint") != fingerprint or job.task_id is None:
        raise Conflict(
            "this Idempotency-Key was already used for a different request; use a new key",
            code="idempotency_key_reused",
        )
    return get_task(session=session, tenant_id=tenant_id, task_id=job.task_id)


def delete_task(*, session: Session, runtime: Runtime, task: Task) -> None:
    """Remove a task's rows (examples, jobs, models, predictions) and then its files."""
    model_ids = list(
        session.scalars(select(AdaptedModel.id).where(AdaptedModel.task_id == task.id))
    )
    session.delete(task)
    session.commit()
    delete_owned(runtime.store, task_prefix(task.id))
    runtime.models.forget(model_ids)


def get_task(*, session: Session, tenant_id: uuid.UUID, task_id: uuid.UUID) -> Task:
    """The tenant's task, or 404 (also for another tenant's task)."""
    task = session.scalar(select(Task).where(Task.id == task_id, Task.tenant_id == tenant_id))
    if task is None:
        raise NotFound(f"no task {task_id}")
    return task


def list_tasks(*, session: Session, tenant_id: uuid.UUID, limit: int, cursor: str | None) -> Page:
    """The tenant's tasks, newest first."""
    query = select(Task).where(Task.tenant_id == tenant_id)
    return paginate(session=session, query=query, model=Task, limit=limit, cursor=cursor)


def _diagnostics(result: dict[str, Any] | None) -> dict[str, Any] | None:
    value = None if result is None else result.get("diagnostics")
    return value if isinstance(value, dict) else None


@functools.cache
def _newest_statement(entity: type[AdaptedModel] | type[Job]) -> Select[Any]:
    # Built once: making the ranked subquery and its alias costs more CPU than running it.
    rank = (
        func.row_number()
        .over(
            partition_by=entity.task_id,
            order_by=(entity.created_at.desc(), entity.id.desc()),
        )
        .label("rank")
    )
    ranked = (
        select(entity, rank)
        .where(entity.task_id.in_(bindparam("task_ids", expanding=True)))
        .subquery()
    )
    return select(aliased(entity, ranked)).where(ranked.c.rank == 1)


def _newest_per_task(
    session: Session, entity: type[AdaptedModel] | type[Job], task_ids: list[uuid.UUID]
) -> dict[uuid.UUID, Any]:
    """The newest row of `entity` for each task (by created_at, then id), in one query."""
    rows: Iterable[Any] = session.scalars(_newest_statement(entity), {"task_ids": task_ids})
    return {row.task_id: row for row in rows}


def task_public(session: Session, task: Task) -> TaskPublic:
    """A task with its current adapted model, latest job and links."""
    return task_publics(session, [task])[0]


def task_publics(session: Session, rows: Sequence[Task]) -> list[TaskPublic]:
    """Tasks with their current adapted models, latest jobs and links: a fixed number of queries
    (five at most) whatever the number of tasks, not a few per task."""
    if not rows:
        return []
    ids = [task.id for task in rows]
    models = _newest_per_task(session, AdaptedModel, ids)
    latest = _newest_per_task(session, Job, ids)
    counts: dict[uuid.UUID, dict[str, int]] = {}
    for task_id, label, count in session.execute(
        select(SupportExample.task_id, SupportExample.label, func.count())
        .where(SupportExample.task_id.in_(ids))
        .group_by(SupportExample.task_id, SupportExample.label)
    ):
        counts.setdefault(task_id, {})[label] = int(count)
    versions = {
        init_id: version
        for init_id, version in session.execute(
            select(Initialization.id, Initialization.version).where(
                Initialization.id.in_({task.initialization_id for task in rows})
            )
        )
    }
    # Diagnostics live in the result of the job that made the model: usually the latest job.
    other_jobs = [
        model.job_id
        for task_id, model in models.items()
        if task_id not in latest or latest[task_id].id != model.job_id
    ]
    results: dict[uuid.UUID, dict[str, Any] | None] = {
        job.id: job.result for job in latest.values()
    }
    if other_jobs:
        for job_id, result in session.execute(
            select(Job.id, Job.result).where(Job.id.in_(other_jobs))
        ):
            results[job_id] = result
    return [
        _public(
            task,
            models.get(task.id),
            latest.get(task.id),
            counts.get(task.id, {}),
            versions[task.initialization_id],
            results,
        )
        for task in rows
    ]


def _public(
    task: Task,
    model: AdaptedModel | None,
    job: Job | None,
    counted: dict[str, int],
    initialization_version: str,
    results: dict[uuid.UUID, dict[str, Any] | None],
) -> TaskPublic:
    links = {"self": f"/v1/tasks/{task.id}", "predictions": f"/v1/tasks/{task.id}/predictions"}
    if job is not None:
        links["job"] = f"/v1/jobs/{job.id}"
    error = None
    if task.status == "failed" and job is not None and job.error_code:
        error = ErrorInfo(code=job.error_code, message=job.error_message or "")
    counts = {label: counted.get(label, 0) for label in task.labels}
    diagnostics = None if model is None else _diagnostics(results.get(model.job_id))
    return TaskPublic(
        id=task.id,
        name=task.name,
        status=task.status,  # type: ignore[arg-type]
        mode=task.mode,
        steps=task.steps,
        labels=list(task.labels),
        counts=counts,
        example_count=task.example_count,
        initialization_version=initialization_version,
        adapted_model=None
        if model is None
        else AdaptedModelPublic(
            id=model.id,
            initialization_version=model.initialization_version,
            mode=model.mode,
            steps=model.steps,
            support_accuracy=model.support_accuracy,
            created_at=model.created_at,
        ),
        unknown_threshold=task.unknown_threshold,
        diagnostics=None
        if diagnostics is None
        else SupportDiagnosticsPublic.model_validate(diagnostics),
        job=None if job is None else JobRef(id=job.id, state=job.state),
        error=error,
        created_at=task.created_at,
        updated_at=task.updated_at,
        links=links,
    )
