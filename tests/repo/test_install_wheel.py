"""A built wheel, installed into a fresh virtual environment, migrates and makes keys by itself."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# What the wheel is built from (a copy, so the build writes nothing into the checkout).
SOURCES = ["pyproject.toml", "README.md", "app", "fewshot", "worker", "maml_serve", "migrations"]


def _run(*args: str | Path, cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.slow
def test_wheel_install_migrates_and_creates_keys(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, symlinks=True, ignore=ignore)
        else:
            shutil.copy2(path, source / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAML_SERVE_", "PYTHON"))}
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _run(
        *pip,
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        tmp_path / "dist",
        source,
        cwd=tmp_path,
        env=env,
    )
    (wheel,) = (tmp_path / "dist").glob("maml_serve-*.whl")

    # A fresh venv; its dependencies (torch & co.) come from this interpreter's site-packages,
    # added after its own, so nothing is downloaded and the wheel's own code wins.
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path, env=env)
    python = venv / "bin" / "python"
    fresh_site = Path(
        _run(
            python,
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['purelib'])",
            cwd=tmp_path,
            env=env,
        ).strip()
    )
    ours = {sysconfig.get_paths()["purelib"], *site.getsitepackages()}
    (fresh_site / "zz_dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
    _run(
        *pip, "--python", python, "install", "--no-deps", "--no-index", wheel, cwd=tmp_path, env=env
    )

    where = json.loads(
        _run(
            python,
            "-c",
            "import json, app, maml_serve, app.core.migrate as m, app.console.router as c;"
            "print(json.dumps([app.__file__, maml_serve.__file__, str(m.migrations_dir()),"
            " str(c.STATIC_DIR / 'index.html')]))",
            cwd=tmp_path,
            env=env,
        )
    )
    assert all(path.startswith(str(fresh_site)) for path in where), where
    assert (Path(where[2]) / "versions").is_dir()
    assert Path(where[3]).is_file(), "the console's files are in the wheel"

    cli = venv / "bin" / "maml-serve"
    work = tmp_path / "elsewhere"  # no alembic.ini, no migrations/ in sight
    work.mkdir()
    env["MAML_SERVE_DATA_DIR"] = str(work / "data")
    assert _run(cli, "--version", cwd=work, env=env).strip().startswith("maml-serve ")
    migrated = _run(cli, "migrate", cwd=work, env=env)
    assert "upgraded from an empty database to" in migrated and "0001" in migrated
    assert "nothing to apply" in _run(cli, "migrate", cwd=work, env=env)
    created = json.loads(
        _run(cli, "keys", "create", "--tenant", "acme", "--admin", "--json", cwd=work, env=env)
    )
    assert created["key"].startswith("msk_") and "admin" in created["scopes"]
    assert (work / "data" / "maml-serve.db").is_file()
