"""/v1/tasks: support sets in, adapted models and predictions out."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response, status

from app import crud, service
from app.api.bodies import MULTIPART, QueriesIn, SupportSetDep, read_queries
from app.api.views import task_public
from app.deps import DispatcherDep, OwnedTaskDep, RuntimeDep, SessionDep, TenantDep
from app.schemas import (
    LabelProbability,
    PredictionPage,
    PredictionPublic,
    PredictionRecord,
    PredictionResult,
    Problem,
    TaskPage,
    TaskPublic,
)

router = APIRouter(prefix="/v1/tasks", tags=["tasks"])

_PROBLEMS: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem, "content": {"application/problem+json": {}}}
    for code in (401, 404, 409, 413, 415, 422)
}


def _multipart_body(fields: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                MULTIPART: {
                    "schema": {"type": "object", "properties": fields, "required": required}
                },
                "application/json": {"schema": {"$ref": "#/components/schemas/SupportSetJson"}}
                if "labels" in fields
                else {"schema": {"$ref": "#/components/schemas/QueriesJson"}},
            },
        }
    }


_FILES = {"type": "array", "items": {"type": "string", "format": "binary"}}
_SUPPORT_BODY = _multipart_body(
    {
        "images": _FILES,
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
_QUERY_BODY = _multipart_body(
    {"images": _FILES, "top_k": {"type": "integer", "minimum": 1}}, ["images"]
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
    task, created_job = service.create_task(
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
        job = created_job or crud.latest_job(session=session, task_id=task.id)
        if job is not None:
            service.wait_for_job(
                runtime=runtime,
                dispatcher=dispatcher,
                job_id=job.id,
                timeout=min(wait, runtime.settings.max_wait_seconds),
            )
        session.expire_all()
    # Read by id: the expired row raises if the task was deleted meanwhile; this is a 404.
    task = crud.get_task(session=session, tenant_id=caller.tenant_id, task_id=task_id)
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
    page = crud.list_tasks(session=session, tenant_id=caller.tenant_id, limit=size, cursor=cursor)
    return TaskPage(
        items=[task_public(session, t) for t in page.items], next_cursor=page.next_cursor
    )


@router.get("/{task_id}", response_model=TaskPublic, responses=_PROBLEMS)
def get_task(caller: TenantDep, session: SessionDep, task_id: uuid.UUID) -> TaskPublic:
    """One task: status, labels, counts per label, initialization version and adapted model."""
    return task_public(
        session, crud.get_task(session=session, tenant_id=caller.tenant_id, task_id=task_id)
    )


@router.delete("/{task_id}", status_code=status.HTTP_204_NO_CONTENT, responses=_PROBLEMS)
def delete_task(
    caller: TenantDep, session: SessionDep, runtime: RuntimeDep, task_id: uuid.UUID
) -> Response:
    """Delete a task with its images, adapted weights and predictions."""
    task = crud.get_task(session=session, tenant_id=caller.tenant_id, task_id=task_id)
    service.delete_task(session=session, runtime=runtime, task=task)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


async def _queries_of_task(request: Request, _task: OwnedTaskDep) -> QueriesIn:
    # Depends on the task, so an unknown or malformed id is a 404 before the body is read.
    return await read_queries(request)


@router.post(
    "/{task_id}/predictions",
    response_model=PredictionResult,
    responses=_PROBLEMS,
    openapi_extra=_QUERY_BODY,
)
def create_predictions(
    task: OwnedTaskDep,
    queries: Annotated[QueriesIn, Depends(_queries_of_task)],
    session: SessionDep,
    runtime: RuntimeDep,
) -> PredictionResult:
    """Predict labels for query images with the task's adapted model (409 while it is adapting)."""
    model_row, request_id, predictions = service.predict(
        session=session, runtime=runtime, task=task, queries=queries
    )
    return PredictionResult(
        task_id=task.id,
        adapted_model_id=model_row.id,
        request_id=request_id,
        predictions=[
            PredictionPublic(
                id=p.id,
                label=p.label,
                probabilities=p.probabilities,
                top_k=[LabelProbability(label=label, probability=pr) for label, pr in p.top_k],
                image_sha256=p.image_sha256,
            )
            for p in predictions
        ],
    )


@router.get("/{task_id}/predictions", response_model=PredictionPage, responses=_PROBLEMS)
def list_predictions(
    caller: TenantDep,
    session: SessionDep,
    runtime: RuntimeDep,
    task_id: uuid.UUID,
    limit: Annotated[int | None, Query(ge=1)] = None,
    cursor: str | None = None,
) -> PredictionPage:
    """The task's recorded predictions, newest first."""
    crud.get_task(session=session, tenant_id=caller.tenant_id, task_id=task_id)
    size = min(limit or runtime.settings.page_size, runtime.settings.max_page_size)
    page = crud.list_predictions(
        session=session, tenant_id=caller.tenant_id, task_id=task_id, limit=size, cursor=cursor
    )
    return PredictionPage(
        items=[PredictionRecord.model_validate(p) for p in page.items], next_cursor=page.next_cursor
    )
