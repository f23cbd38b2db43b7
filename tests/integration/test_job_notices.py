"""Job-end notices over Redis: a waiting request hears of its job's end instead of polling."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.jobs import service as job_service
from app.jobs.dispatch import CeleryDispatcher
from app.jobs.notices import EndPublisher, EndSubscriber
from tests.helpers import create_key, support_files

pytestmark = pytest.mark.integration


def test_a_published_end_wakes_only_the_watches_of_that_job(production_settings: Settings) -> None:
    subscriber = EndSubscriber(production_settings)
    publisher = EndPublisher(production_settings)
    try:
        subscriber.start()
        assert subscriber.wait_listening(10), "never subscribed to the notices"
        job_id, other_id = uuid.uuid4(), uuid.uuid4()
        with subscriber.watch(job_id) as watch, subscriber.watch(other_id) as other:
            assert watch.pushed and other.pushed
            publisher.ended(job_id, "succeeded")
            started = time.monotonic()
            watch.wait(10)
            assert time.monotonic() - started < 5
            assert watch.ended == "succeeded"
            started = time.monotonic()
            other.wait(0.3)
            assert time.monotonic() - started >= 0.25, "a notice for another job woke this one"
            assert other.ended is None
        # A watch taken after the notice arrived starts with the answer.
        with subscriber.watch(job_id) as late:
            assert late.ended == "succeeded"
    finally:
        publisher.close()
        subscriber.close()


def test_without_redis_watches_poll_and_publishing_never_blocks(
    production_settings: Settings,
) -> None:
    dead = Settings(
        **{
            **production_settings.model_dump(),
            "broker_url": "redis://127.0.0.1:1/0",
            "broker_timeout_seconds": 0.5,
        }
    )
    subscriber = EndSubscriber(dead)
    publisher = EndPublisher(dead)
    try:
        with subscriber.watch(uuid.uuid4()) as watch:
            assert not watch.pushed
        started = time.monotonic()
        for _ in range(100):
            publisher.ended(uuid.uuid4(), "succeeded")
        assert time.monotonic() - started < 0.5
    finally:
        publisher.close()
        subscriber.close()


def test_wait_through_the_worker_is_pushed_not_polled(
    production_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    dispatcher = production_client.app.state.dispatcher  # type: ignore[attr-defined]
    assert isinstance(dispatcher, CeleryDispatcher)
    assert dispatcher._subscriber.wait_listening(10)
    reads: list[float] = []
    real = job_service._job_state

    def counted(*args: Any) -> str:
        reads.append(time.monotonic())
        return real(*args)

    monkeypatch.setattr(job_service, "_job_state", counted)
    headers = create_key(production_client, "notices")
    files, data = support_files(["a", "b", "c", "d", "e"], seed=7)
    started = time.monotonic()
    response = production_client.post("/v1/tasks?wait=30", headers=headers, files=files, data=data)
    elapsed = time.monotonic() - started
    assert response.status_code == 201, response.text
    # Pushed, with the state in the notice: no read on entry (the job was sent just now) nor
    # after it, only the safety checks (0.25 s, then doubling). Polling with a growing delay
    # reads ~8 times in its first 0.2 s alone.
    assert len(reads) <= int(elapsed / 0.25), (len(reads), elapsed)
    # A GET ?wait on the ended job reads its row (an old job's end may not be remembered).
    job_url = response.json()["links"]["job"]
    assert production_client.get(f"{job_url}?wait=5", headers=headers).json()["state"] == (
        "succeeded"
    )
