"""The prediction batcher: concurrent requests for different models share passes, answers stay exact."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

import fewshot
import fewshot.batched
from app.core import ml
from app.core import prediction_batcher as batching
from app.core.prediction_batcher import PredictionBatcher
from app.main import create_app
from fewshot.adapted import PredictionScores
from tests.fewshot_helpers import TINY, random_images, tiny_init
from tests.helpers import create_key, make_settings, query_files, support_files


@pytest.fixture(scope="module")
def models() -> list[fewshot.AdaptedModel]:
    """Six adapted models of one tiny initialization: full and head-only, 2 to 4 ways."""
    init = tiny_init(dtype=torch.float32)
    out = []
    for i in range(6):
        ways = 2 + i % 3
        support = random_images(ways, seed=100 + i, dtype=torch.float32)
        labels = [f"c{k}" for k in range(ways)]
        out.append(fewshot.adapt(init, support, labels, mode="head" if i % 2 else "full"))
    return out


@dataclass
class Passes:
    """The number of requests in each batched pass, and how long each pass is held."""

    calls: list[int] = field(default_factory=list)
    hold: float = 0.0


@pytest.fixture
def passes(monkeypatch: pytest.MonkeyPatch) -> Passes:
    """Records every batched prediction pass (fewshot.batched.predict_many_scores)."""
    seen = Passes()
    real = fewshot.batched.predict_many_scores

    def counting(
        ms: list[fewshot.AdaptedModel],
        xs: list[torch.Tensor],
        ts: list[float | None],
        chunk: int = 32,
    ) -> list[PredictionScores]:
        seen.calls.append(len(ms))
        time.sleep(seen.hold)
        return real(ms, xs, ts, chunk=chunk)

    monkeypatch.setattr(ml, "predict_many_scores", counting)
    return seen


def _run_concurrently(
    batcher: PredictionBatcher, jobs: list[tuple[fewshot.AdaptedModel, torch.Tensor]]
) -> list[torch.Tensor | BaseException]:
    results: list[torch.Tensor | BaseException] = [RuntimeError("not run")] * len(jobs)
    start = threading.Barrier(len(jobs))

    def one(i: int) -> None:
        start.wait()
        try:
            results[i] = batcher.predict_proba(*jobs[i])
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


def test_concurrent_requests_share_passes_and_get_their_own_probabilities(
    models: list[fewshot.AdaptedModel], passes: Passes
) -> None:
    calls = passes.calls
    batcher = PredictionBatcher(wait_seconds=0.2, max_images=10_000, threads=1)
    jobs = [
        (models[i % len(models)], random_images(1 + i % 5, seed=200 + i, dtype=torch.float32))
        for i in range(12)
    ]
    results = _run_concurrently(batcher, jobs)
    batcher.close()
    for (model, x), result in zip(jobs, results, strict=True):
        assert isinstance(result, torch.Tensor)
        torch.testing.assert_close(result, model.predict_proba(x), atol=1e-5, rtol=0)
    assert sum(calls) == len(jobs)
    assert len(calls) < len(jobs), "no two requests shared a pass"


def test_a_bad_request_fails_alone(models: list[fewshot.AdaptedModel]) -> None:
    batcher = PredictionBatcher(wait_seconds=0.2, max_images=10_000, threads=1)
    wrong = torch.rand(2, TINY.in_channels, TINY.image_size + 1, TINY.image_size)
    jobs = [
        (models[0], random_images(3, seed=1, dtype=torch.float32)),
        (models[1], wrong),
        (models[2], random_images(2, seed=2, dtype=torch.float32)),
    ]
    results = _run_concurrently(batcher, jobs)
    batcher.close()
    assert isinstance(results[1], fewshot.EpisodeError)
    for i in (0, 2):
        result = results[i]
        assert isinstance(result, torch.Tensor)
        torch.testing.assert_close(result, jobs[i][0].predict_proba(jobs[i][1]), atol=1e-5, rtol=0)


def test_the_batching_thread_exits_when_idle_and_restarts(
    models: list[fewshot.AdaptedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batching, "IDLE_EXIT_SECONDS", 0.05)
    batcher = PredictionBatcher(wait_seconds=0.0, max_images=64, threads=1)
    x = random_images(2, seed=3, dtype=torch.float32)
    first = batcher.predict_proba(models[0], x)
    deadline = time.monotonic() + 5
    while batcher._thread is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batcher._thread is None
    torch.testing.assert_close(batcher.predict_proba(models[0], x), first)
    batcher.close()


def test_concurrent_http_predictions_of_head_models_share_passes(
    client: TestClient, auth: dict[str, str], passes: Passes
) -> None:
    tasks = []
    for seed in range(4):
        files, data = support_files(["a", "b", "c"], seed=seed)
        body = client.post(
            "/v1/tasks?wait=30", headers=auth, files=files, data={**data, "mode": "head"}
        ).json()
        assert body["status"] == "ready", body
        tasks.append(body["id"])
    calls = passes.calls
    passes.hold = 0.05  # hold each batch so the other requests line up behind it
    start = threading.Barrier(len(tasks))
    answers: dict[str, Any] = {}

    def predict(task_id: str) -> None:
        start.wait()
        response = client.post(
            f"/v1/tasks/{task_id}/predictions", headers=auth, files=query_files(3, seed=7)
        )
        assert response.status_code == 200, response.text
        answers[task_id] = response.json()

    threads = [threading.Thread(target=predict, args=(task_id,)) for task_id in tasks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sum(calls) == len(tasks) and len(calls) < len(tasks)
    # Each request's answer equals the same images predicted alone, afterwards.
    for task_id in tasks:
        alone = client.post(
            f"/v1/tasks/{task_id}/predictions", headers=auth, files=query_files(3, seed=7)
        ).json()
        for a, b in zip(answers[task_id]["predictions"], alone["predictions"], strict=True):
            assert a["label"] == b["label"]
            for label, p in a["probabilities"].items():
                assert abs(p - b["probabilities"][label]) < 1e-5


def _timed_predict(
    batcher: PredictionBatcher, model: fewshot.AdaptedModel, x: torch.Tensor
) -> float:
    started = time.monotonic()
    batcher.predict_proba(model, x)
    return time.monotonic() - started


def test_an_adaptive_batch_waits_only_for_announced_requests(
    models: list[fewshot.AdaptedModel], passes: Passes
) -> None:
    calls = passes.calls
    x = random_images(2, seed=5, dtype=torch.float32)
    model = models[1]
    model.predict_proba(x)  # warm
    window = 0.6
    fixed = PredictionBatcher(wait_seconds=window, max_images=64, threads=1)
    adaptive = PredictionBatcher(wait_seconds=window, max_images=64, threads=1, adaptive=True)
    # Alone: the fixed window holds the request for company; the adaptive batcher runs at once.
    assert _timed_predict(fixed, model, x) >= window
    assert _timed_predict(adaptive, model, x) < window / 2

    # An announced request is waited for and shares the pass.
    calls.clear()
    coming = adaptive.expect()
    first = threading.Thread(target=adaptive.predict_proba, args=(model, x))
    first.start()
    time.sleep(0.1)
    assert first.is_alive(), "the batch did not wait for the announced request"
    second = adaptive.predict_scores(models[3], x, expected=coming)
    first.join(10)
    assert calls == [2]
    torch.testing.assert_close(second.probabilities, models[3].predict_proba(x), atol=1e-5, rtol=0)

    # One that withdraws (it failed before predicting) ends the wait at once.
    calls.clear()
    gone = adaptive.expect()
    started = time.monotonic()
    alone = threading.Thread(target=adaptive.predict_proba, args=(model, x))
    alone.start()
    time.sleep(0.1)
    assert alone.is_alive()
    gone.withdraw()
    gone.withdraw()  # idempotent: the count of requests on their way stays right
    alone.join(10)
    assert time.monotonic() - started < window
    assert calls == [1]
    assert _timed_predict(adaptive, model, x) < window / 2
    fixed.close()
    adaptive.close()


def _head_task_predictions(client: TestClient, labels: list[str]) -> tuple[dict[str, str], str]:
    """A new key's headers and the predictions URL of its ready head-mode task."""
    auth = create_key(client, "acme")
    files, data = support_files(labels)
    body = client.post(
        "/v1/tasks?wait=30", headers=auth, files=files, data={**data, "mode": "head"}
    ).json()
    assert body["status"] == "ready", body
    return auth, f"/v1/tasks/{body['id']}/predictions"


def test_a_lone_http_prediction_of_a_head_model_is_not_held(
    tmp_path: Path, tiny_init_dir: Path
) -> None:
    # A long window: a request that waited for company it was not told about would show it.
    settings = make_settings(tmp_path / "data", tiny_init_dir, predict_batch_wait_ms=1500)
    with TestClient(create_app(settings)) as client:
        auth, url = _head_task_predictions(client, ["a", "b", "c"])
        client.post(url, headers=auth, files=query_files(2))  # warm
        for attempt in range(3):
            # A request refused before it predicts withdraws its announcement too.
            bad = client.post(
                url, headers=auth, files=[("images", ("x.png", b"nope", "image/png"))]
            )
            assert bad.status_code == 422
            started = time.monotonic()
            response = client.post(url, headers=auth, files=query_files(2, seed=attempt))
            assert response.status_code == 200, response.text
            assert time.monotonic() - started < 0.75


def _queue_behind(
    batcher: PredictionBatcher, model: fewshot.AdaptedModel, x: torch.Tensor, count: int
) -> list[threading.Thread]:
    """`count` requests started 50 ms apart, each joining the line behind the one before."""
    running = [
        threading.Thread(target=batcher.predict_proba, args=(model, x)) for _ in range(count)
    ]
    for thread in running:
        thread.start()
        time.sleep(0.05)
    return running


def test_a_request_that_would_wait_too_long_is_refused_and_an_empty_line_always_runs(
    models: list[fewshot.AdaptedModel], passes: Passes
) -> None:
    from app.core.errors import PredictionsBusy

    passes.hold = 0.3
    batcher = PredictionBatcher(
        wait_seconds=0.0, max_images=8, threads=1, workers=1, max_wait_seconds=0.4
    )
    model, x = models[1], random_images(8, seed=5, dtype=torch.float32)
    # A lone request runs however long the line has taken lately: nothing waits before it.
    expected = model.predict_proba(x)
    torch.testing.assert_close(batcher.predict_proba(model, x), expected, atol=1e-5, rtol=0)
    assert batcher.waiting_seconds() == 0.0
    # One batch running (8 images, ~0.3 s) and one queued behind it: ~0.6 s for a third.
    running = _queue_behind(batcher, model, x, 2)
    assert batcher.waiting_seconds() > 0.4
    with pytest.raises(PredictionsBusy) as refused:
        batcher.predict_proba(model, x)
    assert refused.value.status == 503 and refused.value.code == "predictions_busy"
    assert int(refused.value.headers["Retry-After"]) >= 1
    for thread in running:
        thread.join(10)
    # The line drained: a request runs again.
    assert batcher.waiting_seconds() == 0.0
    torch.testing.assert_close(batcher.predict_proba(model, x), expected, atol=1e-5, rtol=0)
    # Without a bound the same backlog is joined, not refused.
    batcher.max_wait_seconds = 0.0
    running = _queue_behind(batcher, model, x, 2)
    torch.testing.assert_close(batcher.predict_proba(model, x), expected, atol=1e-5, rtol=0)
    for thread in running:
        thread.join(10)
    batcher.close()


def test_an_http_prediction_behind_a_long_line_is_a_503_problem_and_writes_nothing(
    tmp_path: Path, tiny_init_dir: Path
) -> None:
    settings = make_settings(tmp_path / "data", tiny_init_dir, predict_max_wait_seconds=5)
    with TestClient(create_app(settings)) as client:
        auth, url = _head_task_predictions(client, ["a", "b"])
        assert client.post(url, headers=auth, files=query_files(2)).status_code == 200
        batcher = client.app.state.runtime.models._batcher  # type: ignore[attr-defined]
        assert batcher is not None and batcher.max_wait_seconds == 5
        # A backlog as a crowd would leave it: a minute of images ahead in this process's line.
        with batcher._cond:
            batcher._pending_images += 600
            batcher._seconds_per_image = 0.1
        response = client.post(url, headers=auth, files=query_files(2, seed=1))
        assert response.status_code == 503, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["code"] == "predictions_busy"
        assert 1 <= int(response.headers["Retry-After"]) <= 60
        with batcher._cond:
            batcher._pending_images -= 600
        listed = client.get(url, headers=auth).json()
        assert len(listed["items"]) == 2, "the refused request wrote predictions"
        assert client.post(url, headers=auth, files=query_files(2, seed=2)).status_code == 200
