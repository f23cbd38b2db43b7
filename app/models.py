"""Database tables (SQLAlchemy 2.0, typed). Every row a client can address carries its tenant."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    Uuid,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

JOB_KINDS = ("adapt", "meta_train", "evaluate")
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
TASK_STATUSES = ("adapting", "ready", "failed")
INITIALIZATION_STATUSES = ("pending", "ready", "failed", "retired")
ADAPT_MODES = ("full", "head")
PROMOTION_ACTIONS = ("initial", "promote", "auto_promote", "rollback")
SCOPES = ("user", "admin", "operator")
# The rows of jobs.uq_jobs_task_adapting (the same text in migration 0003).
ADAPTING = "kind = 'adapt' AND state IN ('queued', 'running')"

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp with time zone that always reads back as aware UTC (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime; use timezone-aware UTC timestamps")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JSONDoc = JSON().with_variant(JSONB(), "postgresql")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    """Declarative base with deterministic constraint names (so migrations match every database)."""

    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime, dict[str, Any]: JSONDoc}


class Tenant(Base):
    """A customer; owns keys, tasks, jobs, predictions and datasets."""

    __tablename__ = "tenants"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """An API key, stored only as a keyed hash; scopes: "user", optionally "admin", "operator"."""

    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    # The key's first characters, shown to people to tell keys apart; not a secret.
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list[str]] = mapped_column(JSON)
    name: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Written at most once a minute per key (app.keys.service.USE_RESOLUTION).
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    # None: the key does not expire.
    expires_at: Mapped[datetime | None]

    tenant: Mapped[Tenant] = relationship()


class Dataset(Base):
    """Meta-training data registered by an admin (a zip of one folder per class)."""

    __tablename__ = "datasets"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(200))
    artifact_key: Mapped[str] = mapped_column(String(500))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    class_count: Mapped[int] = mapped_column(Integer)
    image_count: Mapped[int] = mapped_column(Integer)
    # e.g. {"layout": "grouped", "groups": 30}
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


DEFAULT_DOMAIN = "handwritten characters"


class Initialization(Base):
    """A versioned meta-learned starting point; one global row per domain is active at a time.

    tenant_id None: a global version (shipped, imported or published by an operator), seen by
    every tenant. Otherwise the version belongs to the tenant whose run trained it, and only that
    tenant sees it or can use it.
    """

    __tablename__ = "initializations"
    __table_args__ = (
        CheckConstraint(_in("status", INITIALIZATION_STATUSES), name="status"),
        # At most one active row per domain; rollback finds the previous one by promoted_at.
        Index(
            "uq_initializations_active",
            "domain",
            unique=True,
            postgresql_where=text("is_active"),
            sqlite_where=text("is_active"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    version: Mapped[str] = mapped_column(String(100), unique=True)
    status: Mapped[str] = mapped_column(String(16), default="ready")
    # "shipped", "trained" or "imported"
    source: Mapped[str] = mapped_column(String(16))
    # What it knows ("handwritten characters", "photos"): fewshot ModelConfig.domain.
    domain: Mapped[str] = mapped_column(
        String(64), default=DEFAULT_DOMAIN, server_default=DEFAULT_DOMAIN
    )
    # Architecture and preprocessing (fewshot ModelConfig); for trained ones, the run's settings.
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    training_config: Mapped[dict[str, Any] | None]
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # Folder in the artifact store holding weights.safetensors and config.json.
    artifact_key: Mapped[str] = mapped_column(String(500))
    sha256: Mapped[str] = mapped_column(String(64))
    is_active: Mapped[bool] = mapped_column(default=False)
    promoted_at: Mapped[datetime | None]
    dataset_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("datasets.id", ondelete="SET NULL")
    )
    parent_version: Mapped[str | None] = mapped_column(String(100))
    tenant_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TenantDefault(Base):
    """A tenant's own default initialization; the newest unretired row is the one in force.

    Rolling back retires the newest row, so the one before it (or, with none left, the global
    active version) is in force again.
    """

    __tablename__ = "tenant_defaults"
    __table_args__ = (Index("ix_tenant_defaults_tenant_retired", "tenant_id", "retired_at"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    initialization_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("initializations.id", ondelete="CASCADE")
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    retired_at: Mapped[datetime | None]

    initialization: Mapped[Initialization] = relationship()


class Promotion(Base):
    """One change of the active initialization: which version became active, replacing which."""

    __tablename__ = "promotions"
    __table_args__ = (CheckConstraint(_in("action", PROMOTION_ACTIONS), name="action"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    action: Mapped[str] = mapped_column(String(16))
    # Plain version names, not foreign keys: the audit trail outlives any row it names.
    version: Mapped[str] = mapped_column(String(100))
    previous_version: Mapped[str | None] = mapped_column(String(100))
    # "key:<api key id>", "job:<meta-training job id>" or "system" (first start-up).
    actor: Mapped[str] = mapped_column(String(100))
    # None: a change of the global active version; otherwise of that tenant's own default.
    tenant_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class Task(Base):
    """A tenant's few-shot problem: its classes, support set and pinned initialization."""

    __tablename__ = "tasks"
    __table_args__ = (
        CheckConstraint(_in("status", TASK_STATUSES), name="status"),
        CheckConstraint(_in("mode", ADAPT_MODES), name="mode"),
        Index("ix_tasks_tenant_created", "tenant_id", "created_at", "id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default="adapting")
    # Distinct labels in order of first appearance: the column order of every prediction.
    labels: Mapped[list[str]] = mapped_column(JSON)
    mode: Mapped[str] = mapped_column(String(8), default="full")
    steps: Mapped[int | None]
    initialization_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("initializations.id"), index=True
    )
    support_set_sha256: Mapped[str] = mapped_column(String(64))
    example_count: Mapped[int] = mapped_column(Integer)
    # The task's own "unknown" threshold (None: the initialization's calibrated default).
    unknown_threshold: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    initialization: Mapped[Initialization] = relationship()
    examples: Mapped[list[SupportExample]] = relationship(
        back_populates="task",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="SupportExample.position",
    )


class SupportExample(Base):
    """One labelled support image: its bytes in the row when small, else a file in the task's
    artifact folder (content-addressed), never both."""

    __tablename__ = "support_examples"
    __table_args__ = (
        UniqueConstraint("task_id", "position"),
        CheckConstraint("(image_key IS NULL) <> (data IS NULL)", name="stored_once"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    task_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    label: Mapped[str] = mapped_column(String(200))
    image_key: Mapped[str | None] = mapped_column(String(500), nullable=True)
    # Images up to Settings.support_inline_max_bytes: committed with the row, so a task needs
    # no file (and no file's creation and fsyncs) until its weights are written.
    data: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    sha256: Mapped[str] = mapped_column(String(64))
    format: Mapped[str] = mapped_column(String(8))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(Integer)

    task: Mapped[Task] = relationship(back_populates="examples")


class Job(Base):
    """One unit of background work; this row, not the broker, is the truth about its state."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(_in("kind", JOB_KINDS), name="kind"),
        CheckConstraint(_in("state", JOB_STATES), name="state"),
        UniqueConstraint("tenant_id", "idempotency_key"),
        Index("ix_jobs_state_lease", "state", "lease_expires_at"),
        # One adaptation in progress per task, enforced by the database: two concurrent
        # re-adaptations cannot both pass a check-then-insert.
        Index(
            "uq_jobs_task_adapting",
            "task_id",
            unique=True,
            postgresql_where=text(ADAPTING),
            sqlite_where=text(ADAPTING),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    kind: Mapped[str] = mapped_column(String(16))
    queue: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default="queued")
    task_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("tasks.id", ondelete="CASCADE"), index=True
    )
    dataset_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("datasets.id", ondelete="SET NULL")
    )
    initialization_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("initializations.id"))
    # Inputs of the work (e.g. mode and steps, or meta-training settings).
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    # e.g. {"iteration": 120, "total": 1000, "eta_seconds": 80, "curve": [...]}
    progress_detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_expires_at: Mapped[datetime | None]
    # When a worker last re-sent the job's message (worker.reaper); null: only the first send.
    sent_at: Mapped[datetime | None]
    claimed_by: Mapped[str | None] = mapped_column(String(200))
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    result: Mapped[dict[str, Any] | None]
    cancel_requested_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class AdaptedModel(Base):
    """An initialization after the inner loop on one task's support set; one per adapt job."""

    __tablename__ = "adapted_models"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    task_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tasks.id", ondelete="CASCADE"), index=True
    )
    # Unique: a redelivered adapt message cannot record a second model.
    job_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), unique=True
    )
    initialization_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("initializations.id"))
    initialization_version: Mapped[str] = mapped_column(String(100))
    mode: Mapped[str] = mapped_column(String(8))
    steps: Mapped[int] = mapped_column(Integer)
    # None: the initialization's learned per-layer, per-step step sizes were used.
    step_size: Mapped[float | None] = mapped_column(Float)
    seed: Mapped[int] = mapped_column(Integer, default=0)
    support_set_sha256: Mapped[str] = mapped_column(String(64))
    support_accuracy: Mapped[float] = mapped_column(Float)
    labels: Mapped[list[str]] = mapped_column(JSON)
    weights_key: Mapped[str] = mapped_column(String(500))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    compute_seconds: Mapped[float] = mapped_column(Float)
    device: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Prediction(Base):
    """One query image's prediction, recorded with the model that made it."""

    __tablename__ = "predictions"
    __table_args__ = (Index("ix_predictions_task_created", "task_id", "created_at", "id"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    task_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    adapted_model_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("adapted_models.id", ondelete="CASCADE"), index=True
    )
    # Groups the images sent in one request, in their order.
    request_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    position: Mapped[int] = mapped_column(Integer)
    image_sha256: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(200))
    probabilities: Mapped[dict[str, Any]] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
