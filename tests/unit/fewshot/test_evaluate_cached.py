"""The cached-embedding evaluator scores exactly what head-mode serving answers."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from fewshot.config import ModelConfig
from fewshot.data import ImageDataset
from fewshot.evaluate import evaluate_head_cached
from fewshot.fast import adapt_fast
from fewshot.initialization import Initialization


def test_cached_scores_equal_served_adaptation_episode_by_episode() -> None:
    config = ModelConfig(
        in_channels=3, image_size=16, width=8, norm="none", pooling="maxpool", readout="flatten",
        final_relu=False, feature_norm="l2", mirror_average=True, crop_views=0.9,
        default_mode="head", step_candidates=(0, 5, 10), inner_steps=10, inner_step_size=0.5,
        inner_temperature=0.5,
    )  # fmt: skip
    init = Initialization.random(config, seed=2)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6 * 12, 3, 16, 16), dtype=torch.uint8, generator=generator)
    targets = torch.arange(6).repeat_interleave(12)
    data = ImageDataset(images, targets, [f"c{i}" for i in range(6)], [""] * 6)
    ways, shots, queries, episodes = 3, 4, 5, 4
    result = evaluate_head_cached(
        init, data, ways=ways, shots=shots, queries=queries, episodes=episodes, seed=5
    )
    rng = np.random.default_rng(5)
    by_class = [torch.nonzero(targets == c).flatten() for c in range(6)]
    served = []
    for _ in range(episodes):
        classes = rng.choice(6, ways, replace=False)
        picks = [by_class[c][rng.permutation(12)[: shots + queries]] for c in classes]
        sx = torch.cat([images[p[:shots]] for p in picks]).float() / 255
        qx = torch.cat([images[p[shots:]] for p in picks]).float() / 255
        labels = [str(i) for i in range(ways) for _ in range(shots)]
        model = adapt_fast(init, sx, labels)
        truth = [str(i) for i in range(ways) for _ in range(queries)]
        served.append(np.mean([a == b for a, b in zip(model.predict(qx), truth, strict=True)]))
    assert abs(result.accuracy - float(np.mean(served))) < 1e-6
    assert result.chosen_steps_mean is not None
    full = dataclasses.replace(config, default_mode="full")
    try:
        evaluate_head_cached(dataclasses.replace(init, config=full), data, ways=3, shots=1)
    except ValueError as exc:
        assert "head-mode" in str(exc)
    else:
        raise AssertionError("a full-mode initialization was scored as head mode")
