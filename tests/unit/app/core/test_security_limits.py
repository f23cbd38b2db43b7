"""Per-key rate and in-flight limits and the failed-key throttle: 429 problems with Retry-After."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from app.core.limits import KeyLimits, TooManyRequests
from app.main import create_app
from tests.helpers import create_key, make_settings, support_files


@contextmanager
def _client(tmp_path: Path, init_dir: Path, **limits: float) -> Iterator[TestClient]:
    settings = make_settings(tmp_path / "data", init_dir, **limits)
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture
def strict(tmp_path: Path, tiny_init_dir: Path) -> Iterator[TestClient]:
    """An app allowing bursts of 3 requests per key at 1 per second, 4 failed keys a minute."""
    with _client(
        tmp_path,
        tiny_init_dir,
        key_rate_per_second=1.0,
        key_rate_burst=3,
        max_failed_auth_per_minute=4,
    ) as client:
        yield client


def _assert_429(response: httpx.Response, code: str) -> None:
    assert response.status_code == 429, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert int(response.headers["Retry-After"]) >= 1
    assert response.json()["code"] == code


def test_a_key_over_its_rate_gets_429_and_other_keys_do_not(strict: TestClient) -> None:
    fast, other = create_key(strict, "acme"), create_key(strict, "acme")
    answers = [strict.get("/v1/tasks", headers=fast) for _ in range(5)]
    assert [a.status_code for a in answers[:3]] == [200, 200, 200]
    _assert_429(answers[3], "rate_limited")
    assert strict.get("/v1/tasks", headers=other).status_code == 200


def test_failed_key_attempts_from_one_address_are_throttled(strict: TestClient) -> None:
    good = create_key(strict, "acme")
    wrong = [{"Authorization": f"Bearer msk_guess-{i}"} for i in range(5)]
    assert [strict.get("/v1/tasks", headers=w).status_code for w in wrong[:4]] == [401] * 4
    _assert_429(strict.get("/v1/tasks", headers=wrong[4]), "too_many_failed_attempts")
    # The address is throttled as a whole: guessing stops, even between valid calls.
    _assert_429(strict.get("/v1/tasks", headers=good), "too_many_failed_attempts")


def test_requests_in_flight_are_capped_per_key() -> None:
    limits = KeyLimits(rate=1000.0, burst=1000, max_in_flight=2)
    limits.admit("k")
    limits.admit("k")
    with pytest.raises(TooManyRequests) as raised:
        limits.admit("k")
    assert raised.value.code == "too_many_requests" and raised.value.headers["Retry-After"]
    limits.admit("other")
    limits.release("k")
    limits.admit("k")


def test_an_in_flight_slot_is_given_back_when_the_request_ends(
    tmp_path: Path, tiny_init_dir: Path
) -> None:
    with _client(tmp_path, tiny_init_dir, key_max_in_flight=1) as client:
        auth = create_key(client, "acme")
        # Sequential requests never overlap: each gives its slot back, errors included.
        for _ in range(3):
            assert client.get("/v1/tasks", headers=auth).status_code == 200
            assert client.get(f"/v1/tasks/{uuid.uuid4()}", headers=auth).status_code == 404
        limits = client.app.state.limits.keys  # type: ignore[attr-defined]
        assert all(b.in_flight == 0 for b in limits._buckets.values())


def test_the_event_loop_is_not_needed_to_refuse() -> None:
    # admit() is plain and synchronous: callable from the loop without a thread hand-off.
    limits = KeyLimits(rate=0.001, burst=1, max_in_flight=5)

    async def twice() -> None:
        limits.admit("k")
        limits.release("k")
        with pytest.raises(TooManyRequests):
            limits.admit("k")

    asyncio.run(twice())


def test_waiting_requests_hold_no_thread(tmp_path: Path, tiny_init_dir: Path) -> None:
    with _client(tmp_path, tiny_init_dir, api_threads=2, key_max_in_flight=50) as client:
        auth = create_key(client, "acme")
        # Jobs are never run, so every ?wait lasts its full 3 s.
        client.app.state.dispatcher.submit = lambda *_: None  # type: ignore[attr-defined]
        statuses: list[int] = []

        def wait(seed: int) -> None:
            files, data = support_files(["a", "b"], seed=seed)
            response = client.post("/v1/tasks?wait=3", headers=auth, files=files, data=data)
            statuses.append(response.status_code)

        waiters = [threading.Thread(target=wait, args=(i,)) for i in range(6)]
        for thread in waiters:
            thread.start()
        time.sleep(1.0)
        # /healthz is a plain `def` route: it needs one of the 2 threads the waiters would hold.
        started = time.perf_counter()
        assert client.get("/healthz").status_code == 200
        elapsed = time.perf_counter() - started
        for thread in waiters:
            thread.join()
        assert statuses == [202] * 6
        assert elapsed < 1.0, elapsed


def test_a_stalled_body_is_answered_408_and_the_app_stops_reading() -> None:
    from app.middleware import BodyLimitMiddleware

    reads: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            reads.append(len(message.get("body", b"")))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"read it all"})

    chunks = [{"type": "http.request", "body": b"x" * 10, "more_body": True}]

    async def receive() -> dict[str, Any]:
        if chunks:
            return chunks.pop()
        await asyncio.sleep(3600)  # the client sends nothing more
        raise AssertionError("unreachable")

    sent: list[MutableMapping[str, Any]] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    middleware = BodyLimitMiddleware(app, max_bytes=1000, read_timeout=0.2)
    scope = {"type": "http", "method": "POST", "path": "/v1/tasks", "headers": []}
    started = time.perf_counter()
    asyncio.run(middleware(scope, receive, send))
    assert time.perf_counter() - started < 2
    assert reads == [10]
    assert sent[0]["status"] == 408
    assert (b"connection", b"close") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["code"] == "body_timeout"


def test_a_token_bucket_maps_to_a_window_of_the_same_rate_and_burst() -> None:
    from app.core.shared_limits import rate_window

    assert rate_window(20.0, 40) == (40, 2)
    assert rate_window(10_000.0, 10_000) == (10_000, 1)
    assert rate_window(0.5, 1) == (1, 2)
    for rate, burst in [(20.0, 40), (3.0, 7), (1.0, 10), (0.1, 1)]:
        amount, seconds = rate_window(rate, burst)
        assert amount <= burst and amount / seconds <= rate + 1e-9


def test_an_unreachable_redis_leaves_the_process_limits_in_charge(tmp_path: Path) -> None:
    from app.core.limits import Limits

    settings = make_settings(
        tmp_path, tmp_path, broker_url="redis://127.0.0.1:1/0", key_rate_per_second=1.0,
        key_rate_burst=3, key_max_in_flight=100,
    )  # fmt: skip
    limits = Limits.from_settings(settings)
    assert limits.shared is not None

    async def requests() -> list[str]:
        outcomes = []
        for _ in range(6):
            try:
                await limits.admit_key("k")
                await limits.check_address("10.1.2.3")
            except TooManyRequests as refusal:
                outcomes.append(refusal.code)
                continue
            limits.release_key("k")
            outcomes.append("ok")
        return outcomes

    started = time.monotonic()
    outcomes = asyncio.run(requests())
    assert outcomes[:3] == ["ok"] * 3 and set(outcomes[3:]) == {"rate_limited"}, outcomes
    assert time.monotonic() - started < 2.0
