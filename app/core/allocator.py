"""The memory allocator of the serving processes: jemalloc when installed, else tuned glibc.

torch allocates and frees every activation and convolution workspace with malloc. With glibc's
defaults the larger of those blocks are mapped and unmapped, or the heap top trimmed and grown
again, so they page-fault on every request; jemalloc that never returns freed pages to the
system, or glibc with a fixed mmap threshold of 32 MiB and a trim threshold of 256 MiB, keeps
them for reuse. Measured on this project's 2-core box (README, Performance): 32 tasks adapted
in one batched pass took 11.6 ms per task with jemalloc, 11.9 with tuned glibc and 15.5 with
glibc's defaults (head mode 0.43 / 0.41 / 0.96); `POST /v1/tasks?wait` p50 30-32 ms, 33-34 and
37-38. Intel's PyTorch tuning guide recommends the same: jemalloc with decay turned off.

An allocator is chosen when a process starts (LD_PRELOAD, MALLOC_* variables), so `maml-serve
serve` and `maml-serve worker` start themselves again once with it, as Intel's PyTorch launcher
does; their child processes (uvicorn workers, Celery's prefork pool) inherit the environment.
Variables the operator set are kept as they are.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

CHOICES = ("auto", "jemalloc", "system")
LIBRARY = "libjemalloc.so.2"
# Where Debian/Ubuntu (per architecture), Fedora/RHEL and source builds put it.
SEARCH_PATHS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
)
# Freed pages stay with the process for reuse: its peak is bounded by the request limits.
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
# glibc: two arenas (RSS flat over a long run), blocks under 32 MiB (glibc's largest mmap
# threshold) from the heap, and a heap top trimmed only past 256 MiB free.
GLIBC_TUNING = {
    "MALLOC_ARENA_MAX": "2",
    "MALLOC_MMAP_THRESHOLD_": str(32 * 1024 * 1024),
    "MALLOC_TRIM_THRESHOLD_": str(256 * 1024 * 1024),
}
# Set on the restarted process, so it never restarts again.
_RESTARTED = "MAML_SERVE_ALLOCATOR_RESTARTED"


def find_jemalloc() -> Path | None:
    """The installed jemalloc shared library, or None."""
    for folder in SEARCH_PATHS:
        candidate = Path(folder) / LIBRARY
        if candidate.is_file():
            return candidate
    return None


def jemalloc_loaded(maps: Path = Path("/proc/self/maps")) -> bool:
    """True when this process runs with jemalloc (Linux: a mapping of libjemalloc)."""
    try:
        return "libjemalloc" in maps.read_text()
    except OSError:
        return False


def planned_environment(choice: str, env: Mapping[str, str]) -> dict[str, str] | None:
    """The environment to start again with for allocator `choice`, or None when `env` has it.

    "auto": jemalloc when installed, else tuned glibc; "jemalloc": jemalloc or exit saying how
    to install it; "system": the process as it started, untouched.
    """
    if choice not in CHOICES:
        raise SystemExit(
            f"MAML_SERVE_ALLOCATOR must be one of {', '.join(CHOICES)}; got {choice!r}"
        )
    if choice == "system":
        return None
    library = find_jemalloc()
    if library is None and choice == "jemalloc":
        raise SystemExit(
            f"MAML_SERVE_ALLOCATOR=jemalloc, but {LIBRARY} is not installed in "
            f"{', '.join(SEARCH_PATHS)}; install it (Debian/Ubuntu: apt-get install "
            "libjemalloc2) or set MAML_SERVE_ALLOCATOR=auto or system"
        )
    wanted = dict(GLIBC_TUNING) if library is None else {"MALLOC_CONF": JEMALLOC_CONF}
    out = dict(env)
    changed = False
    for name, value in wanted.items():
        if name not in out:
            out[name] = value
            changed = True
    if library is not None and str(library) not in out.get("LD_PRELOAD", "").split():
        out["LD_PRELOAD"] = " ".join(p for p in (str(library), out.get("LD_PRELOAD", "")) if p)
        changed = True
    return out if changed else None


def use_configured(choice: str) -> None:
    """Run this process with the allocator `choice` asks for, starting it again if needed.

    Returns when nothing has to change; otherwise the process is replaced by the same command
    line with the allocator's environment (once: a restarted process never restarts).
    """
    if os.environ.get(_RESTARTED):
        return
    env = planned_environment(choice, os.environ)
    if env is None:
        return
    env[_RESTARTED] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    # orig_argv keeps the interpreter's own options and "-m module" as they were given.
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
