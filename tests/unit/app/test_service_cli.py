"""The `maml-serve` command line."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from app.cli import build_parser, main
from app.core.config import get_settings
from app.core.security import hash_key
from app.models import ApiKey, Tenant


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """MAML_SERVE_DATA_DIR pointing at an empty folder."""
    monkeypatch.setenv("MAML_SERVE_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    yield tmp_path / "data"
    get_settings.cache_clear()


def test_keys_create_makes_and_migrates_the_embedded_database(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "create", "--tenant", "acme", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["tenant"] == "acme" and printed["key"].startswith("msk_")
    assert main(["keys", "create", "--tenant", "acme", "--admin"]) == 0
    admin_key = capsys.readouterr().out.strip()
    engine = create_engine(f"sqlite:///{data_dir / 'maml-serve.db'}")
    with Session(engine) as session:
        assert session.scalars(select(Tenant.name)).all() == ["acme"]
        keys = {k.key_hash: k.scopes for k in session.scalars(select(ApiKey))}
    engine.dispose()
    pepper = get_settings().api_key_pepper.get_secret_value()
    assert keys == {
        hash_key(printed["key"], pepper): ["user"],
        hash_key(admin_key, pepper): ["user", "admin"],
    }


def test_migrate_subcommand(data_dir: Path) -> None:
    assert main(["migrate"]) == 0
    assert (data_dir / "maml-serve.db").is_file()


def test_parser_has_the_service_commands() -> None:
    parser = build_parser()
    args = parser.parse_args(["serve", "--host", "0.0.0.0", "--port", "9000"])
    assert (args.host, args.port) == ("0.0.0.0", 9000)
    assert parser.parse_args(["worker"]).queues == "adapt"


def test_help_runs_as_a_script() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    for command in ("serve", "worker", "keys", "migrate"):
        assert command in result.stdout


def test_an_old_predict_queue_is_dropped_from_a_workers_queues(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from app.cli import worker_queues

    assert worker_queues("adapt, predict,train") == ["adapt", "train"]
    assert "predict queue is gone" in capsys.readouterr().err
    assert worker_queues("predict") == []
