"""Migrations on a database with data: 0003 gives trained versions their tenant and resolves
duplicate adaptations in progress before its unique index; 0004 moves task thresholds over."""

from __future__ import annotations

import uuid
from pathlib import Path

from sqlalchemy import Connection, create_engine, text

from app.core.config import Settings
from app.core.migrate import upgrade


def _insert(connection: Connection, table: str, **values: object) -> None:
    columns = ", ".join(values)
    marks = ", ".join(f":{name}" for name in values)
    connection.execute(text(f"INSERT INTO {table} ({columns}) VALUES ({marks})"), values)


def test_upgrade_with_data(tmp_path: Path) -> None:
    check_upgrade_with_data(
        Settings(data_dir=tmp_path / "data", database_url=None, broker_url=None)
    )


def check_upgrade_with_data(settings: Settings) -> None:
    """Upgrade an empty database to 0002, add versions, a task and two adaptations in progress,
    upgrade to the head: owners and the duplicate resolved (also run on PostgreSQL)."""
    upgrade(settings, "0002")
    now = "2026-11-01 10:00:00.000000"
    later = "2026-11-01 10:00:05.000000"
    tenant, dataset, task = uuid.uuid4().hex, uuid.uuid4().hex, uuid.uuid4().hex
    versions = {name: uuid.uuid4().hex for name in ("shipped", "private", "served")}
    engine = create_engine(settings.sqlalchemy_url)
    with engine.begin() as db:
        _insert(db, "tenants", id=tenant, name="t", created_at=now)
        _insert(
            db, "datasets", id=dataset, tenant_id=tenant, name="d", artifact_key="k",
            sha256="0", size_bytes=1, class_count=5, image_count=5, details="{}", created_at=now,
        )  # fmt: skip
        for name, row_id in versions.items():
            _insert(
                db, "initializations", id=row_id, version=name, status="ready",
                source="shipped" if name == "shipped" else "trained", config="{}",
                metrics="{}", artifact_key="k", sha256="0", is_active=name == "shipped",
                dataset_id=None if name == "shipped" else dataset, created_at=now,
                promoted_at=now if name == "shipped" else None,
            )  # fmt: skip
        # "served" was active for a while: it served every tenant, so it stays global.
        _insert(
            db, "promotions", id=uuid.uuid4().hex, action="promote", version="served",
            previous_version="shipped", actor="system", created_at=now,
        )  # fmt: skip
        _insert(
            db, "tasks", id=task, tenant_id=tenant, status="adapting", labels="[]",
            mode="full", initialization_id=versions["shipped"], support_set_sha256="0",
            example_count=0, created_at=now, updated_at=now,
        )  # fmt: skip
        jobs = [uuid.uuid4().hex, uuid.uuid4().hex]
        for job_id, created in zip(jobs, (now, later), strict=True):
            _insert(
                db, "jobs", id=job_id, tenant_id=tenant, kind="adapt", queue="adapt",
                state="queued", task_id=task, params="{}", progress=0.0,
                progress_detail="{}", attempts=0, max_attempts=3, created_at=created,
                updated_at=created,
            )  # fmt: skip
    upgrade(settings)
    with engine.connect() as db:
        owners: dict[str, object] = {
            row[0]: row[1]
            for row in db.execute(text("SELECT version, tenant_id FROM initializations"))
        }
        states: dict[str, str] = {
            uuid.UUID(str(row[0])).hex: row[1]
            for row in db.execute(text("SELECT id, state FROM jobs"))
        }
    engine.dispose()
    assert owners["shipped"] is None and owners["served"] is None
    assert owners["private"] is not None and uuid.UUID(str(owners["private"])).hex == tenant
    assert states[jobs[0]] == "queued" and states[jobs[1]] == "cancelled"


def test_upgrade_to_0004_copies_each_tasks_threshold_from_its_first_adapt_job(
    tmp_path: Path,
) -> None:
    check_0004_backfill(Settings(data_dir=tmp_path / "data", database_url=None, broker_url=None))


def check_0004_backfill(settings: Settings) -> None:
    """Upgrade an empty database to 0003, add tasks and jobs, upgrade: each task's threshold
    is its first adapt job's (also run on PostgreSQL by tests/integration)."""
    upgrade(settings, "0003")
    times = [f"2026-11-01 10:00:0{i}.000000" for i in range(4)]
    tenant, init = uuid.uuid4().hex, uuid.uuid4().hex
    with_value, without = uuid.uuid4().hex, uuid.uuid4().hex
    engine = create_engine(settings.sqlalchemy_url)
    with engine.begin() as db:
        _insert(db, "tenants", id=tenant, name="t", created_at=times[0])
        _insert(
            db, "initializations", id=init, version="v", status="ready", source="shipped",
            config="{}", metrics="{}", artifact_key="k", sha256="0", is_active=True,
            created_at=times[0],
        )  # fmt: skip
        for task in (with_value, without):
            _insert(
                db, "tasks", id=task, tenant_id=tenant, status="ready", labels="[]",
                mode="full", initialization_id=init, support_set_sha256="0", example_count=0,
                created_at=times[0], updated_at=times[0],
            )  # fmt: skip
        # The first job holds the task's threshold; a later re-adaptation's params do not count.
        for task, created, params in (
            (with_value, times[1], '{"unknown_threshold": 0.2}'),
            (with_value, times[2], '{"unknown_threshold": 0.9}'),
            (without, times[1], '{"mode": "full"}'),
        ):
            _insert(
                db, "jobs", id=uuid.uuid4().hex, tenant_id=tenant, kind="adapt", queue="adapt",
                state="succeeded", task_id=task, params=params, progress=1.0,
                progress_detail="{}", attempts=1, max_attempts=3, created_at=created,
                updated_at=created,
            )  # fmt: skip
    upgrade(settings)
    with engine.connect() as db:
        values = {
            uuid.UUID(str(row[0])).hex: row[1]
            for row in db.execute(text("SELECT id, unknown_threshold FROM tasks"))
        }
    engine.dispose()
    assert values == {with_value: 0.2, without: None}
