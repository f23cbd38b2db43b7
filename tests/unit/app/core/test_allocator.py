"""The serving processes run with jemalloc when it is installed, and never restart in a loop."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from app.core import allocator
from app.core.allocator import jemalloc_loaded

ROOT = Path(__file__).resolve().parents[4]


@pytest.fixture
def restarts(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[str], dict[str, str]]]:
    """The os.execve calls use_configured would make (none is made)."""
    calls: list[tuple[str, list[str], dict[str, str]]] = []

    def record(path: str, args: list[str], env: dict[str, str]) -> Any:
        calls.append((path, args, env))

    monkeypatch.setattr(allocator.os, "execve", record)
    monkeypatch.delenv(allocator._RESTARTED, raising=False)
    return calls


def _library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, installed: bool = True) -> Path:
    library = tmp_path / allocator.LIBRARY
    if installed:
        library.write_bytes(b"")
    monkeypatch.setattr(allocator, "SEARCH_PATHS", (str(tmp_path / "none"), str(tmp_path)))
    return library


def test_auto_with_jemalloc_preloads_it_and_keeps_what_the_operator_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    library = _library(tmp_path, monkeypatch)
    env = allocator.planned_environment("auto", {"LD_PRELOAD": "/opt/other.so", "HOME": "/h"})
    assert env is not None
    assert env["LD_PRELOAD"] == f"{library} /opt/other.so" and env["HOME"] == "/h"
    assert env["MALLOC_CONF"] == allocator.JEMALLOC_CONF
    assert not set(allocator.GLIBC_TUNING) & set(env)
    mine = allocator.planned_environment("jemalloc", {"MALLOC_CONF": "narenas:2"})
    assert mine is not None and mine["MALLOC_CONF"] == "narenas:2"
    assert allocator.planned_environment("auto", env) is None  # already in place


def test_auto_without_jemalloc_tunes_glibc_and_jemalloc_is_then_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _library(tmp_path, monkeypatch, installed=False)
    env = allocator.planned_environment("auto", {"MALLOC_ARENA_MAX": "4"})
    assert env is not None and "LD_PRELOAD" not in env and "MALLOC_CONF" not in env
    assert env == {**allocator.GLIBC_TUNING, "MALLOC_ARENA_MAX": "4"}
    assert allocator.planned_environment("auto", env) is None
    with pytest.raises(SystemExit, match="apt-get install libjemalloc2"):
        allocator.planned_environment("jemalloc", {})
    assert allocator.planned_environment("system", {}) is None
    with pytest.raises(SystemExit, match="must be one of"):
        allocator.planned_environment("tcmalloc", {})


def test_use_configured_restarts_once_with_the_same_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restarts: list[Any]
) -> None:
    library = _library(tmp_path, monkeypatch)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    allocator.use_configured("auto")
    [(path, args, env)] = restarts
    assert path == sys.executable and args == [sys.executable, *sys.orig_argv[1:]]
    assert env["LD_PRELOAD"] == str(library) and env[allocator._RESTARTED] == "1"
    # The restarted process never restarts, whatever its environment holds.
    monkeypatch.setenv(allocator._RESTARTED, "1")
    allocator.use_configured("auto")
    allocator.use_configured("jemalloc")
    assert len(restarts) == 1
    monkeypatch.delenv(allocator._RESTARTED)
    allocator.use_configured("system")
    assert len(restarts) == 1


def test_jemalloc_loaded_reads_the_process_maps(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 fd:01 1 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n")
    assert jemalloc_loaded(maps)
    maps.write_text("7f00-7f01 r-xp 0 fd:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert not jemalloc_loaded(maps)
    assert not jemalloc_loaded(tmp_path / "missing")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _served_with(tmp_path: Path, choice: str) -> tuple[bool, str]:
    """Whether `maml-serve serve` runs with jemalloc mapped under MAML_SERVE_ALLOCATOR=choice,
    and its environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAML_SERVE_")}
    for name in ("LD_PRELOAD", "MALLOC_CONF", *allocator.GLIBC_TUNING):
        env.pop(name, None)
    env.update(MAML_SERVE_DATA_DIR=str(tmp_path / choice), MAML_SERVE_ALLOCATOR=choice)
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--log-level", "warning"],
        cwd=ROOT,
        env=env,
    )
    try:
        maps = Path(f"/proc/{server.pid}/maps")
        deadline = time.monotonic() + 60
        # The restart replaces the process image under the same pid; torch loads after it.
        while time.monotonic() < deadline and "libtorch" not in maps.read_text():
            assert server.poll() is None, "the server exited"
            time.sleep(0.2)
        environ = Path(f"/proc/{server.pid}/environ").read_bytes().decode()
        return jemalloc_loaded(maps), environ
    finally:
        server.terminate()
        server.wait(30)


@pytest.mark.skipif(
    allocator.find_jemalloc() is None and os.environ.get("CI") != "true",
    reason="libjemalloc2 is not installed (apt-get install libjemalloc2); CI installs it",
)
@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_serve_runs_on_jemalloc_unless_told_otherwise(tmp_path: Path) -> None:
    loaded, environ = _served_with(tmp_path, "auto")
    assert loaded and f"MALLOC_CONF={allocator.JEMALLOC_CONF}" in environ
    loaded, environ = _served_with(tmp_path, "system")
    assert not loaded and "MALLOC_CONF" not in environ
