"""Migration 0005: support images may live in their rows; files of earlier rows stay as they are."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError

from app.core.config import Settings
from app.core.migrate import alembic_config, upgrade
from tests.unit.app.core.test_tenancy_migration import _insert


def check_0005_inline_images(settings: Settings) -> None:
    """Upgrade a database with a stored-in-file example to 0005: it keeps its file; a row holds
    its image once; downgrading refuses while images live in rows, and works once they are gone."""
    upgrade(settings, "0004")
    now = "2026-11-01 10:00:00.000000"
    tenant, init, task = uuid.uuid4().hex, uuid.uuid4().hex, uuid.uuid4().hex
    engine = create_engine(settings.sqlalchemy_url)
    with engine.begin() as db:
        _insert(db, "tenants", id=tenant, name="t", created_at=now)
        _insert(
            db, "initializations", id=init, version="v", status="ready", source="shipped",
            config="{}", metrics="{}", artifact_key="k", sha256="0", is_active=True,
            created_at=now,
        )  # fmt: skip
        _insert(
            db, "tasks", id=task, tenant_id=tenant, status="ready", labels='["a"]',
            mode="full", initialization_id=init, support_set_sha256="0", example_count=1,
            created_at=now, updated_at=now,
        )  # fmt: skip
        example = dict(task_id=task, label="a", sha256="0" * 64, format="png", width=1,
                       height=1, size_bytes=1)  # fmt: skip
        _insert(db, "support_examples", id=uuid.uuid4().hex, position=0,
                image_key="tasks/x/support/0.png", **example)  # fmt: skip
    upgrade(settings)
    with engine.begin() as db:
        rows = list(db.execute(text("SELECT image_key, data FROM support_examples")))
        assert [(key, data) for key, data in rows] == [("tasks/x/support/0.png", None)]
        _insert(db, "support_examples", id=uuid.uuid4().hex, position=1, image_key=None,
                data=b"\x89PNG", **example)  # fmt: skip
    for position, key, data in ((2, None, None), (3, "tasks/x/support/1.png", b"\x89PNG")):
        with pytest.raises(IntegrityError), engine.begin() as db:
            _insert(db, "support_examples", id=uuid.uuid4().hex, position=position,
                    image_key=key, data=data, **example)  # fmt: skip
    config = alembic_config(settings)
    with pytest.raises(RuntimeError, match="stored in the database"):
        command.downgrade(config, "0004")
    with engine.begin() as db:
        db.execute(text("DELETE FROM support_examples WHERE data IS NOT NULL"))
    command.downgrade(config, "0004")
    with engine.begin() as db:
        with pytest.raises(IntegrityError), db.begin_nested():
            _insert(db, "support_examples", id=uuid.uuid4().hex, position=4, image_key=None,
                    **example)  # fmt: skip
        assert db.scalar(text("SELECT count(*) FROM support_examples")) == 1
    engine.dispose()


def test_0005_keeps_files_and_stores_each_image_once(tmp_path: Path) -> None:
    check_0005_inline_images(
        Settings(data_dir=tmp_path / "data", database_url=None, broker_url=None)
    )
