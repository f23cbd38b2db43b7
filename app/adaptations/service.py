"""Adapted models of a task, and re-adapting a task as a new model."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.adaptations.schemas import AdaptationCreate
from app.core.errors import Conflict, InvalidRequest, NotFound, ServiceUnavailable
from app.core.runtime import Runtime
from app.initializations import registry
from app.jobs import service as jobs
from app.jobs import state
from app.jobs.admission import admit_adaptation
from app.jobs.dispatch import Dispatcher
from app.models import AdaptedModel, Job, Task


def current_adapted_model(*, session: Session, task_id: uuid.UUID) -> AdaptedModel | None:
    """The task's newest adapted model (predictions use it)."""
    return session.scalar(
        select(AdaptedModel)
        .where(AdaptedModel.task_id == task_id)
        .order_by(AdaptedModel.created_at.desc(), AdaptedModel.id.desc())
        .limit(1)
    )


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
        init_row = registry.ready_version(session, body.initialization_version, task.tenant_id)
    else:
        active = registry.default_for(session=session, tenant_id=task.tenant_id)
        if active is None:
            raise ServiceUnavailable(
                "no active initialization; an operator must promote one",
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
        raise _in_progress(pending)
    admit_adaptation(session, runtime.settings, task.tenant_id)
    task_id = task.id
    job = state.new_job(
        kind="adapt",
        settings=runtime.settings,
        tenant_id=task.tenant_id,
        task_id=task_id,
        initialization_id=init_row.id,
        params={"mode": body.mode or task.mode, "steps": body.steps, "readapt": True},
    )
    session.add(job)
    try:
        session.commit()
    except IntegrityError:
        # Lost the race to a concurrent re-adaptation (jobs.uq_jobs_task_adapting), or the task
        # was deleted meanwhile (its foreign key fails).
        session.rollback()
        if session.scalar(select(Task.id).where(Task.id == task_id)) is None:
            raise NotFound(f"no task {task_id}") from None
        raise _in_progress(
            session.scalar(
                select(Job.id).where(Job.task_id == task_id, Job.state.in_(("queued", "running")))
            )
        ) from None

    def discard() -> None:
        session.delete(job)
        session.commit()

    jobs.send(dispatcher, job, discard=discard)
    return job


def _in_progress(job_id: uuid.UUID | None) -> Conflict:
    which = "" if job_id is None else f" (job {job_id})"
    return Conflict(
        f"the task is adapting already{which}; wait for it to finish",
        code="adaptation_in_progress",
    )


def adapted_models(*, session: Session, task_id: uuid.UUID) -> Sequence[AdaptedModel]:
    """A task's adapted models, newest first."""
    return session.scalars(
        select(AdaptedModel)
        .where(AdaptedModel.task_id == task_id)
        .order_by(AdaptedModel.created_at.desc(), AdaptedModel.id.desc())
    ).all()
