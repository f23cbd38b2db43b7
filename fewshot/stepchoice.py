"""Choosing a task's number of head steps from its own support set, 0 included.

Fine-tuning pays with more shots and hurts with few (Chen et al. 2019; Triantafillou et al. 2020);
P>M>F (Hu et al. 2022) picks its fine-tuning per task on pseudo-queries drawn from the support set.
Here the support set is split into folds (every class in every fold); the head is fitted on the
other folds, exactly as served (prototype init, the same closed-form steps), and scored on the
held-out one at each candidate step count. A class with one example leaves nothing to hold out,
so such tasks take the initialization's `single_example_steps` (0: the prototype read-out).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fewshot.config import AdaptMode, ModelConfig
from fewshot.head import head_logits
from fewshot.initialization import Initialization
from fewshot.inner import HEAD_BIAS, HEAD_WEIGHT, InnerRecipe, head_grads, soft_targets
from fewshot.nuisance import initial_head


def chooses_steps(init: Initialization, mode: AdaptMode, steps: int | None) -> bool:
    """Whether a task's head steps are chosen from its support set (none named, head mode)."""
    config = init.config
    return (
        steps is None
        and mode == "head"
        and (bool(config.step_candidates) or config.support_fit_guard)
    )


def keeps_support_fit(
    features: Tensor,
    y: Tensor,
    n_way: int,
    log_scale: Tensor,
    sizes: dict[str, list[float]],
    steps: int,
    default_step_size: float,
    recipe: InnerRecipe,
    views: tuple[Tensor, Tensor] | None,
) -> bool:
    """Whether `steps` served head steps still classify every support image [S, D] the
    task's initial head (prototypes, or their whitened discriminant) classifies right (the
    steps fit `views`, as served)."""
    path = head_path(
        features, y, n_way, log_scale, sizes, steps, default_step_size, recipe, views=views
    )
    before = head_logits(features, *path[0], log_scale).argmax(dim=1) == y
    after = head_logits(features, *path[-1], log_scale).argmax(dim=1) == y
    return bool((after | ~before).all())


def served_head_steps(
    config: ModelConfig,
    features: Tensor,
    view_features: Tensor | None,
    y: Tensor,
    n_way: int,
    log_scale: Tensor,
    sizes: dict[str, list[float]],
    default_step_size: float,
) -> int:
    """A head-mode task's steps: chosen on held-out folds (config.step_candidates) or the
    initialization's, then 0 if config.support_fit_guard finds they spoil the support fit.

    features: [S, D] support embeddings under the initialization; view_features: those of its
    shifted views ([5S, D], unshifted first) when the recipe fits views, else None.
    """
    recipe = InnerRecipe.from_config(config)
    with torch.inference_mode():
        shots = int(torch.bincount(y, minlength=n_way).min())
        if config.step_candidates and 1 < shots < config.steps_min_shots:
            steps = 0  # too few shots to choose by: no held-out folds are run
        elif config.step_candidates:
            steps = choose_head_steps(
                features, y, n_way, log_scale, sizes, config.step_candidates,
                default_step_size, recipe, single_example_steps=config.single_example_steps,
            )  # fmt: skip
        else:
            steps = config.inner_steps
        if steps > 0 and config.support_fit_guard:
            views = None
            if view_features is not None:
                views = (view_features, y.repeat(view_features.shape[0] // y.shape[0]))
            fits = keeps_support_fit(
                features, y, n_way, log_scale, sizes, steps, default_step_size, recipe, views
            )
            steps = steps if fits else 0
    return steps


def step_sizes_at(
    sizes: dict[str, list[float]], names: Sequence[str], step: int, default: float
) -> list[float]:
    """The step size of each name at `step`: learned (last one reused past its end) or default."""
    out = []
    for name in names:
        values = sizes.get(name)
        out.append(default if not values else values[min(step, len(values) - 1)])
    return out


def fold_of(y: Tensor, folds: int) -> Tensor:
    """Fold index [S] of each example: a class's examples, in order, dealt round-robin."""
    out = torch.empty_like(y)
    for c in torch.unique(y):
        where = torch.nonzero(y == c).flatten()
        out[where] = torch.arange(where.numel(), device=y.device) % folds
    return out


def head_path(
    features: Tensor,
    y: Tensor,
    n_way: int,
    log_scale: Tensor,
    sizes: dict[str, list[float]],
    steps: int,
    default_step_size: float,
    recipe: InnerRecipe,
    views: tuple[Tensor, Tensor] | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """Head weights [N, D] and bias [N] after 0, 1, ..., `steps` served steps on features [S, D].

    The head starts from the prototypes of `features` (with views and `recipe.whitens`, from
    fewshot.nuisance's discriminant); the steps fit `views` (embeddings [V, D] and labels [V],
    the shifted support views, unshifted first) when given, else `features` itself.
    Plain tensor operations: differentiable in the features, log_scale and tensor step sizes.
    """
    onehot = F.one_hot(y, n_way).to(features.dtype)
    loss_features, loss_y = views if views is not None else (features, y)
    targets = soft_targets(loss_y, n_way, recipe.label_smoothing, features.dtype)
    whitened = loss_features if views is not None and recipe.whitens else None
    weight, bias = initial_head(features, onehot, whitened, recipe.nuisance_shrinkage)
    path = [(weight, bias)]
    for t in range(steps):
        g_weight, g_bias = head_grads(
            loss_features, weight, bias, log_scale, targets, recipe.temperature, recipe.per_class
        )
        lr_weight, lr_bias = step_sizes_at(sizes, [HEAD_WEIGHT, HEAD_BIAS], t, default_step_size)
        weight = weight - lr_weight * g_weight
        bias = bias - lr_bias * g_bias
        path.append((weight, bias))
    return path


def held_out_scores(
    features: Tensor,
    y: Tensor,
    n_way: int,
    log_scale: Tensor,
    sizes: dict[str, list[float]],
    candidates: Sequence[int],
    default_step_size: float,
    recipe: InnerRecipe,
    folds: int = 5,
) -> dict[int, tuple[float, float]]:
    """(held-out accuracy, held-out cross-entropy) per candidate step count, averaged over folds."""
    counts = torch.bincount(y, minlength=n_way)
    k = int(min(folds, int(counts.min())))
    fold = fold_of(y, k)
    totals = {s: [0.0, 0.0] for s in candidates}
    for f in range(k):
        fit, held = fold != f, fold == f
        path = head_path(
            features[fit], y[fit], n_way, log_scale, sizes, max(candidates),
            default_step_size, recipe,
        )  # fmt: skip
        for s in candidates:
            weight, bias = path[s]
            logits = head_logits(features[held], weight, bias, log_scale)
            totals[s][0] += float((logits.argmax(1) == y[held]).float().mean()) / k
            totals[s][1] += float(F.cross_entropy(logits, y[held])) / k
    return {s: (acc, loss) for s, (acc, loss) in totals.items()}


def choose_head_steps(
    features: Tensor,
    y: Tensor,
    n_way: int,
    log_scale: Tensor,
    sizes: dict[str, list[float]],
    candidates: Sequence[int],
    default_step_size: float,
    recipe: InnerRecipe,
    folds: int = 5,
    single_example_steps: int = 0,
) -> int:
    """The candidate step count with the best held-out accuracy (then loss, then fewer steps).

    features: [S, D] support embeddings under the initialization; y: [S] in 0..N-1. Returns
    `single_example_steps` when some class has a single example (nothing to hold out), and 0
    when 0 is the only candidate.
    """
    candidates = sorted(set(candidates) | {0})
    counts = torch.bincount(y, minlength=n_way)
    if int(counts.min()) < 2:
        return single_example_steps
    if len(candidates) == 1:
        return 0
    with torch.inference_mode():
        scores = held_out_scores(
            features, y, n_way, log_scale, sizes, candidates, default_step_size, recipe, folds
        )
    return min(candidates, key=lambda s: (-round(scores[s][0], 6), scores[s][1], s))
