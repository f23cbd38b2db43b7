"""Adapting many tasks in one vmapped pass: what a worker does with a line of adapt jobs.

Tasks are grouped by shape (support size, ways); each group runs as one call vmapped over its
tasks (exact for GroupNorm: no statistic crosses images). Head-only tasks embed all their
support images in one trunk pass and take closed-form head steps. Each task gets its own
AdaptedModel, equal to `fewshot.adapt`'s up to float rounding; a task whose support set is
invalid gets its EpisodeError, and the others still adapt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import vmap

from fewshot.adapted import AdaptedModel, _check_images, encode_labels
from fewshot.backbone import shared_module
from fewshot.config import AdaptMode
from fewshot.errors import EpisodeError
from fewshot.fast import head_grads, prepare, soft_targets, step_sizes_at
from fewshot.head import head_logits, prototype_head
from fewshot.initialization import Initialization
from fewshot.inner import (
    HEAD_BIAS,
    HEAD_SCALE,
    HEAD_WEIGHT,
    InnerRecipe,
    Params,
    adapt_params,
    backbone_names,
    embed,
    logits,
    support_views,
)


@dataclass(frozen=True)
class _Task:
    index: int
    x: Tensor
    y: Tensor
    classes: list[str]


def adapt_many(
    init: Initialization,
    supports: Sequence[tuple[Tensor, Sequence[str]]],
    *,
    mode: AdaptMode = "full",
    steps: int | None = None,
    device: str | torch.device | None = None,
    max_batch: int = 32,
) -> list[AdaptedModel | EpisodeError]:
    """Adapt `init` to each (support images [S, C, H, W], labels) pair; results in input order."""
    if mode not in ("full", "head"):
        raise EpisodeError(f"mode must be 'full' or 'head', got {mode!r}")
    steps = init.config.inner_steps if steps is None else steps
    if steps < 0:
        raise EpisodeError(f"steps must be >= 0, got {steps}")
    target = (
        torch.device(device) if device is not None else init.params[next(iter(init.params))].device
    )
    results: list[AdaptedModel | EpisodeError | None] = [None] * len(supports)
    groups: dict[tuple[int, int], list[_Task]] = {}
    for index, (x, labels) in enumerate(supports):
        try:
            _check_images(x, init.config, "support")
            if len(labels) != x.shape[0]:
                raise EpisodeError(
                    f"{x.shape[0]} support images but {len(labels)} labels; give one label per image"
                )
            classes, y = encode_labels(labels)
        except EpisodeError as exc:
            results[index] = exc
            continue
        task = _Task(index, x.to(target), y.to(target), classes)
        groups.setdefault((x.shape[0], len(classes)), []).append(task)
    for (_, n_way), tasks in groups.items():
        for start in range(0, len(tasks), max_batch):
            chunk = tasks[start : start + max_batch]
            adapted = _adapt_group(init, chunk, n_way, mode, steps, target)
            for task, model in zip(chunk, adapted, strict=True):
                results[task.index] = model
    return [r for r in results if r is not None]


def _adapt_group(
    init: Initialization,
    tasks: list[_Task],
    n_way: int,
    mode: AdaptMode,
    steps: int,
    device: torch.device,
) -> list[AdaptedModel]:
    """One vmapped adaptation of tasks that share a support size and a number of ways."""
    recipe = InnerRecipe.from_config(init.config)
    prepared = prepare(init, device)
    module = shared_module(init.config)
    default = init.config.inner_step_size
    x = torch.stack([task.x for task in tasks])
    y = torch.stack([task.y for task in tasks])
    if mode == "head" or steps == 0:
        params, accuracy = _head_group(init, prepared.meta, prepared.sizes, x, y, n_way, steps)
    else:
        names = [*backbone_names(prepared.meta), HEAD_WEIGHT, HEAD_BIAS]
        sizes = {name: value.to(device) for name, value in init.step_sizes.items()}

        def one(sx: Tensor, sy: Tensor) -> tuple[Params, Tensor]:
            fast = adapt_params(
                module, prepared.meta, sizes, sx, sy, n_way,
                steps=steps, default_step_size=default, mode=mode, first_order=True,
                recipe=recipe,
            )  # fmt: skip
            correct = (logits(module, fast, sx).argmax(dim=1) == sy).float().mean()
            return {name: fast[name] for name in names}, correct

        with torch.no_grad():
            adapted, accuracy = vmap(one)(x, y)
        params = [
            {**prepared.meta, **{name: value[t].clone() for name, value in adapted.items()}}
            for t in range(len(tasks))
        ]
    return [
        AdaptedModel(
            config=init.config,
            params=params[t],
            labels=task.classes,
            mode=mode,
            steps=steps,
            support_accuracy=float(accuracy[t]),
            initialization_version=init.version,
        )
        for t, task in enumerate(tasks)
    ]


def _head_group(
    init: Initialization,
    meta: Params,
    sizes: dict[str, list[float]],
    x: Tensor,
    y: Tensor,
    n_way: int,
    steps: int,
) -> tuple[list[Params], Tensor]:
    """Head-only adaptation of T tasks: one trunk pass over all support images, batched heads."""
    recipe = InnerRecipe.from_config(init.config)
    module = shared_module(init.config)
    count, shots = x.shape[0], x.shape[1]
    with torch.inference_mode():
        flat = x.flatten(0, 1)
        features = embed(module, meta, flat).reshape(count, shots, -1)
        onehot = torch.nn.functional.one_hot(y, n_way).to(x.dtype)
        weight, bias = vmap(prototype_head)(features, onehot)
        loss_x, loss_y = vmap(support_views, in_dims=(0, 0, None))(x, y, recipe.shift_views)
        if recipe.shift_views > 0:
            loss_features = embed(module, meta, loss_x.flatten(0, 1)).reshape(
                count, loss_x.shape[1], -1
            )
        else:
            loss_features = features
        targets = soft_targets(loss_y, n_way, recipe.label_smoothing, x.dtype)
        grads = vmap(head_grads, in_dims=(0, 0, 0, None, 0, None))
        names = [HEAD_WEIGHT, HEAD_BIAS]
        for t in range(steps):
            g_weight, g_bias = grads(
                loss_features, weight, bias, meta[HEAD_SCALE], targets, recipe.temperature
            )
            lr_weight, lr_bias = step_sizes_at(sizes, names, t, init.config.inner_step_size)
            weight = weight - lr_weight * g_weight
            bias = bias - lr_bias * g_bias
        out = vmap(head_logits, in_dims=(0, 0, 0, None))(features, weight, bias, meta[HEAD_SCALE])
        accuracy = (out.argmax(dim=2) == y).float().mean(dim=1).clone()
    params = [
        {**meta, HEAD_WEIGHT: weight[t].clone(), HEAD_BIAS: bias[t].clone()} for t in range(count)
    ]
    return params, accuracy
