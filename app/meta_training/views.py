"""/v1/admin: datasets, meta-training runs, and which initialization is in service."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Response, status

from app.core.schemas import ADMIN, BODY, problem_responses
from app.deps import AdminDep, DispatcherDep, RuntimeDep, SessionDep
from app.meta_training import service as meta_training
from app.meta_training.schemas import MetaTrainingCreate, MetaTrainingList, MetaTrainingPublic

router = APIRouter(prefix="/v1/admin", tags=["admin"])

_START_PROBLEMS = problem_responses(
    *ADMIN,
    *BODY,
    404,
    409,
    codes={
        409: (
            "initialization_not_ready",
            "initialization 'omniglot-conv4-v8' is failed, not ready",
        ),
        503: ("broker_unavailable", "the job queue is not reachable right now; try again shortly"),
    },
)
_LIST_PROBLEMS = problem_responses(*ADMIN)
_ONE_PROBLEMS = problem_responses(*ADMIN, 404)
_CANCEL_PROBLEMS = problem_responses(
    *ADMIN, 404, 409, codes={409: ("job_finished", "the run is already succeeded")}
)


# --- datasets ---------------------------------------------------------------------------------


# --- meta-training runs -----------------------------------------------------------------------


@router.post(
    "/meta-trainings",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=MetaTrainingPublic,
    responses=_START_PROBLEMS,
)
def start_meta_training(
    caller: AdminDep,
    session: SessionDep,
    runtime: RuntimeDep,
    dispatcher: DispatcherDep,
    response: Response,
    body: MetaTrainingCreate,
) -> MetaTrainingPublic:
    """Start a meta-training run on the train queue."""
    job = meta_training.start_meta_training(
        session=session,
        runtime=runtime,
        dispatcher=dispatcher,
        tenant_id=caller.tenant_id,
        body=body,
    )
    response.headers["Location"] = f"/v1/admin/meta-trainings/{job.id}"
    return meta_training.meta_training_public(job)


@router.get("/meta-trainings", response_model=MetaTrainingList, responses=_LIST_PROBLEMS)
def list_meta_trainings(caller: AdminDep, session: SessionDep) -> MetaTrainingList:
    """The latest 100 runs, newest first."""
    jobs = meta_training.list_meta_trainings(session=session, tenant_id=caller.tenant_id)
    return MetaTrainingList(items=[meta_training.meta_training_public(j) for j in jobs])


@router.get("/meta-trainings/{job_id}", response_model=MetaTrainingPublic, responses=_ONE_PROBLEMS)
def get_meta_training(
    caller: AdminDep, session: SessionDep, job_id: uuid.UUID
) -> MetaTrainingPublic:
    """State, progress (iteration of total, ETA), the curve so far and the result."""
    job = meta_training.get_meta_training(
        session=session, tenant_id=caller.tenant_id, job_id=job_id
    )
    return meta_training.meta_training_public(job)


@router.get(
    "/meta-trainings/{job_id}/curve.png",
    response_class=Response,
    responses={
        200: {
            "description": "A PNG; before the first point it says 'no points yet'.",
            "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
        },
        **_ONE_PROBLEMS,
    },
)
def get_curve(caller: AdminDep, session: SessionDep, job_id: uuid.UUID) -> Response:
    """The curve so far: meta-train loss and validation accuracy against iteration."""
    job = meta_training.get_meta_training(
        session=session, tenant_id=caller.tenant_id, job_id=job_id
    )
    return Response(content=meta_training.curve_png(job), media_type="image/png")


@router.post(
    "/meta-trainings/{job_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=MetaTrainingPublic,
    responses=_CANCEL_PROBLEMS,
)
def cancel_meta_training(
    caller: AdminDep, session: SessionDep, job_id: uuid.UUID
) -> MetaTrainingPublic:
    """Stop a run at its next checkpoint (a queued run is cancelled at once)."""
    job = meta_training.get_meta_training(
        session=session, tenant_id=caller.tenant_id, job_id=job_id
    )
    return meta_training.meta_training_public(
        meta_training.cancel_meta_training(session=session, job=job)
    )


# --- versions in service ----------------------------------------------------------------------
