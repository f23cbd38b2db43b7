"""The fast single-task loop and the batched adaptation equal fewshot.adapt's reference loop."""

from __future__ import annotations

from dataclasses import fields, replace

import pytest
import torch

import fewshot
from fewshot.backbone import Conv4
from fewshot.batched import adapt_many, predict_many
from fewshot.config import AdaptMode
from fewshot.fast import adapt_fast
from fewshot.inner import embed, embed_with_norms
from tests.fewshot_helpers import TINY, random_images, tiny_init

LABELS = ["a", "b", "c", "a", "c", "c"]  # unbalanced: 2, 1 and 3 shots
RECIPE = replace(
    TINY,
    inner_temperature=0.25,
    inner_label_smoothing=0.1,
    inner_shift_views=1,
    step_size_transform="softplus",
)
# The per-class support loss (summed over classes): the same paths must agree under it too.
PER_CLASS = replace(RECIPE, inner_loss_per_class=True)
# The head started from fewshot.nuisance's discriminant of the shifted views.
WHITENED = replace(PER_CLASS, nuisance_shrinkage=0.7)
CONFIGS = [TINY, RECIPE, PER_CLASS, WHITENED]
CONFIG_IDS = ["plain", "recipe", "per-class", "whitened"]


def _close(a: fewshot.AdaptedModel, b: fewshot.AdaptedModel, tol: float) -> None:
    """Every field of two adapted models equal (tensors to `tol`)."""
    for spec in fields(fewshot.AdaptedModel):
        x, y = getattr(a, spec.name), getattr(b, spec.name)
        if spec.name == "params":
            assert x.keys() == y.keys()
            for name in x:
                torch.testing.assert_close(x[name], y[name], atol=tol, rtol=tol)
        elif isinstance(x, torch.Tensor):
            torch.testing.assert_close(x, y, atol=tol, rtol=tol)
        else:
            assert x == y, spec.name


@pytest.mark.parametrize("mode", ["full", "head"])
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("steps", [0, 3])
def test_fast_loop_equals_reference(
    mode: AdaptMode, config: fewshot.ModelConfig, steps: int
) -> None:
    init = tiny_init(config)
    support = random_images(len(LABELS), config, seed=1)
    reference = fewshot.adapt(init, support, LABELS, mode=mode, steps=steps)
    _close(adapt_fast(init, support, LABELS, mode=mode, steps=steps), reference, 1e-10)


def test_fast_loop_moves_the_weights_and_honours_a_step_size_override() -> None:
    init = tiny_init()
    support = random_images(len(LABELS), seed=2)
    reference = fewshot.adapt(init, support, LABELS, step_size=0.3)
    fast = adapt_fast(init, support, LABELS, step_size=0.3)
    _close(fast, reference, 1e-10)
    unadapted = adapt_fast(init, support, LABELS, steps=0)
    moved = (fast.params["blocks.0.weight"] - unadapted.params["blocks.0.weight"]).abs().max()
    assert float(moved) > 1e-4


def test_fast_loop_float32_shipped() -> None:
    init = fewshot.Initialization.load(fewshot.shipped_initialization_path())
    support = random_images(5, init.config, seed=3, dtype=torch.float32)
    labels = ["a", "b", "c", "d", "e"]
    for mode in ("full", "head"):
        reference = fewshot.adapt(init, support, labels, mode=mode)
        fast = adapt_fast(init, support, labels, mode=mode)
        queries = random_images(9, init.config, seed=4, dtype=torch.float32)
        # Float32 rounding over the shipped initialization's 10 steps: a few 1e-5.
        torch.testing.assert_close(
            fast.predict_proba(queries), reference.predict_proba(queries), atol=5e-5, rtol=0
        )


@pytest.mark.parametrize("mode", ["full", "head"])
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_batched_adaptation_equals_one_at_a_time(
    mode: AdaptMode, config: fewshot.ModelConfig
) -> None:
    init = tiny_init(config)
    supports = [
        (random_images(6, config, seed=10), LABELS),
        (random_images(4, config, seed=11), ["x", "y", "x", "y"]),  # another shape: its own group
        (random_images(6, config, seed=12), ["c", "a", "b", "b", "a", "c"]),
        (random_images(2, config, seed=13), ["only", "only"]),  # invalid: one class
        (random_images(6, config, seed=14), ["p", "q", "r", "r", "q", "p"]),
    ]
    results = adapt_many(init, supports, mode=mode, max_batch=2)
    assert len(results) == len(supports)
    assert isinstance(results[3], fewshot.EpisodeError)
    for (x, labels), result in zip(supports, results, strict=True):
        if isinstance(result, fewshot.EpisodeError):
            continue
        _close(result, fewshot.adapt(init, x, labels, mode=mode), 1e-10)


def test_batched_predictions_do_not_depend_on_the_other_requests() -> None:
    init = fewshot.Initialization.load(fewshot.shipped_initialization_path())
    config = init.config
    models = [
        fewshot.adapt(init, random_images(5, config, seed=20, dtype=torch.float32), list("abcde")),
        fewshot.adapt(
            init, random_images(3, config, seed=21, dtype=torch.float32), ["x", "y", "z"]
        ),
        adapt_fast(
            init, random_images(4, config, seed=22, dtype=torch.float32), list("pqrs"), mode="head"
        ),
        adapt_fast(
            init, random_images(2, config, seed=23, dtype=torch.float32), ["u", "v"], mode="head"
        ),
    ]
    counts = [7, 1, 32, 3]
    images = [
        random_images(n, config, seed=30 + i, dtype=torch.float32) for i, n in enumerate(counts)
    ]
    together = predict_many(models, images, chunk=4)
    for model, x, batched in zip(models, images, together, strict=True):
        assert batched.shape == (x.shape[0], len(model.labels))
        alone = predict_many([model], [x])[0]
        torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)
        torch.testing.assert_close(batched, model.predict_proba(x), atol=1e-5, rtol=0)
    # A model's probabilities move when its weights differ: the test can tell models apart.
    assert not torch.allclose(together[0][:1, :3], predict_many([models[1]], [images[0][:1]])[0])


def test_stacked_backbones_pass_equals_each_model_alone() -> None:
    """The GPU path (models vmapped over stacked backbones, rows padded) run here on the CPU."""
    from fewshot.batched import _stacked_backbones

    init = tiny_init(dtype=torch.float32)
    models = [
        fewshot.adapt(init, random_images(3, seed=40 + i, dtype=torch.float32), ["a", "b", "c"])
        for i in range(3)
    ]
    images = [random_images(n, seed=50 + n, dtype=torch.float32) for n in (5, 1, 3)]
    features: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * 3
    _stacked_backbones(models, images, [0, 1, 2], features, chunk=2)
    for model, x, found in zip(models, images, features, strict=True):
        assert found is not None
        alone = embed_with_norms(Conv4(TINY), model.params, x)
        torch.testing.assert_close(found[0], alone[0], atol=1e-5, rtol=0)
        # The norms before normalisation too (the "unknown" norm check reads them).
        torch.testing.assert_close(found[1], alone[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["full", "head"])
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("steps", [0, 2])
def test_embeddings_from_the_first_step_are_the_initializations(
    mode: AdaptMode, config: fewshot.ModelConfig, steps: int
) -> None:
    init = tiny_init(config)
    support = random_images(len(LABELS), config, seed=7)
    model, embedded = fewshot.fast.adapt_fast_with_embeddings(
        init, support, LABELS, mode=mode, steps=steps
    )
    _close(model, adapt_fast(init, support, LABELS, mode=mode, steps=steps), 1e-12)
    torch.testing.assert_close(embedded, embed(init.module(), init.params, support), atol=1e-10,
                               rtol=1e-10)  # fmt: skip
    assert not embedded.requires_grad
    # The diagnostics the service computes from them are diagnose_support's.
    ours = fewshot.diagnostics.diagnose_embeddings(embedded, LABELS)
    assert ours == fewshot.diagnose_support(init, support, LABELS)


def test_embed_supports_equals_one_pass_per_support_set() -> None:
    init = tiny_init()
    supports = [random_images(n, seed=10 + n) for n in (3, 6, 1, 5)]
    together = fewshot.batched.embed_supports(init, supports, chunk=4)
    assert [t.shape[0] for t in together] == [3, 6, 1, 5]
    for x, embedded in zip(supports, together, strict=True):
        torch.testing.assert_close(embedded, embed(init.module(), init.params, x), atol=1e-10,
                                   rtol=1e-10)  # fmt: skip
    assert fewshot.batched.embed_supports(init, []) == []
