"""/v1/tasks: support sets in, adapted models and predictions out."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Header, Query, Response, status

from app.core.schemas import FILES, multipart_body, problem_responses
from app.deps import DispatcherDep, RuntimeDep, SessionDep, TenantDep
from app.jobs import service as jobs
from app.tasks import service as tasks
from app.tasks.bodies import SupportSetDep
from app.tasks.schemas import TaskPage, TaskPublic
from app.tasks.service import task_public

router = APIRouter(prefix="/v1/tasks", tags=["tasks"])

_PROBLEMS = problem_responses(401, 404, 409, 413, 415, 422)


_SUPPORT_BODY = multipart_body(
    {
        "images": FILES,
        "labels": {
            "type": "array",
            "items": {"type": "string"},
            "description": "One per image, same order.",
        },
        "name": {"type": "string"},
        "mode": {"type": "string", "enum": ["full", "head"]},
        "steps": {"type": "integer", "minimum": 0},
    },
    ["images", "labels"],
)


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=TaskPublic,
    responses={201: {"model": TaskPublic, "description": "Adapted within ?wait."}, **_PROBLEMS},
    openapi_extra=_SUPPORT_BODY,
)
def create_task(
    caller: TenantDep,
    body: SupportSetDep,
    session: SessionDep,
    runtime: RuntimeDep,
    dispatcher: DispatcherDep,
    response: Response,
    wait: Annotated[
        float | None, Query(ge=0, description="Seconds to wait for adaptation (bounded).")
    ] = None,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)] = None,
) -> TaskPublic:
    """Create a task from a support set and adapt the active initialization to it."""
    task, created_job = tasks.create_task(
        session=session,
        runtime=runtime,
        dispatcher=dispatcher,
        tenant_id=caller.tenant_id,
        body=body,
        idempotency_key=idempotency_key,
    )
    task_id = task.id
    if wait:
        # A new task's job is its latest; a replayed one may have been re-adapted since.
        job = created_job or jobs.latest_job(session=session, task_id=task.id)
        if job is not None:
            jobs.wait_for_job(
                runtime=runtime,
                dispatcher=dispatcher,
                job_id=job.id,
                timeout=min(wait, runtime.settings.max_wait_seconds),
            )
        session.expire_all()
    # Read by id: the expired row raises if the task was deleted meanwhile; this is a 404.
    task = tasks.get_task(session=session, tenant_id=caller.tenant_id, task_id=task_id)
    response.headers["Location"] = f"/v1/tasks/{task.id}"
    if task.status != "adapting":
        response.status_code = status.HTTP_201_CREATED
    return task_public(session, task)


@router.get("", response_model=TaskPage, responses=_PROBLEMS)
def list_tasks(
    caller: TenantDep,
    session: SessionDep,
    runtime: RuntimeDep,
    limit: Annotated[int | None, Query(ge=1)] = None,
    cursor: str | None = None,
) -> TaskPage:
    """The caller's tasks, newest first; pass `next_cursor` back as `cursor` for the next page."""
    size = min(limit or runtime.settings.page_size, runtime.settings.max_page_size)
    page = tasks.list_tasks(session=session, tenant_id=caller.tenant_id, limit=size, cursor=cursor)
    return TaskPage(
        items=[task_public(session, t) for t in page.items], next_cursor=page.next_cursor
    )


@router.get("/{task_id}", response_model=TaskPublic, responses=_PROBLEMS)
def get_task(caller: TenantDep, session: SessionDep, task_id: uuid.UUID) -> TaskPublic:
    """One task: status, labels, counts per label, initialization version and adapted model."""
    return task_public(
        session, tasks.get_task(session=session, tenant_id=caller.tenant_id, task_id=task_id)
    )


@router.delete("/{task_id}", status_code=status.HTTP_204_NO_CONTENT, responses=_PROBLEMS)
def delete_task(
    caller: TenantDep, session: SessionDep, runtime: RuntimeDep, task_id: uuid.UUID
) -> Response:
    """Delete a task with its images, adapted weights and predictions."""
    task = tasks.get_task(session=session, tenant_id=caller.tenant_id, task_id=task_id)
    tasks.delete_task(session=session, runtime=runtime, task=task)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
