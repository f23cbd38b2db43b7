"""Which version is in service: the global active one (operators) and each tenant's own default.

Promotion, rollback and their audit trail.
"""

from __future__ import annotations

import uuid

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.errors import Conflict
from app.initializations import audit, registry
from app.models import (
    DEFAULT_DOMAIN,
    Initialization,
    TenantDefault,
    utcnow,
)


def _concurrent() -> Conflict:
    return Conflict(
        "another promotion happened at the same time; try again", code="promotion_conflict"
    )


# --- the global active version (operator scope) -----------------------------------------------


def make_active(
    *, session: Session, row: Initialization, action: str, actor: str
) -> Initialization | None:
    """Activate `row` globally in place of the active version, audited, uncommitted.

    Returns the replaced version. A version owned by a tenant becomes global (published): it
    now serves every tenant, so every tenant sees it.
    """
    current = registry.active_initialization(session=session, domain=row.domain)
    if current is not None:
        current.is_active = False
        # The partial unique index allows one active row: flush the old one off first.
        session.flush()
    row.is_active, row.promoted_at, row.tenant_id = True, utcnow(), None
    audit.record_promotion(
        session=session,
        action=action,
        version=row.version,
        previous=None if current is None else current.version,
        actor=actor,
    )
    return current


def promote(
    *, session: Session, version: str, actor: str, tenant_id: uuid.UUID
) -> tuple[Initialization, str | None]:
    """Make a version (global, or the operator's tenant's own) its domain's global active one."""
    row = registry.ready_version(session, version, tenant_id)
    current = registry.active_initialization(session=session, domain=row.domain)
    if current is not None and current.id == row.id:
        return row, None
    try:
        make_active(session=session, row=row, action="promote", actor=actor)
        session.commit()
    except IntegrityError:
        session.rollback()
        raise _concurrent() from None
    return row, None if current is None else current.version


def rollback(
    *, session: Session, actor: str, tenant_id: uuid.UUID, version: str | None = None
) -> tuple[Initialization, str]:
    """Return to the version that was active before the current one, in one domain.

    The domain is the named version's, else the default domain.
    """
    domain = DEFAULT_DOMAIN
    if version is not None:
        domain = registry.get_initialization(
            session=session, version=version, tenant_id=tenant_id
        ).domain
    current = registry.active_initialization(session=session, domain=domain)
    if current is None or current.promoted_at is None:
        raise Conflict(f"no {domain} version is active", code="no_active_initialization")
    if version is not None and version != current.version:
        raise Conflict(
            f"{version} is not the active version ({current.version} is); only the active "
            "version can be rolled back",
            code="not_active",
        )
    previous = session.scalar(
        select(Initialization)
        .where(
            Initialization.id != current.id,
            Initialization.domain == current.domain,
            Initialization.tenant_id.is_(None),
            Initialization.status == "ready",
            Initialization.promoted_at.is_not(None),
            Initialization.promoted_at <= current.promoted_at,
        )
        .order_by(Initialization.promoted_at.desc())
        .limit(1)
    )
    if previous is None:
        raise Conflict(
            f"{current.version} is the first version ever promoted; there is nothing to roll "
            "back to",
            code="no_previous_version",
        )
    try:
        # Leaving the promotion history, so a second rollback steps one version further back.
        current.is_active, current.promoted_at = False, None
        session.flush()
        previous.is_active = True
        audit.record_promotion(
            session=session,
            action="rollback",
            version=previous.version,
            previous=current.version,
            actor=actor,
        )
        session.commit()
    except IntegrityError:
        session.rollback()
        raise _concurrent() from None
    return previous, current.version


# --- a tenant's own default (admin scope) -----------------------------------------------------


def make_tenant_default(
    *, session: Session, row: Initialization, tenant_id: uuid.UUID, action: str, actor: str
) -> Initialization | None:
    """Make `row` the tenant's default, audited, uncommitted; returns the version it replaced."""
    current = registry.default_for(session=session, tenant_id=tenant_id)
    session.add(TenantDefault(tenant_id=tenant_id, initialization_id=row.id))
    audit.record_promotion(
        session=session,
        action=action,
        version=row.version,
        previous=None if current is None else current.version,
        actor=actor,
        tenant_id=tenant_id,
    )
    return current


def promote_for_tenant(
    *, session: Session, version: str, actor: str, tenant_id: uuid.UUID
) -> tuple[Initialization, str | None]:
    """Make a version (global or the tenant's own) the one the tenant's new tasks adapt from."""
    row = registry.ready_version(session, version, tenant_id)
    current = registry.default_for(session=session, tenant_id=tenant_id)
    if current is not None and current.id == row.id:
        return row, None
    make_tenant_default(
        session=session, row=row, tenant_id=tenant_id, action="promote", actor=actor
    )
    session.commit()
    return row, None if current is None else current.version


def rollback_for_tenant(
    *, session: Session, actor: str, tenant_id: uuid.UUID, version: str | None = None
) -> tuple[Initialization, str]:
    """Retire the tenant's default: the one before it, or the global active one, is in force."""
    own = registry.tenant_default(session=session, tenant_id=tenant_id)
    current = registry.default_for(session=session, tenant_id=tenant_id)
    if version is not None and (current is None or version != current.version):
        registry.get_initialization(session=session, version=version, tenant_id=tenant_id)
        raise Conflict(
            f"{version} is not your tenant's default version"
            + ("" if current is None else f" ({current.version} is)")
            + "; only the default can be rolled back",
            code="not_active",
        )
    if own is None or current is None:
        raise Conflict(
            "your tenant has no default of its own (it follows the global active version); "
            "there is nothing to roll back to",
            code="no_previous_version",
        )
    retired = session.execute(
        update(TenantDefault)
        .where(TenantDefault.id == own.id, TenantDefault.retired_at.is_(None))
        .values(retired_at=utcnow())
    )
    if retired.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        raise _concurrent()
    session.expire_all()
    now = registry.default_for(session=session, tenant_id=tenant_id)
    if now is None:
        session.rollback()
        raise Conflict("no version is active", code="no_active_initialization")
    audit.record_promotion(
        session=session,
        action="rollback",
        version=now.version,
        previous=current.version,
        actor=actor,
        tenant_id=tenant_id,
    )
    session.commit()
    return now, current.version
