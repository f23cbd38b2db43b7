"""The audit trail of changes to the global active initialization and to tenants' defaults."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from app.models import ApiKey, Job, Promotion, Tenant

# What a tenant sees instead of an actor from outside it (e.g. an operator's key id).
HIDDEN_ACTOR = "operator"


@dataclass(frozen=True)
class PromotionView:
    """One audit row as a caller may see it."""

    action: str
    version: str
    previous_version: str | None
    actor: str
    scope: str
    tenant: str | None
    created_at: datetime


def record_promotion(
    *,
    session: Session,
    action: str,
    version: str,
    previous: str | None,
    actor: str,
    tenant_id: uuid.UUID | None = None,
) -> None:
    """Add an audit row for a change of a default version (committed with that change)."""
    session.add(
        Promotion(
            action=action,
            version=version,
            previous_version=previous,
            actor=actor,
            tenant_id=tenant_id,
        )
    )


def _own_actors(session: Session, tenant_id: uuid.UUID, actors: set[str]) -> set[str]:
    """The actors among `actors` that are keys or jobs of the tenant."""
    ids: dict[str, list[uuid.UUID]] = {"key": [], "job": []}
    for actor in actors:
        kind, _, raw = actor.partition(":")
        if kind in ids:
            try:
                ids[kind].append(uuid.UUID(raw))
            except ValueError:
                continue
    own = {
        f"key:{i}"
        for i in session.scalars(
            select(ApiKey.id).where(ApiKey.id.in_(ids["key"]), ApiKey.tenant_id == tenant_id)
        )
    }
    own |= {
        f"job:{i}"
        for i in session.scalars(
            select(Job.id).where(Job.id.in_(ids["job"]), Job.tenant_id == tenant_id)
        )
    }
    return own


def list_promotions(
    *, session: Session, limit: int, tenant_id: uuid.UUID, everything: bool
) -> list[PromotionView]:
    """Changes newest first: the tenant's own and the global ones, or every tenant's (operator).

    A tenant sees a global change's actor only when it is one of its own keys or jobs.
    """
    query = select(Promotion, Tenant.name).outerjoin(Tenant, Tenant.id == Promotion.tenant_id)
    if not everything:
        query = query.where(or_(Promotion.tenant_id.is_(None), Promotion.tenant_id == tenant_id))
    rows: Sequence[tuple[Promotion, str | None]] = [
        (p, name)
        for p, name in session.execute(
            query.order_by(Promotion.created_at.desc(), Promotion.id).limit(limit)
        )
    ]
    shown: set[str] | None = None
    if not everything:
        foreign = {p.actor for p, _ in rows if p.tenant_id is None and p.actor != "system"}
        shown = _own_actors(session, tenant_id, foreign) | {"system"}
    return [
        PromotionView(
            action=p.action,
            version=p.version,
            previous_version=p.previous_version,
            actor=p.actor
            if shown is None or p.tenant_id is not None or p.actor in shown
            else HIDDEN_ACTOR,
            scope="global" if p.tenant_id is None else "tenant",
            tenant=name if everything else None,
            created_at=p.created_at,
        )
        for p, name in rows
    ]
