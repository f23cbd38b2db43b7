"""Adapt jobs waiting in line are adapted in one pass, each claimed, recorded and ended on its own."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file
from sqlalchemy import select, update

import fewshot
from app.adaptations.handler import support_image_bytes
from app.core.runtime import Runtime
from app.jobs import runner
from app.models import AdaptedModel, Initialization, Job, SupportExample
from tests.helpers import runtime_of, support_files


def _queued_tasks(
    client: TestClient, auth: dict[str, str], labels: list[list[str]]
) -> list[uuid.UUID]:
    """Tasks whose adapt jobs are committed but never sent anywhere; their job ids."""
    client.app.state.dispatcher.submit = lambda *args: None  # type: ignore[attr-defined]
    ids = []
    for seed, names in enumerate(labels):
        files, data = support_files(names, seed=seed)
        body = client.post("/v1/tasks", headers=auth, files=files, data=data).json()
        ids.append(uuid.UUID(body["job"]["id"]))
    return ids


def _jobs(runtime: Runtime, ids: list[uuid.UUID]) -> dict[uuid.UUID, Job]:
    with runtime.sessions() as session:
        rows = session.scalars(select(Job).where(Job.id.in_(ids))).all()
        for row in rows:
            session.expunge(row)
        return {row.id: row for row in rows}


def test_one_delivery_adapts_the_line_and_each_job_ends_on_its_own(
    client: TestClient, auth: dict[str, str]
) -> None:
    runtime = runtime_of(client)
    labels = [["a", "b", "c"], ["x", "y"], ["p", "q", "r"], ["u", "v", "w"], ["m", "n", "o"]]
    ids = _queued_tasks(client, auth, labels)
    # Corrupt one stored support image: that job alone fails.
    with runtime.sessions() as session:
        job = session.get(Job, ids[3])
        assert job is not None
        example = session.scalars(
            select(SupportExample).where(SupportExample.task_id == job.task_id)
        ).first()
        assert example is not None and example.data is not None
        example.data = b"not the image"
        session.commit()

    assert runner.run_job(runtime, ids[0]).status == "done"
    jobs = _jobs(runtime, ids)
    assert [jobs[i].state for i in ids] == ["succeeded"] * 3 + ["failed", "succeeded"]
    assert jobs[ids[3]].error_code == "artifact_corrupt"
    assert all(jobs[i].attempts == 1 and jobs[i].claimed_by for i in ids)
    # The other jobs' own deliveries find them ended and do nothing.
    assert [runner.run_job(runtime, i).status for i in ids[1:]] == ["skipped"] * 4

    with runtime.sessions() as session:
        rows = {row.job_id: row for row in session.scalars(select(AdaptedModel)).all()}
        assert set(rows) == {ids[0], ids[1], ids[2], ids[4]}
        for position, job_id in enumerate(ids):
            if job_id not in rows:
                continue
            row = rows[job_id]
            examples = session.scalars(
                select(SupportExample)
                .where(SupportExample.task_id == row.task_id)
                .order_by(SupportExample.position)
            ).all()
            init_row = session.get(Initialization, row.initialization_id)
            assert init_row is not None
            model_init = runtime.models.initialization(init_row)
            images = [fewshot.decode_image(support_image_bytes(runtime, e)) for e in examples]
            alone = fewshot.adapt(
                model_init,
                fewshot.preprocess_images(images, model_init.config),
                [e.label for e in examples],
            )
            stored = load_file(str(runtime.store.path(row.weights_key)))
            assert row.labels == labels[position] == alone.labels
            for name, value in alone.params.items():
                torch.testing.assert_close(stored[name], value, atol=1e-4, rtol=1e-4)
            # Diagnostics from the batch's shared embedding pass: diagnose_support's figures.
            recorded = session.get(Job, job_id)
            assert recorded is not None and recorded.result is not None
            direct = fewshot.diagnose_support(
                model_init,
                fewshot.preprocess_images(images, model_init.config),
                [e.label for e in examples],
            ).to_dict()
            _same_diagnostics(recorded.result["diagnostics"], direct)


def _same_diagnostics(got: dict[str, Any], want: dict[str, Any]) -> None:
    """Equal diagnostics, similarities to float32 rounding."""
    assert got["leave_one_out_accuracy"] == want["leave_one_out_accuracy"]
    assert got["per_class"] == want["per_class"]
    assert got["evaluated_images"] == want["evaluated_images"]
    assert len(got["confusable_pairs"]) == len(want["confusable_pairs"]) > 0
    for a, b in zip(got["confusable_pairs"], want["confusable_pairs"], strict=True):
        assert a["similarity"] == pytest.approx(b["similarity"], abs=2e-4)


def test_a_job_another_worker_claimed_first_stays_out_of_the_batch(
    client: TestClient, auth: dict[str, str]
) -> None:
    runtime = runtime_of(client)
    ids = _queued_tasks(client, auth, [["a", "b"], ["c", "d"], ["e", "f"]])
    with runtime.sessions() as session:
        session.execute(
            update(Job)
            .where(Job.id == ids[1])
            .values(state="running", attempts=1, claimed_by="elsewhere")
        )
        session.commit()
    assert runner.run_job(runtime, ids[0]).status == "done"
    jobs = _jobs(runtime, ids)
    assert jobs[ids[0]].state == jobs[ids[2]].state == "succeeded"
    assert jobs[ids[1]].state == "running" and jobs[ids[1]].claimed_by == "elsewhere"
