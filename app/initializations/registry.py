"""The versions of meta-learned initializations: lookup and registration."""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, Select, bindparam, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.errors import Conflict, NotFound
from app.core.storage import ArtifactStore, initialization_key, sha256_file
from app.initializations import audit
from app.models import Initialization, TenantDefault, utcnow

log = logging.getLogger(__name__)


def active_initialization(*, session: Session) -> Initialization | None:
    """The global active initialization: new tasks of tenants without a default of their own."""
    return session.scalar(select(Initialization).where(Initialization.is_active.is_(True)))


def visible_to(tenant_id: uuid.UUID) -> ColumnElement[bool]:
    """Versions a tenant may see and use: the global ones and its own."""
    return or_(Initialization.tenant_id.is_(None), Initialization.tenant_id == tenant_id)


def tenant_default(*, session: Session, tenant_id: uuid.UUID) -> TenantDefault | None:
    """The tenant's own default in force (the newest unretired one), or None."""
    return session.scalar(
        select(TenantDefault)
        .where(TenantDefault.tenant_id == tenant_id, TenantDefault.retired_at.is_(None))
        .order_by(TenantDefault.created_at.desc(), TenantDefault.id.desc())
        .limit(1)
    )


def default_for(*, session: Session, tenant_id: uuid.UUID) -> Initialization | None:
    """The version a tenant's new tasks adapt from: its own default, else the global active one.

    One query (each new task asks): the newest unretired default of the tenant when its
    version is ready, else the active one.
    """
    return session.scalar(_default_statement(), {"tenant_id": tenant_id})


@functools.cache
def _default_statement() -> Select[Initialization]:
    # Built once: the statement is the same for every tenant.
    own = (
        select(TenantDefault.initialization_id)
        .where(
            TenantDefault.tenant_id == bindparam("tenant_id"), TenantDefault.retired_at.is_(None)
        )
        .order_by(TenantDefault.created_at.desc(), TenantDefault.id.desc())
        .limit(1)
        .scalar_subquery()
    )
    own_ready = (
        select(Initialization.id)
        .where(Initialization.id == own, Initialization.status == "ready")
        .scalar_subquery()
    )
    active = (
        select(Initialization.id).where(Initialization.is_active.is_(True)).limit(1)
    ).scalar_subquery()
    return select(Initialization).where(Initialization.id == func.coalesce(own_ready, active))


def list_initializations(*, session: Session, tenant_id: uuid.UUID) -> Sequence[Initialization]:
    """The versions a tenant sees (global and its own), newest first."""
    return session.scalars(
        select(Initialization)
        .where(visible_to(tenant_id))
        .order_by(Initialization.created_at.desc())
    ).all()


def visible_versions(*, session: Session, tenant_id: uuid.UUID) -> set[str]:
    """The names of the versions a tenant sees."""
    return set(session.scalars(select(Initialization.version).where(visible_to(tenant_id))))


def get_initialization(*, session: Session, version: str, tenant_id: uuid.UUID) -> Initialization:
    """One version by name, or 404 (also for another tenant's, answered as for an unknown one)."""
    row = session.scalar(
        select(Initialization).where(Initialization.version == version, visible_to(tenant_id))
    )
    if row is None:
        raise NotFound(
            f"no initialization with version {version!r}; GET /v1/initializations lists them"
        )
    return row


def folder_version(metadata: dict[str, Any], weights_sha: str, source: str) -> str:
    """The version an initialization folder is registered under: its own, or source-sha256."""
    return str(metadata.get("version") or f"{source}-{weights_sha[:12]}")


def register_initialization_folder(
    *, session: Session, store: ArtifactStore, folder: Path, source: str, activate: bool
) -> Initialization:
    """Copy an initialization folder into the store and record it (optionally as the active one)."""
    import fewshot

    init = fewshot.Initialization.load(folder)
    weights_sha = sha256_file(folder / "weights.safetensors")
    version = folder_version(init.metadata, weights_sha, source)
    key = initialization_key(version)
    store.copy_tree_in(folder, key)
    store.verify(f"{key}/weights.safetensors", weights_sha)
    now = utcnow()
    row = Initialization(
        version=version,
        status="ready",
        source=source,
        config=init.config.to_dict(),
        training_config=init.metadata.get("training"),
        metrics=dict(init.metadata.get("metrics") or {}),
        artifact_key=key,
        sha256=weights_sha,
        is_active=activate,
        promoted_at=now if activate else None,
    )
    session.add(row)
    if activate:
        audit.record_promotion(
            session=session, action="initial", version=version, previous=None, actor="system"
        )
    session.flush()
    return row


def ensure_initialization(
    *, session: Session, store: ArtifactStore, folder: Path
) -> Initialization | None:
    """Register `folder` (the configured initialization); idempotent.

    On an empty table it becomes the active version. Otherwise a version not seen before (e.g.
    a newer shipped one after an upgrade) is registered as available, not active: switching what
    every new task adapts from stays an admin's call (POST .../promote).
    """
    if not (folder / "weights.safetensors").is_file():
        return active_initialization(session=session)
    first = not session.scalar(select(func.count()).select_from(Initialization))
    if not first:
        import fewshot

        metadata = fewshot.Initialization.load(folder).metadata
        version = folder_version(metadata, sha256_file(folder / "weights.safetensors"), "shipped")
        if session.scalar(select(Initialization.id).where(Initialization.version == version)):
            return active_initialization(session=session)
    try:
        row = register_initialization_folder(
            session=session, store=store, folder=folder, source="shipped", activate=first
        )
        session.commit()
        if not first:
            log.info(
                "registered initialization %s (not active; promote it with "
                "POST /v1/admin/initializations/%s/promote)", row.version, row.version,
            )  # fmt: skip
    except IntegrityError:
        # Another process registered it first.
        session.rollback()
    return active_initialization(session=session)


def ready_version(session: Session, version: str, tenant_id: uuid.UUID) -> Initialization:
    """A version the tenant sees and that is ready, or 404 / 409."""
    row = get_initialization(session=session, version=version, tenant_id=tenant_id)
    if row.status != "ready":
        raise Conflict(
            f"initialization {version!r} is {row.status}, not ready",
            code="initialization_not_ready",
        )
    return row
