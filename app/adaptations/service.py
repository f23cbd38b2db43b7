"""Adapted models of a task, and re-adapting a task as a new model."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.adaptations.schemas import AdaptationCreate
from app.core.errors import Conflict, InvalidRequest, ServiceUnavailable
from app.core.runtime import Runtime
from app.initializations import registry
from app.jobs import service as jobs
from app.jobs import state
from app.jobs.service import Dispatcher
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
        init_row = registry.ready_version(session, body.initialization_version)
    else:
        active = registry.active_initialization(session=session)
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
    job = state.new_job(
        kind="adapt",
        settings=runtime.settings,
        tenant_id=task.tenant_id,
        task_id=task.id,
        initialization_id=init_row.id,
        params={"mode": body.mode or task.mode, "steps": body.steps, "readapt": True},
    )
    session.add(job)
    session.commit()

    def discard() -> None:
        session.delete(job)
        session.commit()

    jobs.send(dispatcher, job, discard=discard)
    return job


def adapted_models(*, session: Session, task_id: uuid.UUID) -> Sequence[AdaptedModel]:
    """A task's adapted models, newest first."""
    return session.scalars(
        select(AdaptedModel)
        .where(AdaptedModel.task_id == task_id)
        .order_by(AdaptedModel.created_at.desc(), AdaptedModel.id.desc())
    ).all()
