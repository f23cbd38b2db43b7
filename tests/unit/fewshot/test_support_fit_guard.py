"""The support-fit guard: served head steps that spoil the support fit fall back to 0 steps."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import fewshot
from fewshot.fast import adapt_fast
from fewshot.inner import effective_step_sizes, raw_step_sizes
from tests.fewshot_helpers import TINY, random_images, tiny_init

# Head steps far too large for these features, fitted on shifted views of random textures:
# without the guard they pull support images off their classes.
WILD = replace(
    TINY, default_mode="head", inner_steps=10, inner_step_size=50.0, inner_shift_views=2,
    inner_temperature=0.25, inner_loss_per_class=True,
)  # fmt: skip
LABELS = ["a", "b", "c", "a", "b", "c"]
TRUTH = torch.tensor([0, 1, 2, 0, 1, 2])


def _served(
    init: fewshot.Initialization, fast: bool, steps: int | None = None
) -> tuple[int, torch.Tensor]:
    x = random_images(6, init.config, seed=5, dtype=torch.float32)
    model = (adapt_fast if fast else fewshot.adapt)(init, x, LABELS, steps=steps)
    return model.steps, model.predict_proba(x).argmax(dim=1) == TRUTH


def _textures(seed: int, count: int) -> list[np.ndarray]:
    """`count` noisy copies (5% of pixels flipped) of one random binary texture, 28 x 28."""
    rng = np.random.default_rng(seed)
    pattern = rng.random((28, 28)) > 0.7
    return [
        ((pattern ^ (rng.random((28, 28)) < 0.05)) == 0).astype(np.uint8) * 255
        for _ in range(count)
    ]


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
def test_steps_that_spoil_the_support_fit_fall_back_to_zero(fast: bool) -> None:
    """The shipped handwriting initialization on random binary textures (not characters), its
    head steps fitted on 2-pixel shifted support views at 5x their learned step sizes: they
    pull every support image onto one class. (At its own step sizes they keep these textures
    apart with or without the shifted views.)"""
    from PIL import Image

    from fewshot.images import preprocess_images

    shipped = fewshot.Initialization.load(fewshot.shipped_initialization_path())
    assert shipped.config.support_fit_guard
    transform = shipped.config.step_size_transform
    effective = effective_step_sizes(shipped.step_sizes, transform)
    assert effective, "the shipped initialization learns its step sizes"
    # Steps 5x the learned size on views shifted by 2 pixels: a real case where they overshoot.
    wild = {name: raw_step_sizes(5 * value, transform) for name, value in effective.items()}
    shipped = replace(shipped, config=replace(shipped.config, inner_shift_views=2), step_sizes=wild)
    images = [Image.fromarray(t) for seed in (1, 2, 3) for t in _textures(seed, 2)]
    x = preprocess_images(images, shipped.config)
    labels = ["alpha", "alpha", "beta", "beta", "gamma", "gamma"]
    truth = torch.tensor([0, 0, 1, 1, 2, 2])
    adapt = adapt_fast if fast else fewshot.adapt
    unguarded = replace(shipped, config=replace(shipped.config, support_fit_guard=False))
    spoiled = adapt(unguarded, x, labels)
    assert spoiled.steps > 0 and not torch.equal(spoiled.predict_proba(x).argmax(dim=1), truth)
    kept = adapt(shipped, x, labels)
    assert kept.steps == 0 and torch.equal(kept.predict_proba(x).argmax(dim=1), truth)


def test_steps_that_keep_the_support_fit_are_served() -> None:
    calm = tiny_init(replace(WILD, inner_step_size=0.01, support_fit_guard=True), seed=1,
                     dtype=torch.float32)  # fmt: skip
    _, right_at_zero = _served(calm, True, steps=0)
    steps, right = _served(calm, True)
    assert steps == 10 and bool((right | ~right_at_zero).all())
