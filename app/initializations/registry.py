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

from app.core import ml
from app.core.errors import Conflict, NotFound
from app.core.storage import ArtifactStore, initialization_key, sha256_file
from app.initializations import audit
from app.models import DEFAULT_DOMAIN, Initialization, TenantDefault, utcnow

log = logging.getLogger(__name__)


def active_initialization(
    *, session: Session, domain: str = DEFAULT_DOMAIN
) -> Initialization | None:
    """A domain's global active version; the default domain's serves tasks that name none."""
    return session.scalar(
        select(Initialization).where(
            Initialization.is_active.is_(True), Initialization.domain == domain
        )
    )


def active_versions(*, session: Session) -> Sequence[Initialization]:
    """Every domain's global active version, by domain."""
    return session.scalars(
        select(Initialization)
        .where(Initialization.is_active.is_(True))
        .order_by(Initialization.domain)
    ).all()


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
    """The version a tenant's new tasks adapt from: its own default, else the default domain's.

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
        select(Initialization.id)
        .where(Initialization.is_active.is_(True), Initialization.domain == DEFAULT_DOMAIN)
        .limit(1)
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
    *,
    session: Session,
    store: ArtifactStore,
    folder: Path,
    source: str,
    activate: bool | None,
) -> Initialization:
    """Copy an initialization folder into the store and record it (optionally as the active one).

    activate None: active when its domain has no active version yet.
    """
    init = ml.Initialization.load(folder)
    domain = init.config.domain[:64]
    if activate is None:
        activate = active_initialization(session=session, domain=domain) is None
    weights_sha = sha256_file(folder / "weights.safetensors")
    version = folder_version(init.metadata, weights_sha, source)
    key = initialization_key(version)
    store.put_tree(key, folder)
    # Read back: what the row will name must be what was registered.
    store.local_file(f"{key}/weights.safetensors", weights_sha)
    now = utcnow()
    row = Initialization(
        version=version,
        status="ready",
        source=source,
        domain=domain,
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


def ensure_initializations(
    *, session: Session, store: ArtifactStore, folders: Sequence[Path]
) -> Sequence[Initialization]:
    """Register the configured initialization folders; idempotent. Returns the active versions.

    A folder whose domain has no version yet becomes that domain's active version (so a new
    shipped domain is served on upgrade). A version not seen before in a domain that has some
    (e.g. a newer shipped one) is registered as available, not active: switching what new tasks
    adapt from stays an admin's call (POST .../promote).
    """
    for folder in folders:
        if not (folder / "weights.safetensors").is_file():
            continue
        init = ml.Initialization.load(folder)
        weights_sha = sha256_file(folder / "weights.safetensors")
        version = folder_version(init.metadata, weights_sha, "shipped")
        if session.scalar(select(Initialization.id).where(Initialization.version == version)):
            continue
        domain = init.config.domain[:64]
        first = not session.scalar(
            select(func.count()).select_from(Initialization).where(Initialization.domain == domain)
        )
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
    return active_versions(session=session)


def ready_version(session: Session, version: str, tenant_id: uuid.UUID) -> Initialization:
    """A version the tenant sees and that is ready, or 404 / 409."""
    row = get_initialization(session=session, version=version, tenant_id=tenant_id)
    if row.status != "ready":
        raise Conflict(
            f"initialization {version!r} is {row.status}, not ready",
            code="initialization_not_ready",
        )
    return row
