"""/v1/jobs: where background work stands."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.core.schemas import KEYED, problem_responses
from app.deps import Caller, DispatcherDep, RuntimeDep, SessionDep, TenantDep
from app.jobs import service as jobs
from app.jobs.schemas import JobPublic
from app.jobs.service import job_public

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def _read(session: Session, caller: Caller, job_id: uuid.UUID) -> JobPublic:
    public = job_public(jobs.get_job(session=session, tenant_id=caller.tenant_id, job_id=job_id))
    # Ends the read: no connection is held while the request waits.
    session.commit()
    return public


@router.get(
    "/{job_id}",
    response_model=JobPublic,
    responses=problem_responses(*KEYED, 404, 422),
)
async def get_job(
    caller: TenantDep,
    session: SessionDep,
    runtime: RuntimeDep,
    dispatcher: DispatcherDep,
    job_id: uuid.UUID,
    wait: Annotated[
        float | None,
        Query(
            ge=0,
            description="Seconds to wait for the job to end (succeeded, failed or cancelled) "
            "before answering; bounded by the server's max_wait_seconds.",
        ),
    ] = None,
) -> JobPublic:
    """A job's kind, state, progress, attempts, error and result links (with ?wait: once it ends)."""
    # Async, with the database work on the thread pool: a ?wait holds no thread and no
    # connection while it waits.
    public = await run_in_threadpool(_read, session, caller, job_id)
    if wait and public.state in ("queued", "running"):
        await jobs.wait_for_job_async(
            runtime=runtime,
            dispatcher=dispatcher,
            job_id=job_id,
            timeout=min(wait, runtime.settings.max_wait_seconds),
        )
        session.expire_all()
        public = await run_in_threadpool(_read, session, caller, job_id)
    return public
