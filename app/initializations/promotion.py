"""Which version is active: promotion, rollback and their audit trail."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.errors import Conflict
from app.initializations import audit, registry
from app.models import (
    Initialization,
    utcnow,
)


def make_active(
    *, session: Session, row: Initialization, action: str, actor: str
) -> Initialization | None:
    """Activate `row` in place of the active version, audited, uncommitted; returns the replaced."""
    current = registry.active_initialization(session=session)
    if current is not None:
        current.is_active = False
        # The partial unique index allows one active row: flush the old one off first.
        session.flush()
    row.is_active, row.promoted_at = True, utcnow()
    audit.record_promotion(
        session=session,
        action=action,
        version=row.version,
        previous=None if current is None else current.version,
        actor=actor,
    )
    return current


def promote(*, session: Session, version: str, actor: str) -> tuple[Initialization, str | None]:
    """Make a version the active one; returns it and the version it replaced."""
    row = registry.ready_version(session, version)
    current = registry.active_initialization(session=session)
    if current is not None and current.id == row.id:
        return row, None
    try:
        make_active(session=session, row=row, action="promote", actor=actor)
        session.commit()
    except IntegrityError:
        session.rollback()
        raise Conflict(
            "another promotion happened at the same time; try again", code="promotion_conflict"
        ) from None
    return row, None if current is None else current.version


def rollback(
    *, session: Session, actor: str, version: str | None = None
) -> tuple[Initialization, str]:
    """Return to the version that was active before the current one (`version`, when named)."""
    current = registry.active_initialization(session=session)
    if current is None or current.promoted_at is None:
        raise Conflict("no version is active", code="no_active_initialization")
    if version is not None and version != current.version:
        registry.get_initialization(session=session, version=version)
        raise Conflict(
            f"{version} is not the active version ({current.version} is); only the active "
            "version can be rolled back",
            code="not_active",
        )
    previous = session.scalar(
        select(Initialization)
        .where(
            Initialization.id != current.id,
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
        raise Conflict(
            "another promotion happened at the same time; try again", code="promotion_conflict"
        ) from None
    return previous, current.version
