"""/v1/tasks/{id}/adaptations: re-adapt a task (e.g. from a newly promoted version)."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Body, Response, status

from app.adaptations import service as adaptations
from app.adaptations.schemas import AdaptationCreate, AdaptedModelList, AdaptedModelRecord
from app.core.schemas import BODY, KEYED, problem_responses
from app.deps import DispatcherDep, JsonIfBodyDep, OwnedTaskDep, RuntimeDep, SessionDep, TenantDep
from app.jobs.schemas import JobPublic
from app.jobs.service import job_public
from app.tasks import service as tasks

router = APIRouter(prefix="/v1/tasks", tags=["tasks"])

_POST_PROBLEMS = problem_responses(
    *KEYED,
    *BODY,
    404,
    409,
    415,
    codes={
        409: (
            "adaptation_in_progress",
            "the task is adapting already (job 8a1e4c2b-6d3f-4b7a-9c5e-2f0d1b3a4e6c); "
            "wait for it to finish",
        ),
        503: ("no_active_initialization", "no active initialization; an operator must promote one"),
    },
)
_LIST_PROBLEMS = problem_responses(*KEYED, 404)


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
    body: Annotated[
        AdaptationCreate | None,
        Body(
            openapi_examples={
                "active": {"summary": "No body: the version in force, its defaults", "value": {}},
                "named": {
                    "summary": "A named version, head only, 10 steps",
                    "value": {
                        "initialization_version": "omniglot-conv4-v8",
                        "mode": "head",
                        "steps": 10,
                    },
                },
            }
        ),
    ] = None,
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


@router.get("/{task_id}/adaptations", response_model=AdaptedModelList, responses=_LIST_PROBLEMS)
def list_adaptations(
    caller: TenantDep, session: SessionDep, task_id: uuid.UUID
) -> AdaptedModelList:
    """The task's adapted models, newest (the one predictions use) first."""
    tasks.get_task(session=session, tenant_id=caller.tenant_id, task_id=task_id)
    rows = adaptations.adapted_models(session=session, task_id=task_id)
    return AdaptedModelList(items=[AdaptedModelRecord.model_validate(r) for r in rows])
