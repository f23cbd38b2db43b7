"""/v1/jobs: where background work stands."""

from __future__ import annotations

import uuid

from fastapi import APIRouter

from app import crud
from app.api.views import job_public
from app.deps import SessionDep, TenantDep
from app.schemas import JobPublic, problem_responses

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.get(
    "/{job_id}",
    response_model=JobPublic,
    responses=problem_responses(401, 404),
)
def get_job(caller: TenantDep, session: SessionDep, job_id: uuid.UUID) -> JobPublic:
    """A job's kind, state, progress, attempts, error and result links."""
    return job_public(crud.get_job(session=session, tenant_id=caller.tenant_id, job_id=job_id))
