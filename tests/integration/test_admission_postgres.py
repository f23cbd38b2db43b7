"""The backlog bounds on PostgreSQL: both counted in one statement with bound parameters."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.core.config import Settings
from app.core.migrate import upgrade
from tests.helpers import runtime_of
from tests.unit.app.jobs.test_admission import bounded_client, check_bounds

pytestmark = pytest.mark.integration


def test_bounds_refuse_new_work_on_postgres(
    tmp_path: Path, tiny_init_dir: Path, fresh_postgres_url: str
) -> None:
    url = fresh_postgres_url
    upgrade(Settings(data_dir=tmp_path / "data", database_url=url, broker_url=None))
    with bounded_client(tmp_path / "data", tiny_init_dir, database_url=url) as client:
        assert runtime_of(client).engine.dialect.name == "postgresql"
        check_bounds(client)
