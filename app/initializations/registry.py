"""The versions of meta-learned initializations: lookup and registration."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.errors import Conflict, NotFound
from app.core.storage import ArtifactStore, initialization_key, sha256_file
from app.initializations import audit
from app.models import Initialization, utcnow

log = logging.getLogger(__name__)


def active_initialization(*, session: Session) -> Initialization | None:
    """The initialization new tasks adapt from."""
    return session.scalar(select(Initialization).where(Initialization.is_active.is_(True)))


def list_initializations(*, session: Session) -> Sequence[Initialization]:
    """Every version, newest first."""
    return session.scalars(select(Initialization).order_by(Initialization.created_at.desc())).all()


def get_initialization(*, session: Session, version: str) -> Initialization:
    """One version by name, or 404."""
    row = session.scalar(select(Initialization).where(Initialization.version == version))
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


def ready_version(session: Session, version: str) -> Initialization:
    row = get_initialization(session=session, version=version)
    if row.status != "ready":
        raise Conflict(
            f"initialization {version!r} is {row.status}, not ready",
            code="initialization_not_ready",
        )
    return row
