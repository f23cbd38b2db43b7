"""/v1/tasks: support sets in, adapted models and predictions out."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Header, Query, Response, status
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.core.schemas import (
    BODY,
    DOCUMENTED_MAX_PAGE,
    DOCUMENTED_MAX_STEPS,
    FILES,
    KEYED,
    PNG_BASE64,
    multipart_body,
    problem_responses,
)
from app.deps import Caller, DispatcherDep, RuntimeDep, SessionDep, TenantDep
from app.jobs import service as jobs
from app.tasks import service as tasks
from app.tasks.schemas import TaskPage, TaskPublic
from app.tasks.service import task_public, task_publics
from app.uploads.bodies import SupportSetDep

router = APIRouter(prefix="/v1/tasks", tags=["tasks"])

_CREATE_PROBLEMS = problem_responses(
    *KEYED,
    *BODY,
    404,
    409,
    415,
    codes={
        409: (
            "idempotency_key_reused",
            "this Idempotency-Key was used with a different request; use a new key",
        ),
        503: (
            "adaptation_backlog_full",
            "the service has as many adaptations waiting as it takes; try again after Retry-After",
        ),
    },
)
_LIST_PROBLEMS = problem_responses(*KEYED, 422)
_ONE_PROBLEMS = problem_responses(*KEYED, 404)


_SUPPORT_BODY = multipart_body(
    {
        "images": FILES,
        "labels": {
            "type": "array",
            "items": {"type": "string"},
            "description": "One per image, same order.",
        },
        "name": {"type": "string", "maxLength": 200},
        "initialization": {
            "type": "string",
            "maxLength": 100,
            "description": "The initialization version to adapt from (GET /v1/initializations "
            "lists them, with each one's domain and input); default: your tenant's default.",
        },
        "mode": {
            "type": "string",
            "enum": ["full", "head"],
            "description": "Default: the initialization's own (config.default_mode).",
        },
        "steps": {
            "type": "integer",
            "minimum": 0,
            "maximum": DOCUMENTED_MAX_STEPS,
            "description": "Inner-loop steps; default: the initialization's own.",
        },
        "unknown_threshold": {
            "type": "number",
            "minimum": 0,
            "maximum": 1,
            "description": "This task's default 'unknown' threshold on prediction scores "
            "(0 never answers 'unknown'); default: the initialization's calibrated one.",
        },
    },
    ["images", "labels"],
    example={
        "images": ["alpha-1.png", "alpha-2.png", "beta-1.png", "gamma-1.png"],
        "labels": ["alpha", "alpha", "beta", "gamma"],
        "name": "letters",
        "mode": "full",
    },
    json_example={
        "examples": [
            {"label": "alpha", "image": PNG_BASE64},
            {"label": "beta", "image": PNG_BASE64},
        ],
        "name": "letters",
        "mode": "head",
        "steps": 10,
    },
)


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=TaskPublic,
    responses={
        201: {"model": TaskPublic, "description": "Adapted within ?wait."},
        **_CREATE_PROBLEMS,
    },
    openapi_extra=_SUPPORT_BODY,
)
async def create_task(
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
    """Create a task from a support set and adapt an initialization (yours by default) to it."""

    # Async, with the database work on the thread pool: a ?wait holds no thread and no
    # connection while it waits.
    def create() -> tuple[uuid.UUID, uuid.UUID | None]:
        task, created_job = tasks.create_task(
            session=session,
            runtime=runtime,
            dispatcher=dispatcher,
            tenant_id=caller.tenant_id,
            body=body,
            idempotency_key=idempotency_key,
        )
        # Ends any read after the write: no connection is held while the request waits.
        session.commit()
        return task.id, None if created_job is None else created_job.id

    task_id, job_id = await run_in_threadpool(create)
    if wait:
        sent_now = job_id is not None
        # A new task's job is its latest; a replayed one may have been re-adapted since.
        if job_id is None:
            job_id = await run_in_threadpool(_latest_job_id, session, task_id)
        if job_id is not None:
            await jobs.wait_for_job_async(
                runtime=runtime,
                dispatcher=dispatcher,
                job_id=job_id,
                timeout=min(wait, runtime.settings.max_wait_seconds),
                sent_now=sent_now,
            )
        session.expire_all()
    return await run_in_threadpool(_created, session, caller, task_id, response)


def _latest_job_id(session: Session, task_id: uuid.UUID) -> uuid.UUID | None:
    job = jobs.latest_job(session=session, task_id=task_id)
    # Ends the read: no connection is held while the request waits.
    session.commit()
    return None if job is None else job.id


def _created(
    session: Session, caller: Caller, task_id: uuid.UUID, response: Response
) -> TaskPublic:
    # Read by id: the expired row raises if the task was deleted meanwhile; this is a 404.
    task = tasks.get_task(session=session, tenant_id=caller.tenant_id, task_id=task_id)
    response.headers["Location"] = f"/v1/tasks/{task.id}"
    if task.status != "adapting":
        response.status_code = status.HTTP_201_CREATED
    return task_public(session, task)


@router.get("", response_model=TaskPage, responses=_LIST_PROBLEMS)
def list_tasks(
    caller: TenantDep,
    session: SessionDep,
    runtime: RuntimeDep,
    limit: Annotated[
        int | None,
        Query(
            ge=1,
            json_schema_extra={"maximum": DOCUMENTED_MAX_PAGE},
            description="Page size (default 50; larger than the server's maximum: cut to it).",
        ),
    ] = None,
    cursor: str | None = None,
) -> TaskPage:
    """The caller's tasks, newest first; pass `next_cursor` back as `cursor` for the next page."""
    size = min(limit or runtime.settings.page_size, runtime.settings.max_page_size)
    page = tasks.list_tasks(session=session, tenant_id=caller.tenant_id, limit=size, cursor=cursor)
    return TaskPage(items=task_publics(session, page.items), next_cursor=page.next_cursor)


@router.get("/{task_id}", response_model=TaskPublic, responses=_ONE_PROBLEMS)
def get_task(caller: TenantDep, session: SessionDep, task_id: uuid.UUID) -> TaskPublic:
    """One task: status, labels, counts per label, initialization version and adapted model."""
    return task_public(
        session, tasks.get_task(session=session, tenant_id=caller.tenant_id, task_id=task_id)
    )


@router.delete("/{task_id}", status_code=status.HTTP_204_NO_CONTENT, responses=_ONE_PROBLEMS)
def delete_task(
    caller: TenantDep, session: SessionDep, runtime: RuntimeDep, task_id: uuid.UUID
) -> Response:
    """Delete a task with its images, adapted weights and predictions."""
    task = tasks.get_task(session=session, tenant_id=caller.tenant_id, task_id=task_id)
    tasks.delete_task(session=session, runtime=runtime, task=task)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
