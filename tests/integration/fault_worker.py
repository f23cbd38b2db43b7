"""`maml-serve worker`, with a hook the fault suite uses to make adapt jobs slow and to count runs.

Before each adapt job the hook prints one line (so a test counts computations from the log)
and sleeps for the seconds written in $FAULT_DELAY_FILE (0 when absent) per job: a slow job on
demand. Both the one-job handler and the batch handler (several claimed jobs per pass) are hooked.

Under libfaketime (a worker host whose clock is off, FAKETIME set) `time.sleep` waits on an event
instead: libfaketime 0.9.10 answers EINVAL to the absolute monotonic clock_nanosleep that
CPython's sleep makes when the monotonic clock is left unfaked (FAKETIME_DONT_FAKE_MONOTONIC).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

if os.environ.get("FAKETIME"):

    def _sleep(seconds: float) -> None:
        if seconds < 0:
            raise ValueError("sleep length must be non-negative")
        threading.Event().wait(seconds)

    time.sleep = _sleep  # type: ignore[assignment]

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import app.adaptations.handler as handler
from app.cli import main

_real = handler.run_adapt


def _delay() -> float:
    path = os.environ.get("FAULT_DELAY_FILE")
    if not path or not Path(path).is_file():
        return 0.0
    return float(Path(path).read_text().strip() or 0)


def _slow_adapt(runtime: Any, claim: Any, heartbeat: Any) -> Any:
    print(f"fault hook: running job {claim.job_id} attempt {claim.attempt}", flush=True)
    time.sleep(_delay())
    return _real(runtime, claim, heartbeat)


handler.run_adapt = _slow_adapt

batch: Any
try:
    import app.adaptations.batch as batch
except ImportError:  # a version without adapt batching
    batch = None

if batch is not None:
    _real_batch = batch.run_adapt_batch

    def _slow_batch(runtime: Any, held: Any) -> Any:
        for claim, _ in held:
            print(f"fault hook: running job {claim.job_id} attempt {claim.attempt}", flush=True)
        time.sleep(_delay() * len(held))
        return _real_batch(runtime, held)

    batch.run_adapt_batch = _slow_batch

if __name__ == "__main__":
    raise SystemExit(main(["worker", *sys.argv[1:]]))
