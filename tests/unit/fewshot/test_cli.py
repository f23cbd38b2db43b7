"""`python -m fewshot.cli evaluate` and `train` on tiny generated datasets."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fewshot
from fewshot.cli import main
from tests.fewshot_helpers import TINY, tiny_init, write_image_folder, zip_folder

REPO = Path(__file__).resolve().parents[3]


def test_evaluate_prints_one_json_object(tmp_path: Path) -> None:
    tiny_init(dtype=torch.float32).save(tmp_path / "init")
    write_image_folder(tmp_path / "set", groups=2, classes=4, images=4)
    archive = zip_folder(tmp_path / "set", tmp_path / "set.zip")
    env = {**os.environ, "FEWSHOT_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "fewshot.cli", "evaluate", "--data", str(archive)]
    command += ["--init", str(tmp_path / "init"), "--ways", "3", "--shots", "1", "--queries", "2"]
    command += ["--episodes", "6", "--device", "cpu", "--json"]
    done = subprocess.run(
        command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert {"accuracy", "ci95", "episodes", "ways", "shots"} <= result.keys()
    assert (result["episodes"], result["ways"], result["shots"]) == (6, 3, 1)
    assert 0.0 <= result["accuracy"] <= 1.0
    assert math.isfinite(result["ci95"]) and result["ci95"] >= 0
    assert list((tmp_path / "cache").glob("dataset-*.npz")), "the zip was not cached where asked"


def test_evaluate_text_output_and_groups(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny_init(dtype=torch.float32).save(tmp_path / "init")
    write_image_folder(tmp_path / "set", groups=2, classes=3, images=3)
    args = ["evaluate", "--data", str(tmp_path / "set"), "--init", str(tmp_path / "init")]
    args += ["--ways", "3", "--shots", "1", "--queries", "1", "--episodes", "3", "--device", "cpu"]
    assert main([*args, "--groups", "group1", "--within-group"]) == 0
    assert "3-way 1-shot (full, 3 steps):" in capsys.readouterr().out


def test_train_writes_an_initialization_with_a_model_card(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Six images per class: enough for 5-way 1-shot validation, too few for 5-shot (skipped).
    write_image_folder(tmp_path / "set", groups=2, classes=5, images=6)
    monkeypatch.chdir(tmp_path)
    args = [
        "train", "--data", "set", "--out", "run", "--holdout-groups", "1",
        "--iterations", "3", "--meta-batch", "2", "--ways", "2", "3", "--shots", "1", "1",
        "--queries", "1", "--steps", "1", "--val-every", "0", "--val-episodes", "2",
        "--report-episodes", "2", "--no-rotations", "--device", "cpu", "--version", "tiny-cli",
    ]  # fmt: skip
    # The model card records the command line as the console script saw it.
    monkeypatch.setattr(sys, "argv", ["maml-serve", *args])
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    folder = tmp_path / printed["path"]
    assert folder == tmp_path / "run" / "initialization"
    init = fewshot.Initialization.load(folder)
    assert init.version == "tiny-cli"
    assert init.config.inner_steps == 1
    assert init.metadata["iterations"] == 3
    assert len(init.metadata["validation_groups"]) == 1
    assert set(init.metadata["metrics"]) == {"5-way 1-shot"}
    card = (folder / "README.md").read_text()
    assert card.startswith("# Initialization tiny-cli")
    for text in (
        "**Command**: `maml-serve train --data set",
        "Validation groups",
        "| 5-way 1-shot |",
    ):
        assert text in card
    assert (tmp_path / "run" / "curve.json").is_file() and (
        tmp_path / "run" / "curve.png"
    ).is_file()
    assert len(init.metadata["training_groups"]) == 1
    assert set(init.metadata["training_groups"]).isdisjoint(init.metadata["validation_groups"])


def _evaluate_args(tmp_path: Path) -> list[str]:
    write_image_folder(tmp_path / "set", groups=2, classes=3, images=3)
    args = ["evaluate", "--data", str(tmp_path / "set"), "--init", str(tmp_path / "init")]
    return [*args, "--ways", "3", "--shots", "1", "--queries", "1", "--episodes", "3"]


def test_evaluate_reports_zero_steps_and_warns_about_training_groups(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    init = tiny_init(dtype=torch.float32)
    init.metadata["training_groups"] = ["group1"]
    init.metadata["version"] = "tiny-v9"
    init.save(tmp_path / "init")
    args = _evaluate_args(tmp_path)
    assert main([*args, "--groups", "group1", "--within-group", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "; 0 steps: " in captured.out and "adaptation gain" in captured.out
    assert "warning: tiny-v9 was meta-trained on 1 of these groups (group1)" in captured.err
    assert "evaluate: 100%" in captured.err  # the progress bar
    assert main([*args, "--groups", "group0", "--within-group", "--no-progress", "--json"]) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err and "evaluate" not in captured.err
    result = json.loads(captured.out)
    assert {"accuracy_0_steps", "adaptation_gain", "adaptation_gain_ci95"} <= result.keys()


def test_evaluate_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny_init(dtype=torch.float32).save(tmp_path / "init")
    args = _evaluate_args(tmp_path)
    assert main([*args, "--groups", "Latin", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: unknown group(s) Latin; the data has: group0, group1"
    assert main([*args[:-6], "--ways", "9", "--shots", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    missing = ["evaluate", "--data", str(tmp_path / "nowhere"), "--ways", "2", "--shots", "1"]
    assert main(missing) == 2
    assert capsys.readouterr().err.strip().startswith("error: dataset ")


def test_calibrate_takes_an_ungrouped_held_out_set_whole(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """mini-ImageNet's val zip has no groups: `calibrate` uses all of it and reports the shapes
    it can supply (5-way needs 10 classes; 20-way is left out), on cached head embeddings."""
    import dataclasses

    head = dataclasses.replace(TINY, default_mode="head", inner_steps=3)
    tiny_init(head, dtype=torch.float32).save(tmp_path / "init")
    write_image_folder(tmp_path / "val", classes=10, images=10)
    args = ["calibrate", "--data", str(tmp_path / "val"), "--init", str(tmp_path / "init")]
    # Off by default (0), reported at the threshold a caller would ask for.
    shown = ["--threshold", "0", "--report-threshold", "0.05"]
    assert main([*args, "--episodes", "3", "--report-episodes", "2", *shown]) == 0
    unknown = fewshot.Initialization.load(tmp_path / "init").metadata["unknown"]
    assert unknown["threshold"] == 0.0
    assert {r["threshold"] for r in unknown["details"]["report"].values()} == {0.05}
    assert set(unknown["scores_by_shape"]) == {"5x1", "5x2", "5x3", "5x5"}
    assert set(unknown["details"]["report"]) == {"5-way 1-shot", "5-way 5-shot"}
    assert unknown["details"]["groups"] == []
    assert "5-way 1-shot" in capsys.readouterr().out
    # The norm check's table: one norm per held-out image (10 classes x 10), unless turned off.
    assert len(unknown["norms"]) == 100 and unknown["norms"] == sorted(unknown["norms"])
    assert main([*args, "--episodes", "3", "--report-episodes", "2", "--no-norm-check"]) == 0
    assert "norms" not in fewshot.Initialization.load(tmp_path / "init").metadata["unknown"]


def test_calibrate_as_a_new_version_covers_20_shot_tasks_and_leaves_the_source(
    tmp_path: Path,
) -> None:
    """With enough images a class, the tables reach 10 and 20 shots (a 20-shot task read against
    the 5-shot table flagged most genuine queries); `--version` writes a new version with its card
    and never renames the source."""
    import dataclasses

    head = dataclasses.replace(TINY, default_mode="head", inner_steps=3)
    source = tiny_init(head, dtype=torch.float32)
    source.metadata["version"] = "tiny-v1"
    source.save(tmp_path / "init")
    write_image_folder(tmp_path / "val", classes=10, images=26)
    args = ["calibrate", "--data", str(tmp_path / "val"), "--init", str(tmp_path / "init")]
    args += ["--episodes", "2", "--report-episodes", "2", "--norm-share", "0.1"]
    assert main([*args, "--version", "tiny-v2"]) == 2  # in place would rename the source
    assert main([*args, "--out", str(tmp_path / "new"), "--version", "tiny-v2"]) == 0
    new = fewshot.Initialization.load(tmp_path / "new")
    assert new.version == "tiny-v2" and new.metadata["calibrated_from"] == "tiny-v1"
    unknown = new.metadata["unknown"]
    assert set(unknown["scores_by_shape"]) == {"5x1", "5x2", "5x3", "5x5", "5x10", "5x20"}
    assert "5-way 20-shot" in unknown["details"]["report"]
    assert unknown["norm_share"] == 0.1
    card = (tmp_path / "new" / "README.md").read_text()
    assert "# Initialization tiny-v2" in card and "Calibrated anew from**: tiny-v1" in card
    assert "--version tiny-v2" in new.metadata["calibration_command"]
    untouched = fewshot.Initialization.load(tmp_path / "init")
    assert untouched.version == "tiny-v1" and "unknown" not in untouched.metadata
