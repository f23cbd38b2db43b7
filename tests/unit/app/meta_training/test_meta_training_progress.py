"""Meta-training progress that tells the truth: an ETA from the first iterations (with no curve
point), and a curve image that says "no points yet" before the first point."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.meta_training import handler
from app.meta_training.service import curve_png
from app.models import Job
from fewshot.config import MetaTrainConfig, ModelConfig
from fewshot.training import MetaTrainer, Progress, plot_curve
from tests.admin_data import dataset_zip, tiny_run, upload, wait_run
from tests.fewshot_helpers import synthetic_dataset
from tests.helpers import create_key

POINT = {"iteration": 25, "loss": 1.2, "train_accuracy": 0.4, "elapsed_s": 3.0, "val_5w1s": 0.5}


def _config(iterations: int) -> MetaTrainConfig:
    return MetaTrainConfig(
        iterations=iterations,
        meta_batch=2,
        ways=(4, 4),
        shots=(1, 1),
        queries=2,
        inner_steps=1,
        first_order_fraction=1.0,
        val_every=0,
        checkpoint_every_s=1e9,
        model=ModelConfig(width=8, image_size=12),
    )


def test_first_iterations_report_an_eta_without_curve_points(tmp_path: Path) -> None:
    seen: list[tuple[Progress, int]] = []
    trainer = MetaTrainer(_config(12), synthetic_dataset(classes=12), None, tmp_path / "run")
    result = trainer.run(
        on_progress=lambda report: seen.append((report, len(trainer.curve))),
        log_every=25,
        show_progress=False,
        early_reports=(1, 2, 5, 10),
    )
    assert [report.iteration for report, _ in seen] == [1, 2, 5, 10, 12]
    early = [(report, points) for report, points in seen if report.iteration <= 10]
    assert all(report.eta_s is not None and report.eta_s > 0 for report, _ in early)
    assert all(points == 0 and report.point == {} for report, points in early)
    # The ETA shrinks as the run goes on, and only the last report made a curve point.
    assert early[0][0].eta_s is not None and early[-1][0].eta_s is not None
    assert early[-1][0].eta_s < early[0][0].eta_s
    assert [point["iteration"] for point in result.curve] == [12]


def test_early_reports_count_from_where_a_resumed_run_starts(tmp_path: Path) -> None:
    MetaTrainer(_config(6), synthetic_dataset(classes=12), None, tmp_path / "run").run(
        log_every=6, show_progress=False
    )
    resumed = MetaTrainer(_config(12), synthetic_dataset(classes=12), None, tmp_path / "run")
    assert resumed.iteration == 6
    seen: list[int] = []
    resumed.run(
        on_progress=lambda report: seen.append(report.iteration),
        log_every=25,
        show_progress=False,
        early_reports=(1, 2),
    )
    assert seen == [7, 8, 12]


def test_an_empty_curve_says_no_points_yet(tmp_path: Path) -> None:
    # SVG keeps each text as a comment beside its outline: what the PNG shows can be read here.
    plot_curve([], tmp_path / "empty.svg")
    empty = (tmp_path / "empty.svg").read_text()
    assert "no points yet" in empty and "meta-iteration" not in empty
    plot_curve([POINT], tmp_path / "one.svg")
    drawn = (tmp_path / "one.svg").read_text()
    assert "no points yet" not in drawn and "meta-iteration" in drawn
    image = Image.open(io.BytesIO(curve_png(Job(progress_detail={}))))
    assert image.format == "PNG" and image.size == (1000, 400)


def test_a_run_reports_training_with_an_eta_before_its_first_curve_point(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    details: list[dict[str, Any]] = []
    report = handler._Reporter.progress

    def recorded(self: Any, *args: Any, **kwargs: Any) -> None:
        report(self, *args, **kwargs)
        details.append(dict(self.detail))

    monkeypatch.setattr(handler._Reporter, "progress", recorded)
    admin = create_key(client, "acme", admin=True)
    dataset = upload(client, admin, dataset_zip(), "generated").json()
    body = tiny_run(dataset["id"], log_every=6, validate_every=0, algorithm={"iterations": 12})
    started = client.post("/v1/admin/meta-trainings", headers=admin, json=body)
    assert started.status_code == 202, started.text
    run = wait_run(client, admin, started.json()["id"])
    assert run["state"] == "succeeded", run
    first = details[0]
    assert first["stage"] == "training" and first["iteration"] == 1
    assert first["eta_seconds"] is not None and first["curve"] == []
    assert [d["iteration"] for d in details] == [1, 2, 5, 6, 10, 12]
    assert [p["iteration"] for p in run["curve"]] == [6, 12]
