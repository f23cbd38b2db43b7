"""`maml-serve --help` and `--version` load no heavy module; `migrate` says what it did."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from app.cli import main
from app.core.config import get_settings

_PROBE = """
import json, sys
from app.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
heavy = ("torch", "fastapi", "sqlalchemy", "alembic", "celery", "fewshot", "numpy", "PIL")
print(json.dumps(sorted(m for m in heavy if m in sys.modules)), file=sys.stderr)
"""


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["keys", "--help"], ["serve", "-h"]])
def test_help_and_version_import_nothing_heavy(argv: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, timeout=60
    )
    loaded = json.loads(result.stderr.strip().splitlines()[-1])
    assert loaded == [], f"maml-serve {' '.join(argv)} imported {loaded}"
    assert result.stdout


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"maml-serve {version('maml-serve')}"


def test_help_lists_the_core_commands_and_they_still_run(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "train" in out and "evaluate" in out
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    assert "--episodes" in capsys.readouterr().out


def test_every_command_of_the_ml_core_is_a_maml_serve_command() -> None:
    import argparse

    from app.cli import CORE_COMMANDS
    from fewshot.cli import add_subcommands

    parser = argparse.ArgumentParser()
    add_subcommands(parser.add_subparsers())
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(actions[0].choices) == set(CORE_COMMANDS)


def test_migrate_says_what_it_did(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MAML_SERVE_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    try:
        assert main(["migrate"]) == 0
        first = capsys.readouterr().out
        assert main(["migrate"]) == 0
        second = capsys.readouterr().out
    finally:
        get_settings.cache_clear()
    assert "maml-serve.db: upgraded from an empty database to " in first
    assert "applied 0001 (initial schema)" in first
    assert "nothing to apply" in second and "already at revision" in second


def test_console_key_is_refused_in_production(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAML_SERVE_ENVIRONMENT", "production")
    monkeypatch.setenv("MAML_SERVE_API_KEY_PEPPER", "a-real-secret")
    monkeypatch.setenv("MAML_SERVE_DATABASE_URL", f"sqlite:///{tmp_path / 'prod.db'}")
    get_settings.cache_clear()
    try:
        with pytest.raises(SystemExit, match="--console-key is for development"):
            main(["serve", "--console-key"])
    finally:
        get_settings.cache_clear()
    assert not (tmp_path / "prod.db").exists()
