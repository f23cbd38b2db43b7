"""/v1/jobs: where background work stands."""

from __future__ import annotations

import uuid

from fastapi import APIRouter

from app.core.schemas import problem_responses
from app.deps import SessionDep, TenantDep
from app.jobs import service as jobs
from app.jobs.schemas import JobPublic
from app.jobs.service import job_public

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.get(
    "/{job_id}",
    response_model=JobPublic,
    responses=problem_responses(401, 404),
)
def get_job(caller: TenantDep, session: SessionDep, job_id: uuid.UUID) -> JobPublic:
    """A job's kind, state, progress, attempts, error and result links."""
    return job_public(jobs.get_job(session=session, tenant_id=caller.tenant_id, job_id=job_id))
