"""Real PostgreSQL, Redis and a Celery worker subprocess, each private to this test session."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, make_url, text

from app.core.config import Settings
from app.core.migrate import upgrade
from app.main import create_app
from tests.helpers import make_settings, shipped_init_dir

POSTGRES_URL = os.environ.get(
    "MAML_SERVE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
# A Redis database number of its own, flushed before and after the session.
REDIS_URL = os.environ.get("MAML_SERVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/11")
ROOT = Path(__file__).resolve().parents[2]


def _admin_engine():  # type: ignore[no-untyped-def]
    return create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")


def create_database(prefix: str = "maml_serve_test") -> str:
    """A fresh, empty PostgreSQL database; returns its URL."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    engine = _admin_engine()
    with engine.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)


def drop_database(url: str) -> None:
    """Drop a database made by create_database, closing its connections."""
    name = make_url(url).database
    engine = _admin_engine()
    with engine.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A private database for the session, dropped at the end."""
    try:
        engine = _admin_engine()
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as exc:
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_URL}: {exc}")
    url = create_database()
    yield url
    drop_database(url)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A dedicated Redis database, flushed."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except Exception as exc:
        pytest.skip(f"Redis not reachable at {REDIS_URL}: {exc}")
    client.flushdb()
    yield REDIS_URL
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def init_dir(tmp_path_factory: pytest.TempPathFactory, tiny_init_dir: Path) -> Path:
    """The shipped initialization when it exists (accuracy needs it), else the tiny random one."""
    return shipped_init_dir() or tiny_init_dir


@pytest.fixture(scope="session")
def production_settings(
    tmp_path_factory: pytest.TempPathFactory, postgres_url: str, redis_url: str, init_dir: Path
) -> Settings:
    """PostgreSQL + Redis settings, migrated like the compose file's one-shot step."""
    settings = make_settings(
        tmp_path_factory.mktemp("prod") / "data",
        init_dir,
        database_url=postgres_url,
        broker_url=redis_url,
    )
    upgrade(settings)
    return settings


def _environment(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAML_SERVE_")}
    assert settings.database_url is not None and settings.broker_url is not None
    env.update(
        {
            "MAML_SERVE_DATABASE_URL": settings.database_url.get_secret_value(),
            "MAML_SERVE_BROKER_URL": settings.broker_url.get_secret_value(),
            "MAML_SERVE_DATA_DIR": str(settings.data_dir),
            "MAML_SERVE_INITIALIZATION_PATH": str(settings.initialization_path),
            "PYTHONPATH": str(ROOT),
        }
    )
    return env


@pytest.fixture(scope="session")
def celery_worker(
    production_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """A real `celery worker` process on the adapt and predict queues; yields its log file."""
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    command = [
        sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
        "-Q", "adapt,predict", "--pool", "solo", "--loglevel", "INFO",
        "--without-gossip", "--without-mingle",
    ]  # fmt: skip
    with log.open("w") as out:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=_environment(production_settings),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 90
    while "ready." not in log.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the Celery worker did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    yield log
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def production_client(production_settings: Settings, celery_worker: Path) -> Iterator[TestClient]:
    """The API on PostgreSQL, publishing jobs to Redis for the worker."""
    with TestClient(create_app(production_settings)) as client:
        yield client
