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

from fewshot.adapted import (
    AdaptedModel,
    PredictionScores,
    _check_images,
    encode_labels,
    shares_backbone,
)
from fewshot.backbone import shared_module
from fewshot.config import AdaptMode
from fewshot.errors import EpisodeError
from fewshot.fast import prepare
from fewshot.head import head_logits
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
    embed_with_norms,
    soft_targets,
    support_views,
)
from fewshot.nuisance import initial_head
from fewshot.stepchoice import step_sizes_at
from fewshot.unknown import calibration_of, class_prototypes, plda_of


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


def embed_supports(
    init: Initialization,
    supports: Sequence[Tensor],
    *,
    device: str | torch.device | None = None,
    chunk: int = 128,
) -> list[Tensor]:
    """Each support set's embeddings [S_i, D] under the initialization, in passes of `chunk`.

    What `fewshot.diagnostics.diagnose_embeddings` needs for a batch of tasks: one trunk pass
    per `chunk` images instead of one per task (each image is embedded on its own: GroupNorm,
    no batch statistics).
    """
    if not supports:
        return []
    target = torch.device(device) if device is not None else _init_device(init)
    meta = prepare(init, target).meta
    module = shared_module(init.config)
    with torch.inference_mode():
        flat = torch.cat([x.to(target) for x in supports])
        features = torch.cat([embed(module, meta, part) for part in torch.split(flat, chunk)])
        return [part.clone() for part in torch.split(features, [x.shape[0] for x in supports])]


def _init_device(init: Initialization) -> torch.device:
    return init.params[next(iter(init.params))].device


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
        params, accuracy, prototypes = _head_group(
            init, prepared.meta, prepared.sizes, x, y, n_way, steps
        )
    else:
        names = [*backbone_names(prepared.meta), HEAD_WEIGHT, HEAD_BIAS]
        sizes = {name: value.to(device) for name, value in init.step_sizes.items()}

        def one(sx: Tensor, sy: Tensor) -> tuple[Params, Tensor, Tensor]:
            fast = adapt_params(
                module, prepared.meta, sizes, sx, sy, n_way,
                steps=steps, default_step_size=default, mode=mode, first_order=True,
                recipe=recipe,
            )  # fmt: skip
            features = embed(module, fast, sx)
            out = head_logits(features, fast[HEAD_WEIGHT], fast[HEAD_BIAS], fast[HEAD_SCALE])
            correct = (out.argmax(dim=1) == sy).float().mean()
            adapted = {name: fast[name] for name in names}
            return adapted, correct, class_prototypes(features, sy, n_way)

        with torch.no_grad():
            adapted, accuracy, prototypes = vmap(one)(x, y)
        params = [
            {**prepared.meta, **{name: value[t].clone() for name, value in adapted.items()}}
            for t in range(len(tasks))
        ]
    calibration, plda = calibration_of(init), plda_of(init)
    return [
        AdaptedModel(
            config=init.config,
            params=params[t],
            labels=task.classes,
            mode=mode,
            steps=steps,
            support_accuracy=float(accuracy[t]),
            initialization_version=init.version,
            prototypes=prototypes[t].clone(),
            class_counts=torch.bincount(task.y, minlength=n_way).tolist(),
            unknown=calibration,
            backbone_shared=shares_backbone(params[t], init),
            plda=plda,
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
) -> tuple[list[Params], Tensor, Tensor]:
    """Head-only adaptation of T tasks: one trunk pass over all support images, batched heads.

    The head steps are batched matrix products (no vmap): per task, the closed-form gradient
    of `fewshot.inner.head_grads`.
    """
    recipe = InnerRecipe.from_config(init.config)
    module = shared_module(init.config)
    count, shots = x.shape[0], x.shape[1]
    log_scale = meta[HEAD_SCALE]
    with torch.inference_mode():
        features = embed(module, meta, x.flatten(0, 1)).reshape(count, shots, -1)
        onehot = torch.nn.functional.one_hot(y, n_way).to(x.dtype)
        counts = onehot.sum(dim=1).clamp_min(1.0)
        prototypes = torch.bmm(onehot.transpose(1, 2), features) / counts.unsqueeze(2)
        weight, bias = 2.0 * prototypes, -(prototypes * prototypes).sum(dim=2)
        if recipe.shift_views > 0:
            # support_views over all tasks at once: [views, T, S] reordered to [T, views * S].
            flat_x, _ = support_views(x.flatten(0, 1), y.flatten(), recipe.shift_views)
            views = flat_x.shape[0] // (count * shots)
            loss_x = flat_x.reshape(views, count, shots, *x.shape[2:]).transpose(0, 1)
            loss_features = embed(module, meta, loss_x.flatten(0, 2)).reshape(
                count, views * shots, -1
            )
            loss_y = y.repeat(1, views)
        else:
            loss_features, loss_y = features, y
        if recipe.whitens:
            weight, bias = initial_head(features, onehot, loss_features, recipe.nuisance_shrinkage)
        targets = soft_targets(loss_y, n_way, recipe.label_smoothing, x.dtype)
        factor = torch.exp(log_scale) * recipe.temperature / loss_features.shape[1]
        if recipe.per_class:
            factor = factor * n_way
        names = [HEAD_WEIGHT, HEAD_BIAS]
        for t in range(steps):
            out = torch.exp(log_scale) * torch.baddbmm(
                bias.unsqueeze(1), loss_features, weight.transpose(1, 2)
            )
            if recipe.temperature != 1.0:
                out = out * recipe.temperature
            dlogits = (torch.softmax(out, dim=2) - targets) * factor
            lr_weight, lr_bias = step_sizes_at(sizes, names, t, init.config.inner_step_size)
            weight = weight - lr_weight * torch.bmm(dlogits.transpose(1, 2), loss_features)
            bias = bias - lr_bias * dlogits.sum(dim=1)
        out = torch.baddbmm(bias.unsqueeze(1), features, weight.transpose(1, 2))
        accuracy = (out.argmax(dim=2) == y).float().mean(dim=1).clone()
        prototypes = prototypes.clone()
    params = [
        {**meta, HEAD_WEIGHT: weight[t].clone(), HEAD_BIAS: bias[t].clone()} for t in range(count)
    ]
    return params, accuracy, prototypes


def predict_many(
    models: Sequence[AdaptedModel], images: Sequence[Tensor], *, chunk: int = 64
) -> list[Tensor]:
    """Class probabilities of each model on its own images [B_i, C, H, W], in few forward passes.

    Head-only models of one initialization share their backbone: all their images go through
    it together, in passes of `chunk` images (on a CPU, passes of ~32-128 small images cost the
    least per image: fewer and the per-call overhead dominates, more and the activations leave
    the cache). Other models run on their own images in passes of `chunk`, except on a GPU,
    where models of one config run as one pass vmapped over their stacked backbones (each
    request cut into rows of at most `chunk` images, the last row padded with copies of its
    first image, whose outputs are dropped). Every image is processed on its own (GroupNorm, no
    batch statistics), so its probabilities do not depend on the others.
    """
    with torch.inference_mode():
        features = [f for f, _ in embed_many(models, images, chunk=chunk)]
        out = []
        for model, feature in zip(models, features, strict=True):
            p = model.params
            row = head_logits(feature, p[HEAD_WEIGHT], p[HEAD_BIAS], p[HEAD_SCALE])
            out.append(torch.softmax(row.float(), dim=1).cpu())
    return [value.clone() for value in out]


def predict_many_scores(
    models: Sequence[AdaptedModel],
    images: Sequence[Tensor],
    thresholds: Sequence[float | None],
    *,
    chunk: int = 64,
) -> list[PredictionScores]:
    """AdaptedModel.predict_scores of each model on its own images, sharing passes as predict_many."""
    if len(thresholds) != len(models):
        raise ValueError("one threshold per model")
    with torch.inference_mode():
        features = embed_many(models, images, chunk=chunk)
    return [
        model.scores_of_features(feature.clone(), threshold, norms.clone())
        for model, (feature, norms), threshold in zip(models, features, thresholds, strict=True)
    ]


def embed_many(
    models: Sequence[AdaptedModel], images: Sequence[Tensor], *, chunk: int = 64
) -> list[tuple[Tensor, Tensor]]:
    """Query embeddings [B_i, D] of each model's images under its backbone and their norms
    before normalisation [B_i] (see predict_many)."""
    if len(models) != len(images):
        raise ValueError("one batch of images per model")
    for model, x in zip(models, images, strict=True):
        _check_images(x, model.config, "query")
    features: list[tuple[Tensor, Tensor] | None] = [None] * len(models)
    shared: dict[tuple[object, ...], list[int]] = {}
    stacked: dict[object, list[int]] = {}
    alone: list[int] = []
    for index, model in enumerate(models):
        if model.mode == "head":
            key = (model.config, model.initialization_version)
            group = shared.setdefault(key, [])
            if not group or _same_backbone(models[group[0]], model):
                group.append(index)
                continue
        if _device(model).type == "cuda":
            stacked.setdefault(model.config, []).append(index)
        else:
            alone.append(index)
    with torch.inference_mode():
        for group in shared.values():
            _shared_backbone(models, images, group, features, chunk)
        for group in stacked.values():
            _stacked_backbones(models, images, group, features, chunk)
        for index in alone:
            _shared_backbone(models, images, [index], features, chunk)
    done = [feature for feature in features if feature is not None]
    if len(done) != len(models):
        raise RuntimeError(f"embedded {len(done)} of {len(models)} support sets")
    return done


def _device(model: AdaptedModel) -> torch.device:
    return next(iter(model.params.values())).device


def _same_backbone(a: AdaptedModel, b: AdaptedModel) -> bool:
    """True when two models hold the same backbone tensors (the same objects, or equal values)."""
    for name in backbone_names(a.params):
        x, y = a.params[name], b.params[name]
        if x is not y and not torch.equal(x, y):
            return False
    return True


def _shared_backbone(
    models: Sequence[AdaptedModel],
    images: Sequence[Tensor],
    group: list[int],
    features: list[tuple[Tensor, Tensor] | None],
    chunk: int,
) -> None:
    """Embed the images of models with one backbone together, in passes of `chunk` images."""
    first = models[group[0]]
    module = shared_module(first.config)
    x = torch.cat([images[i] for i in group]).to(_device(first))
    parts = [embed_with_norms(module, first.params, part) for part in torch.split(x, chunk)]
    sizes = [images[i].shape[0] for i in group]
    embedded = torch.split(torch.cat([f for f, _ in parts]), sizes)
    norms = torch.split(torch.cat([n for _, n in parts]), sizes)
    for i, feature, norm in zip(group, embedded, norms, strict=True):
        features[i] = (feature, norm)


def _stacked_backbones(
    models: Sequence[AdaptedModel],
    images: Sequence[Tensor],
    group: list[int],
    features: list[tuple[Tensor, Tensor] | None],
    chunk: int,
) -> None:
    """Embed each model's images under its own backbone, one pass vmapped over the models."""
    first = models[group[0]]
    module = shared_module(first.config)
    device = _device(first)
    names = backbone_names(first.params)
    width = min(chunk, max(images[i].shape[0] for i in group))
    rows: list[tuple[int, Tensor]] = []
    for i in group:
        for part in torch.split(images[i], width):
            if part.shape[0] < width:
                pad = part[:1].expand(width - part.shape[0], *part.shape[1:])
                part = torch.cat([part, pad])
            rows.append((i, part))
    params = {name: torch.stack([models[i].params[name] for i, _ in rows]) for name in names}
    x = torch.stack([part for _, part in rows]).to(device)
    embedded, norms = vmap(lambda p, xs: embed_with_norms(module, p, xs))(params, x)
    pieces: dict[int, list[tuple[Tensor, Tensor]]] = {}
    for (i, _), row, norm in zip(rows, embedded, norms, strict=True):
        pieces.setdefault(i, []).append((row, norm))
    for i, parts in pieces.items():
        n = images[i].shape[0]
        features[i] = (torch.cat([f for f, _ in parts])[:n], torch.cat([m for _, m in parts])[:n])
