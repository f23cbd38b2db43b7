"""The memory allocator of the serving processes: jemalloc when it is installed.

torch allocates and frees every activation and convolution workspace with malloc. glibc's
malloc gives the top of its heaps back to the system and maps large blocks anew, so those
short-lived blocks page-fault again on every request; jemalloc keeps them for reuse. Measured
with `benchmarks/bench_service.py` on this project's 2-core box (README, Performance): server CPU
per prediction request -15 to -25%, `POST ?wait` p50 -12 to -20%, `adapt_fast` -15%.

An allocator is chosen when a process starts (LD_PRELOAD), so `maml-serve serve` and
`maml-serve worker` start themselves again once with jemalloc preloaded, as Intel's PyTorch
launcher does; their child processes (uvicorn workers, Celery's prefork pool) inherit it.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

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
# Set on the restarted process, so a preload that did not take never restarts it in a loop.
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


def use_configured(choice: str) -> None:
    """Make this process run with the allocator `choice` asks for, restarting it if needed.

    "auto": jemalloc when installed, else glibc's malloc; "jemalloc": jemalloc or exit with how
    to install it; "system": whatever the process started with. Returns only when no restart
    is needed; otherwise the process is replaced with the same command line.
    """
    if choice not in CHOICES:
        raise SystemExit(
            f"MAML_SERVE_ALLOCATOR must be one of {', '.join(CHOICES)}; got {choice!r}"
        )
    if choice == "system" or jemalloc_loaded():
        return
    library = find_jemalloc()
    if library is None:
        if choice == "jemalloc":
            raise SystemExit(
                f"MAML_SERVE_ALLOCATOR=jemalloc, but {LIBRARY} is not installed in "
                f"{', '.join(SEARCH_PATHS)}; install it (Debian/Ubuntu: apt-get install "
                "libjemalloc2) or set MAML_SERVE_ALLOCATOR=auto or system"
            )
        return
    if os.environ.get(_RESTARTED):
        log.warning(
            "%s was preloaded but is not in use; running with the system allocator", library
        )
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join(p for p in (str(library), env.get("LD_PRELOAD", "")) if p)
    env[_RESTARTED] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    # orig_argv keeps the interpreter's own options and "-m module" as they were given.
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
