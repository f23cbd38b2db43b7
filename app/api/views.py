"""Turning rows into response bodies (links included)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app import crud
from app.models import Job, Task
from app.schemas import AdaptedModelPublic, ErrorInfo, JobPublic, JobRef, TaskPublic


def task_public(session: Session, task: Task) -> TaskPublic:
    """A task with its current adapted model, latest job and links."""
    model = crud.current_adapted_model(session=session, task_id=task.id)
    job = crud.latest_job(session=session, task_id=task.id)
    links = {"self": f"/v1/tasks/{task.id}", "predictions": f"/v1/tasks/{task.id}/predictions"}
    if job is not None:
        links["job"] = f"/v1/jobs/{job.id}"
    error = None
    if task.status == "failed" and job is not None and job.error_code:
        error = ErrorInfo(code=job.error_code, message=job.error_message or "")
    return TaskPublic(
        id=task.id,
        name=task.name,
        status=task.status,  # type: ignore[arg-type]
        mode=task.mode,
        steps=task.steps,
        labels=list(task.labels),
        counts=crud.label_counts(task),
        example_count=task.example_count,
        initialization_version=task.initialization.version,
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
        job=None if job is None else JobRef(id=job.id, state=job.state),
        error=error,
        created_at=task.created_at,
        updated_at=task.updated_at,
        links=links,
    )


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
