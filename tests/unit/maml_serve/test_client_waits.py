"""The client's waits are held by the server (GET /v1/jobs/{id}?wait) instead of polled."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from app.jobs import runner
from app.main import create_app
from maml_serve import Client, WaitTimeout
from maml_serve._core import LONG_POLL_SECONDS
from tests.helpers import create_key, make_settings, png

JOB = "00000000-0000-0000-0000-0000000000aa"


def _job(state: str) -> dict[str, Any]:
    return {"id": JOB, "kind": "adapt", "state": state, "progress": 0.0, "attempts": 1}


class _Recording(httpx.BaseTransport):
    """Passes requests on and keeps their paths and query parameters."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner
        self.seen: list[tuple[str, dict[str, str]]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.seen.append((request.url.path, dict(request.url.params)))
        return self.inner.handle_request(request)


class _Clock:
    """time.monotonic and time.sleep for the client: a server that holds each GET `held` seconds
    (or as long as asked, when None) and never-ending sleeps that only move the clock."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, held: float | None) -> None:
        self.now = 0.0
        self.held = held
        self.slept: list[float] = []
        monkeypatch.setattr(time, "monotonic", lambda: self.now)
        monkeypatch.setattr(time, "sleep", self.sleep)

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def answer(self, request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
        asked = float(request.url.params.get("wait", 0))
        self.now += asked if self.held is None else min(self.held, asked)
        return httpx.Response(200, json=body)


def test_wait_for_job_asks_the_server_to_hold_each_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = _Clock(monkeypatch, held=None)
    answers = iter([_job("running"), _job("running"), _job("succeeded")])
    transport = _Recording(httpx.MockTransport(lambda r: clock.answer(r, next(answers))))
    with Client("http://service", "k", transport=transport, timeout=60) as client:
        job = client.wait_for_job(JOB, timeout=1000)
    assert job.state == "succeeded"
    assert [path for path, _ in transport.seen] == [f"/v1/jobs/{JOB}"] * 3
    assert [float(params["wait"]) for _, params in transport.seen] == [LONG_POLL_SECONDS] * 3
    assert clock.slept == []


def test_wait_for_job_sleeps_when_the_server_holds_less_and_times_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = _Clock(monkeypatch, held=0.5)
    transport = _Recording(httpx.MockTransport(lambda r: clock.answer(r, _job("queued"))))
    with (
        Client("http://service", "k", transport=transport, timeout=8) as client,
        pytest.raises(WaitTimeout),
    ):
        client.wait_for_job(JOB, timeout=10, interval=1.0)
    # A read timeout of 8 s: each wait asked is at most 3 s; only the last look, at the deadline,
    # asks none.
    asked = [float(params.get("wait", 0)) for _, params in transport.seen]
    assert asked[0] == 3.0 and all(0 < wait <= 3.0 for wait in asked[:-1])
    # Held 0.5 s of 3, then a 1 s pause: ten seconds take about 10 / 1.5 requests, not hundreds.
    assert 6 <= len(asked) <= 8 and clock.slept[:3] == [1.0, 1.0, 1.0]
    assert 10 <= clock.now < 11


def test_wait_for_task_is_answered_by_the_job_wait_on_a_real_app(
    tmp_path: Path, tiny_init_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()
    run_job = runner.run_job

    def gated(*args: Any, **kwargs: Any) -> Any:
        gate.wait(20)
        return run_job(*args, **kwargs)

    monkeypatch.setattr(runner, "run_job", gated)
    settings = make_settings(tmp_path / "data", tiny_init_dir)
    with TestClient(create_app(settings)) as app:
        key = create_key(app, "acme")["Authorization"].removeprefix("Bearer ")
        transport = _Recording(app._transport)
        with Client("http://testserver", key, transport=transport) as client:
            task = client.create_task({"a": [png(1)], "b": [png(2)]})
            assert task.status == "adapting"
            transport.seen.clear()
            # The job runs 1.5 s into the wait.
            threading.Timer(1.5, gate.set).start()
            ready = client.wait_for_task(task.id, timeout=30, interval=0.1)
    assert ready.ready
    paths = [path for path, _ in transport.seen]
    # Polling every 0.1 s would have read the task about 15 times in 1.5 s.
    assert paths == [f"/v1/tasks/{task.id}", f"/v1/jobs/{task.job_id}", f"/v1/tasks/{task.id}"]
