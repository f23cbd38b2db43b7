"""A short real meta-training run: the loss goes down, it resumes exactly, it can be cancelled."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import fewshot
from fewshot.config import MetaTrainConfig, ModelConfig
from fewshot.errors import EpisodeError
from fewshot.training import CURVE_FILE, CURVE_PLOT, STATE_FILE, MetaTrainer, Progress
from tests.fewshot_helpers import synthetic_dataset

TRAIN = synthetic_dataset(classes=30, per_class=8, groups=3, seed=0)
VAL = synthetic_dataset(classes=6, per_class=8, groups=2, seed=1)


def _config(**overrides: object) -> MetaTrainConfig:
    """A tiny run: 4-way tasks of 12x12 images, one inner step, no schedules that follow time."""
    values: dict[str, object] = {
        "iterations": 60,
        "meta_batch": 4,
        "ways": (4, 4),
        "shots": (1, 2),
        "queries": 3,
        "inner_steps": 1,
        "inner_step_size": 0.1,
        "first_order_fraction": 0.5,
        "outer_lr": 0.03,
        "cosine_annealing": False,
        "rotations": False,
        "val_every": 0,
        "val_episodes": 4,
        "checkpoint_every_s": 1e9,
        "model": ModelConfig(width=8, image_size=12),
    }
    values.update(overrides)
    return MetaTrainConfig(**values)  # type: ignore[arg-type]


def test_meta_training_lowers_the_loss_and_writes_its_outputs(tmp_path: Path) -> None:
    seen: list[Progress] = []
    trainer = MetaTrainer(_config(), TRAIN, VAL, tmp_path / "run")
    result = trainer.run(log_every=10, show_progress=False, on_progress=seen.append)

    losses = [point["loss"] for point in result.curve]
    assert len(losses) == 6
    # First order for 30 iterations, then second order; both phases keep learning.
    assert losses[-1] < losses[0] - 0.2, losses
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    assert result.curve[-1]["train_accuracy"] > result.curve[0]["train_accuracy"]
    assert 0.0 <= result.curve[-1]["val_5w1s"] <= 1.0

    assert not result.cancelled and result.iteration == 60
    assert json.loads((tmp_path / "run" / CURVE_FILE).read_text()) == result.curve
    assert (tmp_path / "run" / CURVE_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.iteration for p in seen] == [10, 20, 30, 40, 50, 60]
    assert result.path is not None and result.initialization is not None
    saved = fewshot.Initialization.load(result.path)
    assert saved.metadata["iterations"] == 60
    assert saved.config.inner_steps == 1
    for name, value in result.initialization.params.items():
        assert torch.equal(saved.params[name], value), name
    # Step sizes were learned (LSLR), not left at their start.
    assert any(not torch.allclose(s, torch.full_like(s, 0.1)) for s in saved.step_sizes.values())


def test_resume_continues_at_the_saved_iteration_with_identical_parameters(tmp_path: Path) -> None:
    # Second order throughout, so the schedule does not depend on the total iteration count.
    straight = MetaTrainer(
        _config(iterations=8, first_order_fraction=0.0), TRAIN, None, tmp_path / "a"
    )
    straight.run(log_every=4, show_progress=False)

    first = MetaTrainer(
        _config(iterations=4, first_order_fraction=0.0), TRAIN, None, tmp_path / "b"
    )
    first.run(log_every=4, show_progress=False)
    resumed = MetaTrainer(
        _config(iterations=8, first_order_fraction=0.0), TRAIN, None, tmp_path / "b"
    )
    assert resumed.iteration == 4
    assert resumed.optimizer.step_count == first.optimizer.step_count == 4
    for name, value in first.params.items():
        assert torch.equal(resumed.params[name], value), name
    for name, value in first.step_sizes.items():
        assert torch.equal(resumed.step_sizes[name], value), name

    result = resumed.run(log_every=4, show_progress=False)
    assert result.iteration == 8
    assert [p["iteration"] for p in result.curve] == [4, 8]
    for name, value in straight.params.items():
        torch.testing.assert_close(resumed.params[name], value, atol=1e-6, rtol=0, msg=name)
    for name, value in straight.step_sizes.items():
        torch.testing.assert_close(resumed.step_sizes[name], value, atol=1e-6, rtol=0, msg=name)


def test_should_stop_cancels_and_keeps_a_checkpoint(tmp_path: Path) -> None:
    calls: list[int] = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) >= 3

    trainer = MetaTrainer(_config(iterations=50), TRAIN, None, tmp_path / "run")
    result = trainer.run(log_every=1, show_progress=False, should_stop=stop)
    assert result.cancelled
    assert result.iteration == 3
    assert result.initialization is None and result.path is None
    assert json.loads((tmp_path / "run" / STATE_FILE).read_text())["iteration"] == 3
    assert len(json.loads((tmp_path / "run" / CURVE_FILE).read_text())) == 3
    assert (tmp_path / "run" / CURVE_PLOT).is_file()
    assert MetaTrainer(_config(iterations=50), TRAIN, None, tmp_path / "run").iteration == 3


def test_within_group_fraction_draws_that_share_of_batches_from_one_group(tmp_path: Path) -> None:
    drawn: list[bool] = []
    trainer = MetaTrainer(_config(within_group_fraction=0.5), TRAIN, None, tmp_path / "run")
    assert trainer.group_sampler.images is trainer.train_sampler.images  # shared, not copied
    for sampler, within in ((trainer.train_sampler, False), (trainer.group_sampler, True)):
        original = sampler.sample

        def spy(*args: Any, _original: Any = original, _within: bool = within) -> Any:
            drawn.append(_within)
            return _original(*args)

        sampler.sample = spy  # type: ignore[method-assign]
    rng = np.random.default_rng(0)
    for _ in range(40):
        trainer.meta_step(rng)
    assert 10 <= sum(drawn) <= 30, drawn
    off = MetaTrainer(_config(), TRAIN, None, tmp_path / "off")
    off.group_sampler.sample = None  # type: ignore[assignment]  # never called at fraction 0
    off.meta_step(np.random.default_rng(0))


def test_within_group_fraction_refuses_groups_too_small_for_the_ways(tmp_path: Path) -> None:
    # TRAIN: 3 groups of 10 classes, no rotations, so no group holds a 12-way task.
    with pytest.raises(EpisodeError, match="largest group has 10 classes"):
        MetaTrainer(_config(within_group_fraction=0.5, ways=(4, 12)), TRAIN, None, tmp_path / "run")
    MetaTrainer(_config(within_group_fraction=0.5, ways=(4, 10)), TRAIN, None, tmp_path / "ok")
