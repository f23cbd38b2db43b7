"""The audit trail of changes to the active initialization."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import (
    Promotion,
)


def record_promotion(
    *, session: Session, action: str, version: str, previous: str | None, actor: str
) -> None:
    """Add an audit row for a change of the active version (committed with that change)."""
    session.add(Promotion(action=action, version=version, previous_version=previous, actor=actor))


def list_promotions(*, session: Session, limit: int) -> Sequence[Promotion]:
    """Changes of the active version, newest first."""
    return session.scalars(
        select(Promotion).order_by(Promotion.created_at.desc(), Promotion.id).limit(limit)
    ).all()
