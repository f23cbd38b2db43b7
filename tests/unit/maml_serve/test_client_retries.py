"""maml_serve.Client's retries of 409 not_adapted_yet and 503, on a scripted transport."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

import maml_serve
import maml_serve.client
from maml_serve import (
    Client,
    NotAdaptedYet,
    RetryPolicy,
    ServiceUnavailable,
    TransportError,
)

TASK = "00000000-0000-0000-0000-000000000001"
PREDICTED = {
    "task_id": TASK,
    "adapted_model_id": "00000000-0000-0000-0000-000000000002",
    "request_id": "00000000-0000-0000-0000-000000000003",
    "predictions": [
        {
            "id": "p",
            "label": "a",
            "probabilities": {"a": 0.9, "b": 0.1},
            "top_k": [],
            "image_sha256": "",
        }
    ],
}


def _problem(status: int, code: str, retry_after: str | None) -> httpx.Response:
    headers = {"content-type": "application/problem+json"}
    if retry_after is not None:
        headers["Retry-After"] = retry_after
    body = {"type": "x", "title": "t", "status": status, "code": code, "detail": f"{code} now"}
    return httpx.Response(status, headers=headers, content=json.dumps(body).encode())


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """The delays the client slept, without sleeping."""
    slept: list[float] = []
    monkeypatch.setattr(maml_serve.client.time, "sleep", slept.append)
    yield slept


def _client(answers: list[httpx.Response], seen: list[httpx.Request], **policy: float) -> Client:
    queue = iter(answers)

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return next(queue)

    retry = RetryPolicy(**policy)  # type: ignore[arg-type]
    return Client("http://service", "k", transport=httpx.MockTransport(handler), retry=retry)


def test_not_adapted_yet_and_503_are_retried_after_their_retry_after(sleeps: list[float]) -> None:
    seen: list[httpx.Request] = []
    answers = [
        _problem(409, "not_adapted_yet", "2"),
        _problem(503, "broker_unavailable", "1"),
        _problem(429, "rate_limited", "4"),
        httpx.Response(200, json=PREDICTED),
    ]
    with _client(answers, seen) as client:
        result = client.predict(TASK, [b"\x89PNG\r\n\x1a\nrest"], top_k=1)
    assert result.labels == ["a"]
    assert sleeps == [2.0, 1.0, 4.0]
    assert len(seen) == 4
    # The multipart body is sent whole every time.
    assert all(b"\x89PNG" in r.content and b"top_k" in r.content for r in seen)


def test_retries_are_bounded_and_end_in_the_typed_error(sleeps: list[float]) -> None:
    seen: list[httpx.Request] = []
    answers = [_problem(503, "no_active_initialization", "1") for _ in range(10)]
    with (
        _client(answers, seen, max_retries=3) as client,
        pytest.raises(ServiceUnavailable) as caught,
    ):
        client.list_tasks()
    assert len(seen) == 4 and sleeps == [1.0, 1.0, 1.0]
    error = caught.value
    assert (error.status, error.code, error.detail) == (
        503,
        "no_active_initialization",
        "no_active_initialization now",
    )
    assert error.retry_after == 1.0


def test_total_retry_time_is_bounded(sleeps: list[float]) -> None:
    seen: list[httpx.Request] = []
    answers = [_problem(409, "not_adapted_yet", "5") for _ in range(10)]
    with _client(answers, seen, max_total_delay=12) as client, pytest.raises(NotAdaptedYet):
        client.predict(TASK, [b"img"])
    assert sleeps == [5.0, 5.0]


def test_other_conflicts_and_non_idempotent_posts_are_not_retried(sleeps: list[float]) -> None:
    seen: list[httpx.Request] = []
    answers = [_problem(409, "adaptation_failed", None), _problem(503, "broker_unavailable", "1")]
    with _client(answers, seen) as client:
        with pytest.raises(Exception, match="adaptation_failed"):
            client.predict(TASK, [b"img"])
        with pytest.raises(ServiceUnavailable):
            client.start_meta_training("d")
    assert sleeps == [] and len(seen) == 2


def test_create_task_sends_one_idempotency_key_across_retries(sleeps: list[float]) -> None:
    seen: list[httpx.Request] = []
    task = {"id": TASK, "status": "adapting", "labels": ["a", "b"], "counts": {"a": 1, "b": 1}}
    answers = [_problem(503, "broker_unavailable", "0"), httpx.Response(202, json=task)]
    with _client(answers, seen) as client:
        created = client.create_task({"a": [b"1"], "b": [b"2"]})
    assert created.status == "adapting"
    keys = {r.headers["Idempotency-Key"] for r in seen}
    assert len(seen) == 2 and len(keys) == 1


def test_unreachable_server_is_a_transport_error() -> None:
    with Client("http://127.0.0.1:9", "k", timeout=2) as client, pytest.raises(TransportError):
        client.list_tasks()


def test_async_client_retries_the_same_way(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    import maml_serve.async_client

    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(maml_serve.async_client.asyncio, "sleep", fake_sleep)
    answers = iter([_problem(409, "not_adapted_yet", "3"), httpx.Response(200, json=PREDICTED)])

    async def scenario() -> list[str]:
        transport = httpx.MockTransport(lambda request: next(answers))
        async with maml_serve.AsyncClient("http://service", "k", transport=transport) as client:
            return (await client.predict(TASK, [b"img"])).labels

    assert asyncio.run(scenario()) == ["a"]
    assert slept == [3.0]
