"""/v1/tasks/{id}/adaptations: re-adapt a task (e.g. from a newly promoted version)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Body, Response, status

from app.adaptations import service as adaptations
from app.adaptations.schemas import AdaptationCreate, AdaptedModelList, AdaptedModelRecord
from app.core.schemas import Problem
from app.deps import DispatcherDep, JsonIfBodyDep, OwnedTaskDep, RuntimeDep, SessionDep, TenantDep
from app.jobs.schemas import JobPublic
from app.jobs.service import job_public
from app.tasks import service as tasks

router = APIRouter(prefix="/v1/tasks", tags=["tasks"])

_PROBLEMS: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem, "content": {"application/problem+json": {}}}
    for code in (401, 404, 409, 422, 503)
}
_POST_PROBLEMS = {**_PROBLEMS, 415: _PROBLEMS[422]}


@router.post(
    "/{task_id}/adaptations",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobPublic,
    responses=_POST_PROBLEMS,
)
def create_adaptation(
    task: OwnedTaskDep,
    _json: JsonIfBodyDep,
    session: SessionDep,
    runtime: RuntimeDep,
    dispatcher: DispatcherDep,
    response: Response,
    body: Annotated[AdaptationCreate | None, Body()] = None,
) -> JobPublic:
    """Re-adapt the task from the active (or a named) version as a new adapted model."""
    # The task (a dependency) is looked up before the body is checked: an unknown id is a 404.
    job = adaptations.readapt(
        session=session,
        runtime=runtime,
        dispatcher=dispatcher,
        task=task,
        body=body or AdaptationCreate(),
    )
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_public(job)


@router.get("/{task_id}/adaptations", response_model=AdaptedModelList, responses=_PROBLEMS)
def list_adaptations(
    caller: TenantDep, session: SessionDep, task_id: uuid.UUID
) -> AdaptedModelList:
    """The task's adapted models, newest (the one predictions use) first."""
    tasks.get_task(session=session, tenant_id=caller.tenant_id, task_id=task_id)
    rows = adaptations.adapted_models(session=session, task_id=task_id)
    return AdaptedModelList(items=[AdaptedModelRecord.model_validate(r) for r in rows])
