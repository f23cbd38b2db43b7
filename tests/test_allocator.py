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

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def restarts(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[str], dict[str, str]]]:
    """The os.execve calls use_configured would make (none is made)."""
    calls: list[tuple[str, list[str], dict[str, str]]] = []

    def record(path: str, args: list[str], env: dict[str, str]) -> Any:
        calls.append((path, args, env))

    monkeypatch.setattr(allocator.os, "execve", record)
    monkeypatch.delenv(allocator._RESTARTED, raising=False)
    monkeypatch.setattr(allocator, "jemalloc_loaded", lambda: False)
    return calls


def _library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    library = tmp_path / allocator.LIBRARY
    library.write_bytes(b"")
    monkeypatch.setattr(allocator, "SEARCH_PATHS", (str(tmp_path / "none"), str(tmp_path)))
    return library


def test_auto_restarts_once_with_jemalloc_preloaded_and_the_same_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restarts: list[Any]
) -> None:
    library = _library(tmp_path, monkeypatch)
    monkeypatch.setenv("LD_PRELOAD", "/opt/other.so")
    allocator.use_configured("auto")
    [(path, args, env)] = restarts
    assert path == sys.executable and args == [sys.executable, *sys.orig_argv[1:]]
    assert env["LD_PRELOAD"] == f"{library} /opt/other.so"
    assert env[allocator._RESTARTED] == "1"
    # The restarted process, if the preload did not take, carries on instead of restarting.
    monkeypatch.setenv(allocator._RESTARTED, "1")
    allocator.use_configured("auto")
    assert len(restarts) == 1


def test_system_never_restarts_and_auto_without_jemalloc_carries_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restarts: list[Any]
) -> None:
    _library(tmp_path, monkeypatch)
    allocator.use_configured("system")
    monkeypatch.setattr(allocator, "SEARCH_PATHS", (str(tmp_path / "none"),))
    allocator.use_configured("auto")
    assert restarts == []
    with pytest.raises(SystemExit, match="apt-get install libjemalloc2"):
        allocator.use_configured("jemalloc")
    with pytest.raises(SystemExit, match="must be one of"):
        allocator.use_configured("tcmalloc")


def test_a_process_already_on_jemalloc_is_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restarts: list[Any]
) -> None:
    _library(tmp_path, monkeypatch)
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 fd:01 1 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n")
    assert jemalloc_loaded(maps)
    assert not jemalloc_loaded(tmp_path / "missing")
    monkeypatch.setattr(allocator, "jemalloc_loaded", lambda: True)
    allocator.use_configured("jemalloc")
    assert restarts == []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _served_with(tmp_path: Path, choice: str) -> bool:
    """Whether `maml-serve serve` runs with jemalloc mapped, under MAML_SERVE_ALLOCATOR=choice."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAML_SERVE_")}
    env.pop("LD_PRELOAD", None)
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
        return jemalloc_loaded(maps)
    finally:
        server.terminate()
        server.wait(30)


@pytest.mark.skipif(
    allocator.find_jemalloc() is None and os.environ.get("CI") != "true",
    reason="libjemalloc2 is not installed (apt-get install libjemalloc2); CI installs it",
)
@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_serve_runs_on_jemalloc_unless_told_otherwise(tmp_path: Path) -> None:
    assert _served_with(tmp_path, "auto")
    assert not _served_with(tmp_path, "system")
