"""Running the Alembic migrations programmatically (CLI `migrate`, embedded startup).

The migrations ship inside the package (`app/core/migrations`, a link to the repository's
top-level `migrations/` that the wheel build copies), and the Alembic config is built here, so
a wheel install migrates without `alembic.ini` or a checkout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, make_url, pool

from app.core.config import Settings

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


@dataclass(frozen=True)
class MigrationReport:
    """What an upgrade did: the database, its revision before and after, the revisions applied."""

    database: str
    before: str | None
    after: str | None
    applied: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line for people: what changed, or that nothing needed to."""
        if not self.applied:
            return f"{self.database}: already at revision {self.after or 'base'}; nothing to apply"
        return (
            f"{self.database}: upgraded from {self.before or 'an empty database'} to "
            f"{self.after} (applied {', '.join(self.applied)})"
        )


def migrations_dir() -> Path:
    """The folder holding env.py and versions/ (inside the installed package)."""
    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise FileNotFoundError(f"the packaged migrations are missing from {MIGRATIONS_DIR}")
    return MIGRATIONS_DIR


def alembic_config(settings: Settings) -> Config:
    """An Alembic config, built in code, for the packaged migrations and the configured database."""
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.set_main_option("path_separator", "os")
    config.attributes["sqlalchemy_url"] = settings.sqlalchemy_url
    return config


def _current_revision(url: str) -> str | None:
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def upgrade(settings: Settings, revision: str = "head") -> MigrationReport:
    """Bring the configured database to `revision` (creates the SQLite file if needed)."""
    if settings.is_embedded_database:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    config = alembic_config(settings)
    url = settings.sqlalchemy_url
    before = _current_revision(url)
    command.upgrade(config, revision)
    after = _current_revision(url)
    script = ScriptDirectory.from_config(config)
    applied: list[str] = []
    if after is not None and after != before:
        steps = script.iterate_revisions(after, before)
        applied = [f"{s.revision} ({(s.doc or '').splitlines()[0]})" for s in reversed(list(steps))]
    database = make_url(url).render_as_string(hide_password=True)
    return MigrationReport(database=database, before=before, after=after, applied=applied)
