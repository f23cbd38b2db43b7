"""Migrations with data on PostgreSQL, where JSON, UUID and timestamp columns are native types."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from app.core.config import Settings
from tests.unit.app.core.test_support_migration import check_0005_inline_images
from tests.unit.app.core.test_tenancy_migration import check_0004_backfill, check_upgrade_with_data

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    "check",
    [check_upgrade_with_data, check_0004_backfill, check_0005_inline_images],
    ids=["0003-owners", "0004-thresholds", "0005-inline-images"],
)
def test_upgrades_with_data_on_postgres(
    tmp_path: Path, check: Callable[[Settings], None], fresh_postgres_url: str
) -> None:
    check(Settings(data_dir=tmp_path / "data", database_url=fresh_postgres_url, broker_url=None))
