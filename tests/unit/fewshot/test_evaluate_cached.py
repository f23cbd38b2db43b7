"""The cached-embedding evaluator scores exactly what head-mode serving answers."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fewshot.config import ModelConfig
from fewshot.data import ImageDataset
from fewshot.evaluate import (
    evaluate,
    evaluate_head_cached,
    head_embeddings,
    head_embeddings_and_norms,
)
from fewshot.initialization import Initialization
from fewshot.openset import embedding_norms, open_set_scores

PHOTO = ModelConfig(
    in_channels=3, image_size=16, width=8, norm="none", pooling="maxpool", readout="flatten",
    final_relu=False, feature_norm="l2", mirror_average=True, crop_views=0.9,
    default_mode="head", step_candidates=(0, 5, 10), inner_steps=10, inner_step_size=0.5,
    inner_temperature=0.5,
)  # fmt: skip
# Handwriting's serving recipe: test-time shifted views, head steps fitted on the support set's
# shifted copies, and the support-fit guard.
HANDWRITING = ModelConfig(
    in_channels=1, image_size=12, width=8, view_shift=1, default_mode="head", inner_steps=5,
    inner_step_size=2.0, inner_temperature=0.25, inner_shift_views=2, inner_loss_per_class=True,
    support_fit_guard=True,
)  # fmt: skip
# Handwriting's recipe with the head started from fewshot.nuisance's discriminant.
WHITENED = dataclasses.replace(HANDWRITING, nuisance_shrinkage=0.8)


def _data(channels: int, side: int) -> ImageDataset:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(
        0, 256, (6 * 12, channels, side, side), dtype=torch.uint8, generator=generator
    )
    # Class-dependent brightness, so the prototypes are better than chance and steps matter.
    images = (images // 2 + torch.arange(6).repeat_interleave(12).view(-1, 1, 1, 1) * 20).to(
        torch.uint8
    )
    return ImageDataset(
        images,
        torch.arange(6).repeat_interleave(12),
        [f"c{i}" for i in range(6)],
        ["a", "a", "a", "b", "b", "b"],
    )


@pytest.mark.parametrize(
    "config", [PHOTO, HANDWRITING, WHITENED], ids=["photo", "handwriting", "whitened"]
)
@pytest.mark.parametrize("within", [False, True], ids=["any", "within-group"])
def test_cached_scores_equal_served_adaptation(config: ModelConfig, within: bool) -> None:
    init = Initialization.random(config, seed=2)
    data = _data(config.in_channels, config.image_size)
    shape = dict(ways=3, shots=4, queries=5, episodes=6, seed=5, within_group=within)
    cached = evaluate_head_cached(init, data, **shape)  # type: ignore[arg-type]
    served = evaluate(init, data, **shape)  # type: ignore[arg-type]
    assert cached.accuracy == pytest.approx(served.accuracy, abs=1e-6)
    assert cached.accuracy_0_steps == pytest.approx(served.accuracy_0_steps, abs=1e-6)
    assert cached.chosen_steps_mean == pytest.approx(served.chosen_steps_mean)


def test_full_mode_initializations_are_refused() -> None:
    full = dataclasses.replace(PHOTO, default_mode="full")
    init = Initialization.random(full, seed=2)
    with pytest.raises(ValueError, match="head-mode"):
        evaluate_head_cached(init, _data(3, 16), ways=3, shots=1)


# Initialization seeds whose served head steps change some in-task answers on these episodes.
@pytest.mark.parametrize(
    ("config", "seed"), [(PHOTO, 3), (HANDWRITING, 4)], ids=["photo", "handwriting"]
)
def test_cached_open_set_scores_equal_served_adaptation(config: ModelConfig, seed: int) -> None:
    """The "unknown" calibration's scores on cached embeddings are those of served models."""
    init = Initialization.random(config, seed=seed)
    data = _data(config.in_channels, config.image_size)
    shape = dict(ways=3, shots=4, queries=3, episodes=5, seed=11)
    served = open_set_scores(init, data, **shape)  # type: ignore[arg-type]
    # One pass gives the embeddings and the norm check's norms of the images (not their copies).
    embedded, norms = head_embeddings_and_norms(init, data)
    assert torch.equal(embedded, head_embeddings(init, data))
    assert torch.allclose(norms, embedding_norms(init, data), rtol=1e-5)
    cached = open_set_scores(init, data, **shape, embedded=embedded, norms=norms)  # type: ignore[arg-type]
    assert len(cached.in_task) == len(served.in_task) == 5 * 3 * 3
    unadapted = open_set_scores(init, data, **shape, steps=0)  # type: ignore[arg-type]
    assert unadapted.in_task_correct != served.in_task_correct  # the steps are exercised
    assert cached.in_task_correct == served.in_task_correct
    for field in ("in_task", "out_of_task", "blank", "noise"):
        assert getattr(cached, field) == pytest.approx(getattr(served, field), abs=1e-4), field
        # The norm check's input, one per score, the same on both paths.
        assert len(cached.norms[field]) == len(getattr(served, field))
        assert cached.norms[field] == pytest.approx(served.norms[field], rel=1e-4), field
