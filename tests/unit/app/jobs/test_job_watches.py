"""Watches of waiting requests: woken by a job's end, told its state, remembering recent ends."""

from __future__ import annotations

import threading
import time
import uuid

from app.jobs.notices import notice, parse_notice
from app.jobs.watch import RECENT_ENDS, Watches


def test_a_notice_names_the_job_and_its_terminal_state() -> None:
    job_id = uuid.uuid4()
    assert parse_notice(notice(job_id, "failed").encode()) == (job_id, "failed")
    assert parse_notice(notice(job_id, "cancelled")) == (job_id, "cancelled")
    # An older publisher's bare id: woken, but the waiter reads the row.
    assert parse_notice(job_id.hex.encode()) == (job_id, None)
    # Anything else is ignored, a state that is not terminal too.
    assert parse_notice(f"{job_id.hex} running") is None
    assert parse_notice(b"not a job") is None
    assert parse_notice(b"\xff\xfe") is None


def test_an_end_wakes_its_watches_with_the_state_and_a_run_end_without() -> None:
    watches = Watches()
    job_id = uuid.uuid4()
    with watches.watch(job_id, pushed=True) as watch:
        threading.Timer(0.05, watches.notify, (job_id,)).start()
        started = time.monotonic()
        watch.wait(5)
        assert time.monotonic() - started < 2
        assert watch.ended is None  # a run ended (a retry may follow): read the row
        watches.notify(job_id, "succeeded")
        assert watch.ended == "succeeded"


def test_a_watch_taken_after_the_end_starts_with_it_and_memory_is_bounded() -> None:
    watches = Watches()
    ended = uuid.uuid4()
    watches.notify(ended, "failed")
    with watches.watch(ended, pushed=True) as watch:
        assert watch.ended == "failed"
    # A polling watch (no notices) never trusts what it did not hear itself.
    with watches.watch(ended, pushed=False) as polling:
        assert polling.ended is None
    for _ in range(RECENT_ENDS):
        watches.notify(uuid.uuid4(), "succeeded")
    with watches.watch(ended, pushed=True) as watch:
        assert watch.ended is None
    assert len(watches._recent) == RECENT_ENDS
