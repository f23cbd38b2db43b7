"""Initializations as one tenant sees them: which is in force for it, nothing of other tenants."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy.orm import Session

from app.initializations import registry
from app.initializations.schemas import InitializationList, InitializationPublic
from app.models import Initialization

# Metrics of a trained version that name its tenant's data or versions: dropped once the
# version is global (published by an operator), since every tenant then sees it.
_PRIVATE_METRICS = ("dataset", "baseline", "comparison")


def _metrics(row: Initialization) -> dict[str, Any]:
    metrics = dict(row.metrics or {})
    if row.tenant_id is None and row.source == "trained":
        for key in _PRIVATE_METRICS:
            metrics.pop(key, None)
    return metrics


def _public(
    row: Initialization,
    *,
    default: Initialization | None,
    global_active: Initialization | None,
    own_default_id: uuid.UUID | None,
    visible: set[str],
    domain_active: set[uuid.UUID],
) -> InitializationPublic:
    return InitializationPublic(
        version=row.version,
        status=row.status,
        source=row.source,
        scope="global" if row.tenant_id is None else "tenant",
        is_active=default is not None and default.id == row.id,
        domain=row.domain,
        is_global_default=global_active is not None and global_active.id == row.id,
        is_domain_default=row.id in domain_active,
        is_tenant_default=own_default_id == row.id,
        config=row.config,
        metrics=_metrics(row),
        sha256=row.sha256,
        parent_version=row.parent_version if row.parent_version in visible else None,
        promoted_at=row.promoted_at,
        created_at=row.created_at,
    )


def _context(
    session: Session, tenant_id: uuid.UUID
) -> tuple[Initialization | None, Initialization | None, uuid.UUID | None]:
    own = registry.tenant_default(session=session, tenant_id=tenant_id)
    return (
        registry.default_for(session=session, tenant_id=tenant_id),
        registry.active_initialization(session=session),
        None if own is None else own.initialization_id,
    )


def initialization_list(*, session: Session, tenant_id: uuid.UUID) -> InitializationList:
    """Global versions and the tenant's own, newest first, with the one in force for it."""
    rows: Sequence[Initialization] = registry.list_initializations(
        session=session, tenant_id=tenant_id
    )
    default, global_active, own_id = _context(session, tenant_id)
    visible = {row.version for row in rows}
    actives = registry.active_versions(session=session)
    return InitializationList(
        items=[
            _public(
                row,
                default=default,
                global_active=global_active,
                own_default_id=own_id,
                visible=visible,
                domain_active={a.id for a in actives},
            )
            for row in rows
        ],
        active_version=None if default is None else default.version,
        global_version=None if global_active is None else global_active.version,
        domain_versions={a.domain: a.version for a in actives},
    )


def initialization_one(
    *, session: Session, tenant_id: uuid.UUID, version: str
) -> InitializationPublic:
    """One version the tenant sees, or 404."""
    row = registry.get_initialization(session=session, version=version, tenant_id=tenant_id)
    default, global_active, own_id = _context(session, tenant_id)
    visible = (
        registry.visible_versions(session=session, tenant_id=tenant_id)
        if row.parent_version
        else set()
    )
    domain_active = registry.active_initialization(session=session, domain=row.domain)
    return _public(
        row, default=default, global_active=global_active, own_default_id=own_id, visible=visible,
        domain_active=set() if domain_active is None else {domain_active.id},
    )  # fmt: skip
