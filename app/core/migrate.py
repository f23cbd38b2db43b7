"""Running the Alembic migrations programmatically (CLI `migrate`, embedded startup)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from app.core.config import Settings


def _project_root() -> Path:
    here = Path(__file__).resolve().parents[2]
    for root in (here, Path.cwd()):
        if (root / "alembic.ini").is_file() and (root / "migrations").is_dir():
            return root
    raise FileNotFoundError(
        "alembic.ini and migrations/ not found next to the app package or in the working directory"
    )


def alembic_config(settings: Settings) -> Config:
    """An Alembic config pointing at this project's migrations and the configured database."""
    root = _project_root()
    config = Config(str(root / "alembic.ini"))
    config.set_main_option("script_location", str(root / "migrations"))
    config.attributes["sqlalchemy_url"] = settings.sqlalchemy_url
    return config


def upgrade(settings: Settings, revision: str = "head") -> None:
    """Bring the configured database to `revision` (creates the SQLite file if needed)."""
    if settings.is_embedded_database:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(settings), revision)
