"""The episodic stage: trains through the served head steps, learns their sizes, resumes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from fewshot.backbone import Conv4
from fewshot.config import ModelConfig
from fewshot.data import ImageDataset
from fewshot.initialization import Initialization
from fewshot.inner import HEAD_BIAS, HEAD_WEIGHT
from fewshot.metastage import MetaStage, MetaStageConfig, episode
from fewshot.pretrain import PretrainConfig

MODEL = ModelConfig(
    in_channels=1, image_size=12, width=8, pooling="stride", readout="flatten", norm="none",
    final_relu=False, feature_norm="l2", inner_steps=2, inner_step_size=0.5,
    inner_shift_views=1, inner_temperature=0.5, default_mode="head",
)  # fmt: skip


def _data(classes: int, seed: int, groups: int = 2) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    per = 8
    images = torch.randint(0, 256, (classes * per, 1, 12, 12), dtype=torch.uint8, generator=g)
    names = [f"g{c % groups}" for c in range(classes)]
    return ImageDataset(images, torch.arange(classes).repeat_interleave(per),
                        [f"c{c}" for c in range(classes)], names)  # fmt: skip


def _stage(tmp_path: Path, episodes: int) -> MetaStage:
    cfg = MetaStageConfig(episodes=episodes, ways=3, shots=(1, 2), queries=2, val_every=2,
                          inner_steps=2, within_group_fraction=0.5, rotations=True,
                          step_size_lr_factor=1000.0)  # fmt: skip
    aug = PretrainConfig(model=MODEL, augmentation="handwriting", val_episodes=4, val_queries=2,
                         val_ways=3)  # fmt: skip
    init = Initialization.random(MODEL, seed=0)
    return MetaStage(init, _data(8, 0), _data(6, 1), cfg, aug, tmp_path)


def test_within_group_episodes_draw_one_group() -> None:
    import numpy as np

    data = _data(8, 0)
    rng = np.random.default_rng(0)
    for _ in range(5):
        sx, sy, qx, _ = episode(data, rng, 3, 2, 1, within_group=True)
        assert sx.shape[0] == 6 and qx.shape[0] == 3 and sy.tolist() == [0, 0, 1, 1, 2, 2]


def test_the_stage_learns_head_step_sizes_and_resumes_exactly(tmp_path: Path) -> None:
    stage = _stage(tmp_path / "a", 4)
    start = stage.step_sizes().detach().clone()
    stage.cfg.max_seconds = 0.0
    assert stage.run() is False  # checkpointed after its first validation
    stage.cfg.max_seconds = None
    stage.cfg.episodes = 2
    assert stage.run() is True and stage.episode == 2
    resumed = _stage(tmp_path / "a", 4)
    assert resumed.episode == 2
    assert resumed.run() is True
    straight = _stage(tmp_path / "b", 4)
    assert straight.run() is True
    for a, b in zip(resumed.module.parameters(), straight.module.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert not torch.equal(straight.step_sizes().detach(), start)  # the sizes were trained
    best = straight.best_initialization()
    assert torch.equal(best.step_sizes[HEAD_WEIGHT], best.step_sizes[HEAD_BIAS])
    assert "meta_stage" in best.metadata


def test_a_stage_whose_steps_differ_from_the_served_ones_is_refused(tmp_path: Path) -> None:
    import pytest

    init = Initialization.random(dataclasses.replace(MODEL, inner_steps=3), seed=0)
    with pytest.raises(ValueError, match="inner_steps"):
        MetaStage(init, _data(8, 0), _data(6, 1), MetaStageConfig(inner_steps=2),
                  PretrainConfig(model=MODEL), tmp_path)  # fmt: skip


def _averaging_stage(tmp_path: Path, episodes: int) -> MetaStage:
    stage = _stage(tmp_path, episodes)
    stage.cfg.average_every = 2
    return stage


def test_weight_averaging_serves_the_mean_of_its_snapshots_and_resumes(tmp_path: Path) -> None:
    from fewshot.inner import HEAD_SCALE

    stage = _averaging_stage(tmp_path / "a", 6)
    snapshots = []
    stage.validate()
    while stage.episode < 6:
        stage.train_episode()
        stage.episode += 1
        if stage.episode % 2 == 0:
            stage.accumulate()
            snapshots.append(stage.weights())
    mean = {k: torch.stack([s[k] for s in snapshots]).mean(0) for k in snapshots[0]}
    assert stage.average is not None and stage.averaged == 3
    for k, v in mean.items():
        assert torch.allclose(stage.average[k], v, atol=1e-6), k
    # The stage's result is the average, even where a snapshot validated better.
    stage.validate()
    served = stage.best_initialization()
    assert torch.allclose(served.params[HEAD_SCALE], mean[HEAD_SCALE], atol=1e-6)
    conv = next(k for k in mean if k.endswith("weight"))
    assert torch.allclose(served.params[conv], mean[conv], atol=1e-6)
    assert not torch.allclose(served.params[conv], snapshots[-1][conv])
    assert all(f"average_{k}" in stage.curve[-1] for k in stage.keys)

    # Stopped part-way, the same call resumes the running mean where it stopped.
    straight = _averaging_stage(tmp_path / "b", 6)
    assert straight.run() is True
    half = _averaging_stage(tmp_path / "c", 6)
    half.cfg.episodes = 4
    assert half.run() is True
    resumed = _averaging_stage(tmp_path / "c", 6)
    assert resumed.averaged == 2 and resumed.run() is True
    assert straight.average is not None and resumed.average is not None
    for k, v in straight.average.items():
        assert torch.allclose(resumed.average[k], v, atol=1e-6), k


def test_episodes_below_the_served_minimum_of_shots_train_the_prototype_head(
    tmp_path: Path,
) -> None:
    stage = _stage(tmp_path, 2)
    stage.cfg.steps_min_shots = 2
    g = torch.Generator().manual_seed(3)
    qx, qy = torch.rand(6, 1, 12, 12, generator=g), torch.arange(3).repeat_interleave(2)
    one_x, one_y = torch.rand(3, 1, 12, 12, generator=g), torch.arange(3)
    two_x, two_y = torch.rand(6, 1, 12, 12, generator=g), torch.arange(3).repeat_interleave(2)
    stage.module.eval()
    steps_taken = stage.loss(two_x, two_y, qx, qy)
    one_shot = stage.loss(one_x, one_y, qx, qy)
    stage.cfg.inner_steps = 0
    assert torch.equal(stage.loss(one_x, one_y, qx, qy), one_shot)  # no steps below 2 shots
    assert not torch.allclose(stage.loss(two_x, two_y, qx, qy), steps_taken)  # steps at 2


def test_frozen_blocks_keep_their_weights_and_statistics_and_the_rest_trains(
    tmp_path: Path,
) -> None:
    import pytest

    model = dataclasses.replace(MODEL, norm="batch", inner_steps=0)
    cfg = MetaStageConfig(episodes=3, ways=3, shots=(2,), queries=2, val_every=3, frozen_blocks=2)
    aug = PretrainConfig(model=model, augmentation="handwriting", val_episodes=2, val_queries=2,
                         val_ways=3)  # fmt: skip
    init = Initialization.random(model, seed=0)
    # BatchNorm's running statistics, as a pre-trained run's initialization carries them.
    init.params.update({k: v for k, v in Conv4(model).state_dict().items() if "running" in k})
    stage = MetaStage(init, _data(8, 0), _data(6, 1), cfg, aug, tmp_path)
    before = {k: v.clone() for k, v in stage.module.state_dict().items()}
    for _ in range(3):
        stage.train_episode()
    after = stage.module.state_dict()
    convs = [i for i, m in enumerate(stage.module.blocks) if isinstance(m, torch.nn.Conv2d)]
    frozen = tuple(f"blocks.{i}." for i in range(convs[2]))
    assert any(k.startswith(frozen) for k in before)
    for k, v in before.items():
        if k.endswith("num_batches_tracked"):
            continue
        if k.startswith(frozen):
            assert torch.equal(after[k], v), f"{k} moved although its block is frozen"
        else:
            assert not torch.equal(after[k], v), f"{k} did not train"
    with pytest.raises(ValueError, match="frozen_blocks"):
        MetaStage(init, _data(8, 0), _data(6, 1), dataclasses.replace(cfg, frozen_blocks=5), aug,
                  tmp_path / "b")  # fmt: skip
