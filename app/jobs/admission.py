"""Admission of new adaptations: past the backlog bounds a request is answered, not queued.

Counting queued adapt jobs is one indexed scan per bound (both in one statement), each stopped
at the bound plus one row, so its cost does not grow with the line it guards against. Every job
already accepted still runs; only new ones are refused (429 for a tenant over its share, 503 when
the whole service is), with Retry-After.
"""

from __future__ import annotations

import functools
import uuid
from typing import Any

from sqlalchemy import Integer, ScalarSelect, Select, bindparam, func, select
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


def _queued(limit: Any, tenant_id: Any = None) -> ScalarSelect[int]:
    """Queued adapt jobs (of one tenant, or all), counted up to `limit` + 1 at most."""
    query = select(Job.id).where(Job.state == "queued", Job.kind == "adapt")
    if tenant_id is not None:
        query = query.where(Job.tenant_id == tenant_id)
    bounded = query.limit(limit + 1).subquery()
    return select(func.count()).select_from(bounded).scalar_subquery()


@functools.cache
def _both_bounds() -> Select[int, int]:
    # Built once, with the tenant and the limits as parameters: made per request, the two
    # bounded subqueries cost more CPU than the query.
    return select(
        _queued(bindparam("tenant_limit", type_=Integer), bindparam("tenant_id")),
        _queued(bindparam("limit", type_=Integer)),
    )


def admit_adaptation(session: Session, settings: Settings, tenant_id: uuid.UUID) -> None:
    """Raise 429 or 503 (with Retry-After) when one more adapt job would pass a backlog bound.

    Both bounds are counted in one statement.
    """
    retry = {"Retry-After": str(settings.retry_after_seconds)}
    tenant_limit = settings.max_queued_adaptations_per_tenant
    limit = settings.max_queued_adaptations
    counts = session.execute(
        _both_bounds(), {"tenant_limit": tenant_limit, "tenant_id": tenant_id, "limit": limit}
    ).one()
    if int(counts[0] or 0) >= tenant_limit:
        raise TenantBacklogFull(
            f"this tenant already has {tenant_limit} adaptations waiting; retry after the "
            "Retry-After delay",
            headers=retry,
        )
    if int(counts[1] or 0) >= limit:
        raise BacklogFull(
            "the service is adapting at capacity; retry after the Retry-After delay",
            headers=retry,
        )
