"""The v3 inner-loop recipe: adaptation must change predictions and lower the support loss."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import fewshot
from fewshot.evaluate import evaluate
from fewshot.inner import (
    InnerRecipe,
    adapt_params,
    effective_step_sizes,
    logits,
    raw_step_sizes,
    support_loss,
    support_views,
)
from fewshot.training import _fit_step_sizes
from tests.fewshot_helpers import (
    TINY,
    random_images,
    reference_embed,
    reference_logits,
    synthetic_dataset,
    tiny_init,
)

RECIPE_CONFIG = dataclasses.replace(
    TINY,
    inner_temperature=0.25,
    inner_label_smoothing=0.1,
    inner_shift_views=1,
    step_size_transform="softplus",
)
LABELS = torch.tensor([0, 1, 2, 0, 2, 2])


def _recipe_init(seed: int = 0) -> fewshot.Initialization:
    """A tiny initialization under the recipe, with positive step sizes (raw under softplus)."""
    init = tiny_init(RECIPE_CONFIG, seed=seed)
    sizes = {k: raw_step_sizes(v, "softplus") for k, v in init.step_sizes.items()}
    sizes["head.weight"] = raw_step_sizes(torch.full((3,), 2.0, dtype=torch.float64), "softplus")
    sizes["head.bias"] = raw_step_sizes(torch.full((3,), 2.0, dtype=torch.float64), "softplus")
    return dataclasses.replace(init, step_sizes=sizes)


def test_support_views_are_the_support_and_its_four_one_pixel_shifts() -> None:
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float64).view(2, 1, 4, 4) + 1
    y = torch.tensor([0, 1])
    views, labels = support_views(x, y, 1)
    assert views.shape == (10, 1, 4, 4) and labels.tolist() == [0, 1] * 5
    assert torch.equal(views[:2], x)
    # Up: row r of the view is row r-1 of the image (zero fill at the top), and so on.
    assert torch.equal(views[2:4, :, 1:], x[:, :, :-1]) and bool((views[2:4, :, 0] == 0).all())
    assert torch.equal(views[4:6, :, :-1], x[:, :, 1:]) and bool((views[4:6, :, -1] == 0).all())
    assert torch.equal(views[6:8, :, :, 1:], x[:, :, :, :-1])
    assert torch.equal(views[8:10, :, :, :-1], x[:, :, :, 1:])
    plain, same = support_views(x, y, 0)
    assert plain is x and same is y


def test_softplus_step_sizes_round_trip_and_stay_positive() -> None:
    sizes = torch.tensor([1e-3, 0.05, 0.5, 2.0])
    raw = raw_step_sizes(sizes, "softplus")
    assert torch.allclose(effective_step_sizes({"a": raw}, "softplus")["a"], sizes, rtol=1e-4)
    assert bool(
        (effective_step_sizes({"a": torch.tensor([-50.0, 0.0])}, "softplus")["a"] > 0).all()
    )
    assert torch.equal(raw_step_sizes(sizes, "identity"), sizes)


def test_recipe_matches_a_hand_written_loop() -> None:
    """Temperature, label smoothing, shifted views and softplus steps, written out by hand."""
    init = _recipe_init()
    x = random_images(6, RECIPE_CONFIG)
    fast = adapt_params(
        init.module().double(), init.params, init.step_sizes, x, LABELS, 3, steps=2,
        default_step_size=0.1, recipe=InnerRecipe.from_config(RECIPE_CONFIG),
        differentiable=False,
    )  # fmt: skip
    ref = {k: v.clone() for k, v in init.params.items()}
    feats = reference_embed(ref, x, RECIPE_CONFIG)
    protos = torch.stack([feats[LABELS.eq(k)].mean(0) for k in range(3)])
    ref["head.weight"], ref["head.bias"] = 2 * protos, -(protos**2).sum(1)
    padded = F.pad(x, (1, 1, 1, 1))
    views = torch.cat(
        [x, padded[..., 0:12, 1:13], padded[..., 2:14, 1:13], padded[..., 1:13, 0:12],
         padded[..., 1:13, 2:14]]
    )  # fmt: skip
    targets = LABELS.repeat(5)
    for t in range(2):
        leaves = {
            k: v.detach().requires_grad_(True) for k, v in ref.items() if k != "head.log_scale"
        }
        params = {**ref, **leaves}
        out = 0.25 * reference_logits(params, reference_embed(params, views, RECIPE_CONFIG))
        loss = F.cross_entropy(out, targets, label_smoothing=0.1)
        grads = torch.autograd.grad(loss, list(leaves.values()))
        for (name, value), g in zip(leaves.items(), grads, strict=True):
            ref[name] = (value - F.softplus(init.step_sizes[name][t]) * g).detach()
    for name in ref:
        assert torch.allclose(fast[name], ref[name], atol=1e-9), name


def _support_loss_and_logits(
    init: fewshot.Initialization, steps: int, x: Tensor, q: Tensor
) -> tuple[float, Tensor]:
    recipe = InnerRecipe.from_config(init.config)
    module = init.module().double()
    fast = adapt_params(
        module, init.params, init.step_sizes, x, LABELS, 3, steps=steps, default_step_size=0.1,
        recipe=recipe, differentiable=False,
    )  # fmt: skip
    with torch.no_grad():
        return float(support_loss(module, fast, x, LABELS, recipe)), logits(module, fast, q)


def test_adaptation_changes_predictions_and_lowers_the_support_loss() -> None:
    """Fails when the inner loop stops mattering (zero step sizes, zero support gradients...)."""
    init = _recipe_init()
    x, q = random_images(6, RECIPE_CONFIG, seed=1), random_images(40, RECIPE_CONFIG, seed=2)
    loss0, logits0 = _support_loss_and_logits(init, 0, x, q)
    loss3, logits3 = _support_loss_and_logits(init, 3, x, q)
    assert loss0 > 0.3, "the support loss starts at ~0: the inner loop has nothing to fit"
    assert loss3 < loss0 - 0.05, (loss0, loss3)
    probabilities0, probabilities3 = logits0.softmax(1), logits3.softmax(1)
    assert float((probabilities3 - probabilities0).abs().max()) > 0.05
    assert bool((logits3.argmax(1) != logits0.argmax(1)).any()), "no query changed its label"


def test_evaluate_reports_zero_steps_on_the_same_episodes() -> None:
    double = _recipe_init()
    init = dataclasses.replace(
        double,
        params={k: v.float() for k, v in double.params.items()},
        step_sizes={k: v.float() for k, v in double.step_sizes.items()},
    )
    data = synthetic_dataset(size=12)
    result = evaluate(init, data, ways=3, shots=2, queries=3, episodes=12, steps=3, batch=4)
    zero = evaluate(init, data, ways=3, shots=2, queries=3, episodes=12, steps=0, batch=4)
    assert result.accuracy_0_steps == zero.accuracy
    assert result.adaptation_gain is not None
    assert abs(result.adaptation_gain - (result.accuracy - zero.accuracy)) < 1e-9
    assert result.accuracy != zero.accuracy or result.adaptation_gain_ci95 != 0


def test_trainer_converts_the_starts_step_sizes_to_softplus() -> None:
    start = tiny_init()  # identity transform, sizes 0.05..0.15
    converted = _fit_step_sizes(start, 3, 0.1, "softplus")
    for name, raw in converted.items():
        effective = F.softplus(raw.double())
        assert torch.allclose(effective, start.step_sizes[name], rtol=1e-4), name
    reset = _fit_step_sizes(start, 3, 0.01, "softplus", reset=True, head_value=0.5)
    assert torch.allclose(F.softplus(reset["blocks.0.weight"]), torch.full((3,), 0.01), rtol=1e-4)
    assert torch.allclose(F.softplus(reset["head.weight"]), torch.full((3,), 0.5), rtol=1e-4)


def test_meta_training_with_the_recipe_records_it_and_calibrates_unknown(tmp_path: Path) -> None:
    from fewshot.config import MetaTrainConfig, ModelConfig
    from fewshot.training import MetaTrainer

    train = synthetic_dataset(classes=30, per_class=8, groups=3, seed=0)
    val = synthetic_dataset(classes=12, per_class=8, groups=2, seed=1)
    cfg = MetaTrainConfig(
        iterations=4, meta_batch=2, ways=(3, 4), shots=(1, 2), queries=2, inner_steps=2,
        inner_step_size=0.05, inner_temperature=0.5, inner_label_smoothing=0.1,
        inner_shift_views=1, step_size_transform="softplus", step_size_lr_factor=10.0,
        rotations=False, val_every=0, val_episodes=2, unknown_calibration_episodes=2,
        model=ModelConfig(width=8, image_size=12),
    )  # fmt: skip
    result = MetaTrainer(cfg, train, val, tmp_path / "run").run(show_progress=False)
    assert result.path is not None
    saved = fewshot.Initialization.load(result.path)
    assert saved.config.inner_temperature == 0.5 and saved.config.inner_shift_views == 1
    assert saved.config.step_size_transform == "softplus"
    sizes = effective_step_sizes(saved.step_sizes, "softplus")
    assert all(bool((v > 0).all()) for v in sizes.values())
    calibration = fewshot.calibration_of(saved)
    assert calibration is not None and (5, 1) in calibration.scores_by_shape


def test_a_per_class_loss_is_the_mean_loss_with_an_n_way_times_larger_step() -> None:
    from fewshot.stepchoice import head_path

    torch.manual_seed(0)
    features, y = F.normalize(torch.randn(12, 6), dim=1), torch.arange(4).repeat(3)
    log_scale = torch.tensor(1.5)
    plain = InnerRecipe(temperature=0.5)
    per_class = dataclasses.replace(plain, per_class=True)
    scaled = head_path(features, y, 4, log_scale, {}, 2, 0.1, per_class)[-1]
    mean = head_path(features, y, 4, log_scale, {}, 2, 0.4, plain)[-1]
    assert torch.allclose(scaled[0], mean[0], atol=1e-6)
    assert torch.allclose(scaled[1], mean[1], atol=1e-6)
    assert not torch.allclose(
        head_path(features, y, 4, log_scale, {}, 2, 0.1, plain)[-1][0], mean[0]
    )
