"""Real PostgreSQL, Redis and a Celery worker subprocess, each private to this test session."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, make_url, text

from app.core.config import Settings
from app.core.migrate import upgrade
from app.main import create_app
from tests.helpers import make_settings, shipped_init_dir
from tests.integration.faults import FAULT_SETTINGS, Postgres, Redis, Worker

POSTGRES_URL = os.environ.get(
    "MAML_SERVE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
# A Redis database number of its own, flushed before and after the session.
REDIS_URL = os.environ.get("MAML_SERVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/11")
ROOT = Path(__file__).resolve().parents[2]


def unavailable(reason: str) -> NoReturn:
    """Skip a test whose service is missing; under CI=true, fail it (CI must run every tier)."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and a service the integration tests need is missing: {reason}")
    pytest.skip(reason)


def _admin_engine() -> Engine:
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
        unavailable(f"PostgreSQL not reachable at {POSTGRES_URL}: {exc}")
    url = create_database()
    yield url
    drop_database(url)


@pytest.fixture
def fresh_postgres_url() -> Iterator[str]:
    """A new, empty database for one test (migrations run on it from nothing), dropped after."""
    try:
        url = create_database("maml_serve_fresh")
    except Exception as exc:
        unavailable(f"PostgreSQL not reachable: {exc}")
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
        unavailable(f"Redis not reachable at {REDIS_URL}: {exc}")
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
    tmp_path_factory: pytest.TempPathFactory,
    postgres_url: str,
    redis_url: str,
    init_dir: Path,
    photo_init_dir: Path,
) -> Settings:
    """PostgreSQL + Redis settings, migrated like the compose file's one-shot step.

    Both domains are served: the character initialization and a photo one.
    """
    settings = make_settings(
        tmp_path_factory.mktemp("prod") / "data",
        init_dir,
        database_url=postgres_url,
        broker_url=redis_url,
        extra_initialization_paths=[photo_init_dir],
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
            "MAML_SERVE_EXTRA_INITIALIZATION_PATHS": json.dumps(
                [str(p) for p in settings.extra_initialization_paths]
            ),
            "PYTHONPATH": str(ROOT),
        }
    )
    return env


@pytest.fixture(scope="session")
def celery_worker(
    production_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """A real `celery worker` process on the adapt queue; yields its log file."""
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    command = [
        sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
        "-Q", "adapt", "--pool", "solo", "--loglevel", "INFO",
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


# --- the fault suite's private stack ----------------------------------------------------------


@dataclass
class FaultStack:
    """A private PostgreSQL cluster and Redis, the API on them, and workers a test may kill."""

    postgres: Postgres
    redis: Redis
    settings: Settings
    client: TestClient
    env: dict[str, str]
    folder: Path
    workers: list[Worker] = field(default_factory=list)

    def worker(self, queues: str, name: str) -> Worker:
        """A worker on `queues`, not started yet (stopped at the end of the session)."""
        worker = Worker(self.env, queues, self.folder / f"{name}.log")
        self.workers.append(worker)
        return worker

    def slow_adapt(self, seconds: float) -> None:
        """Make every adapt job that starts from now on wait `seconds` first."""
        (self.folder / "delay").write_text(str(seconds))

    def stop_workers(self) -> None:
        """SIGKILL every worker still running (the whole stack is thrown away next)."""
        for worker in self.workers:
            if worker.alive:
                worker.kill()


@pytest.fixture(scope="session")
def fault_stack(tmp_path_factory: pytest.TempPathFactory, init_dir: Path) -> Iterator[FaultStack]:
    """Its own PostgreSQL cluster and redis-server (so they may be stopped and frozen) and the API."""
    for tool in ("pg_createcluster", "pg_ctlcluster", "redis-server"):
        if shutil.which(tool) is None:
            unavailable(f"{tool} not found; the fault suite starts its own services")
    if os.geteuid() != 0:
        unavailable("the fault suite creates a PostgreSQL cluster and needs root")
    folder = tmp_path_factory.mktemp("faults")
    postgres, redis_server = Postgres(), Redis()
    postgres.create()
    try:
        redis_server.start()
        admin = create_engine(postgres.url(), isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            # A name of its own, for the same reason as the Redis password.
            database = f"maml_{uuid.uuid4().hex[:12]}"
            connection.execute(text(f'CREATE DATABASE "{database}"'))
        admin.dispose()
        settings = make_settings(
            folder / "data",
            init_dir,
            database_url=postgres.url(database),
            broker_url=redis_server.url,
            **FAULT_SETTINGS,
        )
        upgrade(settings)
        env = {
            **_environment(settings),
            **{f"MAML_SERVE_{k.upper()}": str(v) for k, v in FAULT_SETTINGS.items()},
            "FAULT_DELAY_FILE": str(folder / "delay"),
        }
        with TestClient(create_app(settings)) as client:
            stack = FaultStack(postgres, redis_server, settings, client, env, folder)
            try:
                yield stack
            finally:
                stack.stop_workers()
    finally:
        redis_server.stop()
        postgres.drop()
