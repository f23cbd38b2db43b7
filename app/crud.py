"""Data functions: every read that takes an id is scoped to the caller's tenant."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Select, and_, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.security import display_prefix, generate_key, hash_key
from app.errors import InvalidRequest, NotFound
from app.models import (
    AdaptedModel,
    ApiKey,
    Initialization,
    Job,
    Prediction,
    Promotion,
    Task,
    Tenant,
    utcnow,
)
from app.storage import ArtifactStore, initialization_key, sha256_file

log = logging.getLogger(__name__)

T = TypeVar("T", Task, Prediction)


# --- tenants and keys -------------------------------------------------------------------------


def get_or_create_tenant(*, session: Session, name: str) -> Tenant:
    """The tenant with this name, created if it does not exist."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(name=name)
        session.add(tenant)
        session.flush()
    return tenant


def create_api_key(
    *, session: Session, tenant: Tenant, admin: bool, pepper: str, name: str | None = None
) -> tuple[ApiKey, str]:
    """A new key row and the plaintext key (shown once; only its hash is stored)."""
    key = generate_key()
    scopes = ["user", "admin"] if admin else ["user"]
    row = ApiKey(
        tenant_id=tenant.id,
        prefix=display_prefix(key),
        key_hash=hash_key(key, pepper),
        scopes=scopes,
        name=name,
    )
    session.add(row)
    session.flush()
    return row, key


def authenticate(*, session: Session, key: str, pepper: str) -> ApiKey | None:
    """The live key row matching a presented key, or None."""
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key, pepper)))
    if row is None or row.revoked_at is not None:
        return None
    return row


# --- initializations --------------------------------------------------------------------------


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


def record_promotion(
    *, session: Session, action: str, version: str, previous: str | None, actor: str
) -> None:
    """Add an audit row for a change of the active version (committed with that change)."""
    session.add(Promotion(action=action, version=version, previous_version=previous, actor=actor))


def make_active(
    *, session: Session, row: Initialization, action: str, actor: str
) -> Initialization | None:
    """Activate `row` in place of the active version, audited, uncommitted; returns the replaced."""
    current = active_initialization(session=session)
    if current is not None:
        current.is_active = False
        # The partial unique index allows one active row: flush the old one off first.
        session.flush()
    row.is_active, row.promoted_at = True, utcnow()
    record_promotion(
        session=session,
        action=action,
        version=row.version,
        previous=None if current is None else current.version,
        actor=actor,
    )
    return current


def list_promotions(*, session: Session, limit: int) -> Sequence[Promotion]:
    """Changes of the active version, newest first."""
    return session.scalars(
        select(Promotion).order_by(Promotion.created_at.desc(), Promotion.id).limit(limit)
    ).all()


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
        record_promotion(
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


# --- tasks ------------------------------------------------------------------------------------


def get_task(*, session: Session, tenant_id: uuid.UUID, task_id: uuid.UUID) -> Task:
    """The tenant's task, or 404 (also for another tenant's task)."""
    task = session.scalar(select(Task).where(Task.id == task_id, Task.tenant_id == tenant_id))
    if task is None:
        raise NotFound(f"no task {task_id}")
    return task


def current_adapted_model(*, session: Session, task_id: uuid.UUID) -> AdaptedModel | None:
    """The task's newest adapted model (predictions use it)."""
    return session.scalar(
        select(AdaptedModel)
        .where(AdaptedModel.task_id == task_id)
        .order_by(AdaptedModel.created_at.desc(), AdaptedModel.id.desc())
        .limit(1)
    )


def latest_job(*, session: Session, task_id: uuid.UUID) -> Job | None:
    """The task's newest adapt job."""
    return session.scalar(
        select(Job)
        .where(Job.task_id == task_id)
        .order_by(Job.created_at.desc(), Job.id.desc())
        .limit(1)
    )


def find_idempotent_job(*, session: Session, tenant_id: uuid.UUID, key: str) -> Job | None:
    """The job an earlier request with the same Idempotency-Key created."""
    return session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key))


def get_job(*, session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID) -> Job:
    """The tenant's job, or 404."""
    job = session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id))
    if job is None:
        raise NotFound(f"no job {job_id}")
    return job


# --- pagination -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Page:
    """One page of rows and the cursor of the next, if any."""

    items: list[Any]
    next_cursor: str | None


def encode_cursor(created_at: datetime, row_id: uuid.UUID) -> str:
    """An opaque cursor pointing just after a row in (created_at, id) descending order."""
    raw = json.dumps({"t": created_at.isoformat(), "id": str(row_id)}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """The (created_at, id) a cursor points after; 422 for a cursor this service did not make."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = json.loads(raw)
        at = datetime.fromisoformat(data["t"])
        if at.tzinfo is None:
            # Cursors carry aware UTC timestamps; the timestamp columns refuse naive ones.
            raise ValueError("naive timestamp")
        return at.astimezone(UTC), uuid.UUID(data["id"])
    except (binascii.Error, ValueError, KeyError, TypeError, OverflowError, RecursionError):
        raise InvalidRequest(
            "cursor is not valid; pass the next_cursor of a previous page", code="invalid_cursor"
        ) from None


def paginate(
    *, session: Session, query: Select[T], model: type[T], limit: int, cursor: str | None
) -> Page:
    """Keyset pagination, newest first, stable under inserts."""
    if cursor is not None:
        at, after_id = decode_cursor(cursor)
        query = query.where(
            or_(model.created_at < at, and_(model.created_at == at, model.id < after_id))
        )
    rows = list(
        session.scalars(query.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1))
    )
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = encode_cursor(rows[-1].created_at, rows[-1].id) if more and rows else None
    return Page(items=rows, next_cursor=next_cursor)


def list_tasks(*, session: Session, tenant_id: uuid.UUID, limit: int, cursor: str | None) -> Page:
    """The tenant's tasks, newest first."""
    query = select(Task).where(Task.tenant_id == tenant_id)
    return paginate(session=session, query=query, model=Task, limit=limit, cursor=cursor)


def list_predictions(
    *, session: Session, tenant_id: uuid.UUID, task_id: uuid.UUID, limit: int, cursor: str | None
) -> Page:
    """A task's recorded predictions, newest first."""
    query = select(Prediction).where(
        Prediction.tenant_id == tenant_id, Prediction.task_id == task_id
    )
    return paginate(session=session, query=query, model=Prediction, limit=limit, cursor=cursor)


def label_counts(task: Task) -> dict[str, int]:
    """Support images per label, in the task's label order."""
    counts = dict.fromkeys(task.labels, 0)
    for example in task.examples:
        counts[example.label] = counts.get(example.label, 0) + 1
    return counts
