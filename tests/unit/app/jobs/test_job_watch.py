"""JobWatch: a waiter on the event loop or a thread is woken by the job's end, not by polling."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

from fastapi.testclient import TestClient
from sqlalchemy import select

from app.jobs import state
from app.jobs.watch import JobWatch
from app.models import Job
from tests.helpers import runtime_of, support_files


def _notify_later(watch: JobWatch, delay: float) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(delay), watch.notify()))
    thread.start()
    return thread


def test_an_async_waiter_is_woken_by_a_notice_from_another_thread() -> None:
    watch = JobWatch(pushed=True)

    async def wait() -> float:
        started = time.monotonic()
        await watch.wait_async(10)
        return time.monotonic() - started

    async def main() -> float:
        # The loop is registered on the first wait; the notice comes while it sleeps.
        thread = _notify_later(watch, 0.2)
        elapsed = await wait()
        thread.join()
        return elapsed

    assert asyncio.run(main()) < 5


def test_a_notice_before_the_async_wait_is_not_lost() -> None:
    watch = JobWatch(pushed=True)
    watch.notify()

    async def main() -> float:
        started = time.monotonic()
        await watch.wait_async(10)
        return time.monotonic() - started

    assert asyncio.run(main()) < 5


def test_an_async_wait_without_notice_returns_after_its_timeout() -> None:
    watch = JobWatch(pushed=True)

    async def main() -> float:
        started = time.monotonic()
        await watch.wait_async(0.1)
        return time.monotonic() - started

    assert 0.09 <= asyncio.run(main()) < 5


def test_a_thread_waiter_is_woken_by_a_notice() -> None:
    watch = JobWatch(pushed=True)
    thread = _notify_later(watch, 0.1)
    started = time.monotonic()
    watch.wait(10)
    thread.join()
    assert time.monotonic() - started < 5


def test_ending_a_job_tells_the_end_listeners_after_the_commit(
    client: TestClient, auth: dict[str, str]
) -> None:
    # The job is committed but never sent anywhere, so only this test ends it.
    client.app.state.dispatcher.submit = lambda *args: None  # type: ignore[attr-defined]
    files, data = support_files(["a", "b"])
    job_id = uuid.UUID(
        client.post("/v1/tasks", headers=auth, files=files, data=data).json()["job"]["id"]
    )
    runtime = runtime_of(client)
    heard: list[tuple[uuid.UUID, str, str | None]] = []

    def listener(ended_id: uuid.UUID, ended: str) -> None:
        # Told after the commit: another session already reads the ended state.
        with runtime.sessions() as other:
            heard.append(
                (ended_id, ended, other.scalar(select(Job.state).where(Job.id == ended_id)))
            )

    state.add_end_listener(listener)
    try:
        with runtime.sessions() as session:
            assert state.fail(session, job_id, attempt=None, code="x", message="y")
            # A refused end (the job ended already) tells nobody.
            assert not state.fail(session, job_id, attempt=None, code="x", message="y")
    finally:
        state.remove_end_listener(listener)
    assert heard == [(job_id, "failed", "failed")]
