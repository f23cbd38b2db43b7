"""Admission of new adaptations: past the backlog bounds a request is answered, not queued.

Counting queued adapt jobs is one indexed query per bound, each stopped at the bound plus one
row, so its cost does not grow with the line it guards against. Every job already accepted
still runs; only new ones are refused (429 for a tenant over its share, 503 when the whole
service is), with Retry-After.
"""

from __future__ import annotations

import uuid

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.errors import ProblemError
from app.models import Job


class TenantBacklogFull(ProblemError):
    """This tenant has as many adaptations waiting as it may (429)."""

    status = 429
    code = "too_many_queued_adaptations"


class BacklogFull(ProblemError):
    """The service has as many adaptations waiting as it takes (503)."""

    status = 503
    code = "adaptation_backlog_full"


def queued_adaptations(session: Session, limit: int, tenant_id: uuid.UUID | None = None) -> int:
    """Queued adapt jobs (of one tenant, or all), counted up to `limit` + 1 at most."""
    query = select(Job.id).where(Job.state == "queued", Job.kind == "adapt")
    if tenant_id is not None:
        query = query.where(Job.tenant_id == tenant_id)
    bounded = query.limit(limit + 1).subquery()
    return int(session.scalar(select(func.count()).select_from(bounded)) or 0)


def admit_adaptation(session: Session, settings: Settings, tenant_id: uuid.UUID) -> None:
    """Raise 429 or 503 (with Retry-After) when one more adapt job would pass a backlog bound."""
    retry = {"Retry-After": str(settings.retry_after_seconds)}
    tenant_limit = settings.max_queued_adaptations_per_tenant
    if queued_adaptations(session, tenant_limit, tenant_id) >= tenant_limit:
        raise TenantBacklogFull(
            f"this tenant already has {tenant_limit} adaptations waiting; retry after the "
            "Retry-After delay",
            headers=retry,
        )
    limit = settings.max_queued_adaptations
    if queued_adaptations(session, limit) >= limit:
        raise BacklogFull(
            "the service is adapting at capacity; retry after the Retry-After delay",
            headers=retry,
        )
