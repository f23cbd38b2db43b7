"""What keeps POST ?wait and predictions fast: cached models, one INSERT, pushed wake-ups, threads."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import event, select

import fewshot
import fewshot.batched
import fewshot.fast
from app.core import ml
from app.core import threads as torch_threads
from app.core.storage_local import LocalArtifactStore
from app.jobs import runner as runner
from app.jobs.dispatch import InProcessDispatcher
from app.main import create_app
from app.models import AdaptedModel, Prediction
from tests.helpers import create_ready_task, make_settings, query_files, runtime_of, support_files


@contextmanager
def _statements(client: TestClient) -> Iterator[list[tuple[str, bool]]]:
    """Every SQL statement the app's engine sends meanwhile, with its executemany flag."""
    engine = runtime_of(client).engine
    seen: list[tuple[str, bool]] = []

    def record(
        _conn: Any, _cursor: Any, statement: str, _params: Any, _ctx: Any, many: bool
    ) -> None:
        seen.append((statement, many))

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def test_the_adapted_model_is_cached_so_the_first_prediction_reads_no_weights(
    client: TestClient, auth: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    task = create_ready_task(client, auth, ["a", "b", "c"])
    model_id = uuid.UUID(task["adapted_model"]["id"])
    assert runtime_of(client).models.cached_adapted(model_id) is not None

    def no_load(*_: Any, **__: Any) -> None:
        raise AssertionError("the adapted model was read back from the store")

    monkeypatch.setattr(fewshot.AdaptedModel, "load", no_load)
    with _statements(client) as seen:
        response = client.post(
            f"/v1/tasks/{task['id']}/predictions", headers=auth, files=query_files(2)
        )
    assert response.status_code == 200, response.text
    # A cached model needs no initialization row either.
    assert not [s for s, _ in seen if "FROM initializations" in s]


def test_predictions_are_written_with_one_insert_in_request_order(
    client: TestClient, auth: dict[str, str]
) -> None:
    task = create_ready_task(client, auth, ["a", "b"])
    with _statements(client) as seen:
        response = client.post(
            f"/v1/tasks/{task['id']}/predictions", headers=auth, files=query_files(7)
        )
    assert response.status_code == 200, response.text
    inserts = [(s, many) for s, many in seen if s.lstrip().upper().startswith("INSERT")]
    assert len(inserts) == 1 and "predictions" in inserts[0][0], inserts
    body = response.json()
    with runtime_of(client).sessions() as session:
        rows = list(
            session.scalars(
                select(Prediction)
                .where(Prediction.request_id == uuid.UUID(body["request_id"]))
                .order_by(Prediction.position)
            )
        )
    assert [str(r.id) for r in rows] == [p["id"] for p in body["predictions"]]
    assert [r.label for r in rows] == [p["label"] for p in body["predictions"]]
    assert [r.probabilities for r in rows] == [p["probabilities"] for p in body["predictions"]]
    # Newest first lists the request's images in reverse order, as before.
    listed = client.get(f"/v1/tasks/{task['id']}/predictions", headers=auth).json()["items"]
    assert [p["position"] for p in listed] == list(range(6, -1, -1))


def test_wait_is_woken_by_the_runner_instead_of_polling(
    client: TestClient, auth: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    adapt = fewshot.fast.adapt_fast_with_embeddings

    def slow_adapt(*args: Any, **kwargs: Any) -> tuple[fewshot.AdaptedModel, torch.Tensor]:
        time.sleep(0.6)
        return adapt(*args, **kwargs)

    monkeypatch.setattr(ml, "adapt_fast_with_embeddings", slow_adapt)
    files, data = support_files(["a", "b"])
    with _statements(client) as seen:
        started = time.monotonic()
        response = client.post("/v1/tasks?wait=10", headers=auth, files=files, data=data)
        elapsed = time.monotonic() - started
    assert response.status_code == 201, response.text
    assert elapsed < 5
    state_reads = [s for s, _ in seen if s.lstrip().startswith("SELECT jobs.state")]
    # Polling with a growing delay read the row about a dozen times in 0.6 s; a pushed wake-up
    # that is told the job's state reads it only at the safety checks (0.25 s, then 0.75 s).
    assert len(state_reads) <= 2, len(state_reads)


def test_a_fast_wait_never_reads_the_job_row(client: TestClient, auth: dict[str, str]) -> None:
    create_ready_task(client, auth)  # warm-up
    files, data = support_files(["a", "b", "c"], seed=3)
    with _statements(client) as seen:
        started = time.monotonic()
        response = client.post("/v1/tasks?wait=10", headers=auth, files=files, data=data)
        elapsed = time.monotonic() - started
    assert response.status_code == 201, response.text
    state_reads = [s for s, _ in seen if s.lstrip().startswith("SELECT jobs.state")]
    # The end's announcement carries the committed state; no read on entry (sent just now).
    assert len(state_reads) <= int(elapsed / 0.25), (len(state_reads), elapsed)


def test_a_waiter_is_woken_after_another_waiter_on_the_job_gave_up(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    dispatcher = client.app.state.dispatcher  # type: ignore[attr-defined]
    assert isinstance(dispatcher, InProcessDispatcher)
    monkeypatch.setattr(runner, "run_job", lambda *_: runner.Outcome("done"))
    job_id = uuid.uuid4()
    with dispatcher.watch(job_id) as watch:
        assert watch.pushed
        with dispatcher.watch(job_id):
            pass  # another request on the same job stopped waiting
        dispatcher.submit(job_id, "adapt", "adapt")
        started = time.monotonic()
        watch.wait(5)
        assert time.monotonic() - started < 4


def _threads_seen(monkeypatch: pytest.MonkeyPatch) -> dict[str, set[int]]:
    seen: dict[str, set[int]] = {"adapt": set(), "predict": set()}
    adapt = fewshot.fast.adapt_fast_with_embeddings
    predict = fewshot.AdaptedModel.predict_scores

    def counting_predict(self: fewshot.AdaptedModel, *args: Any, **kwargs: Any) -> Any:
        seen["predict"].add(torch.get_num_threads())
        return predict(self, *args, **kwargs)

    def counting_adapt(*args: Any, **kwargs: Any) -> tuple[fewshot.AdaptedModel, torch.Tensor]:
        seen["adapt"].add(torch.get_num_threads())
        return adapt(*args, **kwargs)

    # Batched predictions (app.core.prediction_batcher) run predict_many_scores on the batching
    # thread; predictions on the request thread run AdaptedModel.predict_scores.
    predict_many = fewshot.batched.predict_many_scores

    def counting_predict_many(*args: Any, **kwargs: Any) -> Any:
        seen["predict"].add(torch.get_num_threads())
        return predict_many(*args, **kwargs)

    monkeypatch.setattr(ml, "adapt_fast_with_embeddings", counting_adapt)
    monkeypatch.setattr(fewshot.AdaptedModel, "predict_scores", counting_predict)
    monkeypatch.setattr(ml, "predict_many_scores", counting_predict_many)
    return seen


def test_jobs_and_predictions_run_torch_with_one_thread_each_by_default(
    client: TestClient, auth: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _threads_seen(monkeypatch)
    task = create_ready_task(client, auth, ["a", "b"])
    response = client.post(
        f"/v1/tasks/{task['id']}/predictions", headers=auth, files=query_files(2)
    )
    assert response.status_code == 200, response.text
    assert seen == {"adapt": {1}, "predict": {1}}


def test_torch_threads_setting_sizes_the_serving_threads(
    tmp_path: Path, tiny_init_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = torch.get_num_threads()
    try:
        settings = make_settings(tmp_path / "data", tiny_init_dir, torch_threads=3)
        with TestClient(create_app(settings)) as client:
            from tests.helpers import create_key

            auth = create_key(client, "acme")
            seen = _threads_seen(monkeypatch)
            task = create_ready_task(client, auth, ["a", "b"])
            client.post(f"/v1/tasks/{task['id']}/predictions", headers=auth, files=query_files(1))
        assert seen == {"adapt": {3}, "predict": {3}}
    finally:
        torch.set_num_threads(before)


def test_meta_training_keeps_torch_default_unless_set() -> None:
    assert torch_threads.serving_threads(None) == 1
    assert torch_threads.serving_threads(4) == 4
    assert torch_threads.training_threads(None) == torch_threads.torch_default() >= 1
    assert torch_threads.training_threads(2) == 2


def test_put_many_renames_into_place_and_leaves_nothing_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalArtifactStore(tmp_path / "store")
    store.put_many({"t/a/x.png": b"one", "t/a/y.png": b"two", "t/b/z.png": b"three"})
    assert store.read_bytes("t/a/x.png") == b"one"
    assert store.read_bytes("t/b/z.png") == b"three"
    assert sorted(p.name for p in (tmp_path / "store").rglob("*") if p.is_file()) == [
        "x.png",
        "y.png",
        "z.png",
    ]

    def broken_fsync(_fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("app.core.storage_local.os.fsync", broken_fsync)
    with pytest.raises(OSError):
        store.put_many({"t/c/x.png": b"new", "t/a/x.png": b"changed"})
    assert store.read_bytes("t/a/x.png") == b"one"
    assert not store.exists("t/c/x.png")
    assert not [p for p in (tmp_path / "store").rglob("*.tmp")]


def test_a_head_mode_task_stores_its_head_alone_and_predicts_the_same_after_a_reload(
    client: TestClient, auth: dict[str, str]
) -> None:
    sizes = {}
    for mode in ("head", "full"):
        files, data = support_files(["a", "b", "c"], seed=5)
        response = client.post(
            "/v1/tasks?wait=30", headers=auth, files=files, data={**data, "mode": mode}
        )
        assert response.status_code == 201, response.text
        sizes[mode] = response.json()
    runtime = runtime_of(client)
    with runtime.sessions() as session:
        rows = {
            mode: session.scalar(
                select(AdaptedModel).where(AdaptedModel.task_id == uuid.UUID(task["id"]))
            )
            for mode, task in sizes.items()
        }
    assert rows["head"] is not None and rows["full"] is not None
    assert rows["head"].size_bytes < rows["full"].size_bytes / 3
    url = f"/v1/tasks/{sizes['head']['id']}/predictions"
    before = client.post(url, headers=auth, files=query_files(3)).json()["predictions"]
    runtime.models._adapted.clear()  # the next request reads the head-only file
    after = client.post(url, headers=auth, files=query_files(3)).json()["predictions"]
    for old, new in zip(before, after, strict=True):
        assert new["probabilities"] == pytest.approx(old["probabilities"], abs=1e-6)


def test_the_model_cache_counts_each_models_objects_not_only_its_tensors(tmp_path: Path) -> None:
    from app.core.model_cache import MODEL_OVERHEAD_BYTES, ModelCache

    init = fewshot.Initialization.random(fewshot.ModelConfig(width=8, inner_steps=1), seed=0)
    x = torch.rand(2, 1, 28, 28)
    models = [fewshot.adapt(init, x, ["a", "b"], mode="head") for _ in range(4)]
    budget = 2 * (models[0].nbytes + MODEL_OVERHEAD_BYTES)
    cache = ModelCache(LocalArtifactStore(tmp_path), max_bytes=budget, device="cpu")
    ids = [uuid.uuid4() for _ in models]
    for model_id, model in zip(ids, models, strict=True):
        cache.put_adapted(model_id, model)
    # Counted at their tensors alone (a few hundred bytes) all four would fit.
    assert [cache.cached_adapted(i) is not None for i in ids] == [False, False, True, True]
    assert cache.cached_bytes == budget


def test_adapted_weights_are_written_durably_and_recorded_with_their_hash(
    client: TestClient, auth: dict[str, str], fsynced: list[str]
) -> None:
    synced = fsynced
    task = create_ready_task(client, auth)
    runtime = runtime_of(client)
    with runtime.sessions() as session:
        row = session.scalar(
            select(AdaptedModel).where(AdaptedModel.task_id == uuid.UUID(task["id"]))
        )
    assert row is not None
    path = runtime.store.path(row.weights_key)
    # fsynced under its temporary name, before the rename and before the row was committed;
    # then the folders whose entries changed: the rename's, and those of the new folders.
    assert any(Path(name).parent == path.parent and path.name in name for name in synced)
    # (The support images are in their rows: the weights made the task's folder.)
    task_folder = path.parent.parent
    assert not (task_folder / "support").exists()
    for folder in (path.parent, task_folder, task_folder.parent):
        assert str(folder) in synced, folder
    data = path.read_bytes()
    assert row.size_bytes == len(data)
    assert runtime.store.read_bytes(row.weights_key, row.sha256) == data


def test_a_page_of_tasks_costs_the_same_queries_as_one_task(
    client: TestClient, auth: dict[str, str]
) -> None:
    readapted = create_ready_task(client, auth, ["a", "b", "a"])
    for seed in range(5):
        files, data = support_files(["x", "y"], seed=seed)
        assert client.post("/v1/tasks?wait=30", headers=auth, files=files, data=data).is_success
    # One task re-adapted: two models and two jobs, of which the newest count.
    url = f"/v1/tasks/{readapted['id']}/adaptations"
    again = client.post(url, headers=auth, json={"mode": "head"})
    assert again.status_code == 202, again.text
    job_url = again.json()["links"]["self"]
    assert client.get(f"{job_url}?wait=30", headers=auth).json()["state"] == "succeeded"

    def listed(limit: int) -> tuple[dict[str, Any], int]:
        with _statements(client) as seen:
            body = client.get("/v1/tasks", headers=auth, params={"limit": limit}).json()
        return body, len(seen)

    one, one_count = listed(1)
    page, page_count = listed(6)
    assert len(one["items"]) == 1 and len(page["items"]) == 6
    assert page_count == one_count, (one_count, page_count)
    # The same figures as the single-task view.
    for item in page["items"]:
        alone = client.get(f"/v1/tasks/{item['id']}", headers=auth).json()
        assert item == alone
    first = next(i for i in page["items"] if i["id"] == readapted["id"])
    assert first["counts"] == {"a": 2, "b": 1}
    assert first["diagnostics"] is not None and first["adapted_model"]["mode"] == "head"
    assert first["links"]["job"] == job_url
