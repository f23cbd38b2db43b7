"""Serving one task fast: adapt_params' inner loop (differentiable=False) with less work per step.

The same SGD steps on the same support loss as `fewshot.inner.adapt_params`, equal to it up to
float rounding, for Conv4 initializations:

- the first step's forward pass also yields the prototype head's embeddings (same parameters,
  same images), so the trunk runs once less;
- step sizes are read once as Python floats and every step updates, in place, leaves owned by
  this call (two kernels per tensor, no new tensors);
- head-only (ANIL) steps use the closed-form gradient of the cross-entropy of a linear head on
  fixed embeddings (no autograd graph), and the support accuracy reuses those embeddings;
- the final accuracy pass runs under inference mode.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fewshot.adapted import AdaptedModel, check_adapt_args, shares_backbone
from fewshot.backbone import Conv4, shared_module
from fewshot.config import AdaptMode
from fewshot.head import head_logits
from fewshot.initialization import Initialization
from fewshot.inner import (
    HEAD_BIAS,
    HEAD_SCALE,
    HEAD_WEIGHT,
    InnerRecipe,
    Params,
    backbone_names,
    effective_step_sizes,
    embed,
    head_grads,
    soft_targets,
    support_views,
)
from fewshot.nuisance import initial_head
from fewshot.stepchoice import chooses_steps, served_head_steps, step_sizes_at
from fewshot.unknown import calibration_of, class_prototypes, plda_of


@dataclass(frozen=True)
class Prepared:
    """An initialization's tensors on one device, laid out for the fast loop, and its step sizes."""

    meta: Params
    # Effective step size per adapted name and step (None: the default step size).
    sizes: dict[str, list[float]]


_lock = threading.Lock()
_prepared: OrderedDict[tuple[int, str], tuple[Initialization, Prepared]] = OrderedDict()
_PREPARED_LIMIT = 8


def prepare(init: Initialization, device: torch.device) -> Prepared:
    """The initialization's parameters and effective step sizes on `device`, cached."""
    key = (id(init), str(device))
    with _lock:
        hit = _prepared.get(key)
        if hit is not None and hit[0] is init:
            _prepared.move_to_end(key)
            return hit[1]
    recipe = InnerRecipe.from_config(init.config)
    meta = {name: value.to(device).contiguous() for name, value in init.params.items()}
    effective = effective_step_sizes(init.step_sizes, recipe.transform)
    sizes = {
        name: [float(v) for v in value.reshape(-1).tolist()] for name, value in effective.items()
    }
    prepared = Prepared(meta=meta, sizes=sizes)
    with _lock:
        _prepared[key] = (init, prepared)
        while len(_prepared) > _PREPARED_LIMIT:
            _prepared.popitem(last=False)
    return prepared


def adapt_params_fast(
    module: Conv4,
    prepared: Prepared,
    support_x: Tensor,
    support_y: Tensor,
    n_way: int,
    *,
    steps: int,
    default_step_size: float,
    mode: AdaptMode,
    recipe: InnerRecipe,
    learned_step_sizes: bool = True,
    embedded: Tensor | None = None,
    embedded_views: Tensor | None = None,
) -> tuple[Params, Tensor, Tensor]:
    """adapt_params(..., differentiable=False) for one task, plus reusable support embeddings.

    Returns the adapted parameters (detached), the support images' embeddings [S, D] under the
    adapted backbone when they are known without another pass (head mode; else an empty
    tensor), and their embeddings [S, D] under the initialization (the first step's).
    `embedded`: those embeddings when the caller has them (head mode then skips the trunk);
    `embedded_views`: likewise for the shifted support views' embeddings [5S, D].
    """
    meta = prepared.meta
    sizes = prepared.sizes if learned_step_sizes else {}
    x = support_x
    onehot = F.one_hot(support_y, n_way).to(x.dtype)
    loss_x, loss_y = support_views(x, support_y, recipe.shift_views)
    targets = soft_targets(loss_y, n_way, recipe.label_smoothing, x.dtype)
    count = support_x.shape[0]
    if mode == "head" or steps == 0:
        with torch.inference_mode():
            features = embed(module, meta, x) if embedded is None else embedded
            loss_features = features
            if recipe.shift_views > 0:
                loss_features = (
                    embed(module, meta, loss_x) if embedded_views is None else embedded_views
                )
            weight, bias = initial_head(
                features,
                onehot,
                loss_features if recipe.whitens else None,
                recipe.nuisance_shrinkage,
            )
            names = [HEAD_WEIGHT, HEAD_BIAS]
            for t in range(steps):
                g_weight, g_bias = head_grads(
                    loss_features,
                    weight,
                    bias,
                    meta[HEAD_SCALE],
                    targets,
                    recipe.temperature,
                    recipe.per_class,
                )
                lr_weight, lr_bias = step_sizes_at(sizes, names, t, default_step_size)
                weight = weight - lr_weight * g_weight
                bias = bias - lr_bias * g_bias
        out = dict(meta)
        out[HEAD_WEIGHT], out[HEAD_BIAS] = weight.clone(), bias.clone()
        features = features.clone()
        return out, features, features

    backbone = backbone_names(meta)
    names = [*backbone, HEAD_WEIGHT, HEAD_BIAS]
    leaves = {name: meta[name].detach().clone().requires_grad_(True) for name in backbone}
    fast: Params = {**meta, **leaves}
    initial = torch.empty(0)
    for t in range(steps):
        with torch.enable_grad():
            features = embed(module, fast, loss_x)
            if t == 0:
                # The unshifted support comes first in loss_x: its embeddings under the meta
                # parameters are the prototypes' (adapt_params computes them in a separate pass).
                initial = features[:count].detach()
                whitened = features.detach() if recipe.whitens else None
                weight, bias = initial_head(initial, onehot, whitened, recipe.nuisance_shrinkage)
                leaves[HEAD_WEIGHT] = weight.requires_grad_(True)
                leaves[HEAD_BIAS] = bias.requires_grad_(True)
                fast.update(leaves)
            out_logits = head_logits(features, fast[HEAD_WEIGHT], fast[HEAD_BIAS], fast[HEAD_SCALE])
            if recipe.temperature != 1.0:
                out_logits = out_logits * recipe.temperature
            loss = F.cross_entropy(out_logits, loss_y, label_smoothing=recipe.label_smoothing)
            if recipe.per_class:
                loss = loss * n_way
            params = [leaves[name] for name in names]
            grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            # In place on this call's leaves and fresh gradients: two kernels per tensor.
            lrs = step_sizes_at(sizes, names, t, default_step_size)
            for param, g, lr in zip(params, grads, lrs, strict=True):
                param.sub_(g.mul_(lr))
    return {name: value.detach() for name, value in fast.items()}, torch.empty(0), initial


def adapt_fast(
    init: Initialization,
    support_x: Tensor,
    labels: Sequence[str],
    *,
    mode: AdaptMode | None = None,
    steps: int | None = None,
    step_size: float | None = None,
    device: str | torch.device | None = None,
) -> AdaptedModel:
    """fewshot.adapt with the fast single-task loop: same arguments, same result up to rounding."""
    model, _ = adapt_fast_with_embeddings(
        init, support_x, labels, mode=mode, steps=steps, step_size=step_size, device=device
    )
    return model


def adapt_fast_with_embeddings(
    init: Initialization,
    support_x: Tensor,
    labels: Sequence[str],
    *,
    mode: AdaptMode | None = None,
    steps: int | None = None,
    step_size: float | None = None,
    device: str | torch.device | None = None,
) -> tuple[AdaptedModel, Tensor]:
    """`adapt_fast`'s model and the support embeddings [S, D] under the initialization.

    The embeddings come from the first step's forward pass (no extra pass): what
    `fewshot.diagnostics.diagnose_embeddings` needs.
    """
    mode = init.config.default_mode if mode is None else mode
    chosen = chooses_steps(init, mode, steps)
    steps, classes, y, target = check_adapt_args(init, support_x, labels, mode, steps, device)
    prepared = prepare(init, target)
    default = init.config.inner_step_size if step_size is None else step_size
    x, y = support_x.to(target), y.to(target)
    module = shared_module(init.config)
    features: Tensor | None = None
    views: Tensor | None = None
    if chosen:
        shift = init.config.inner_shift_views
        with torch.inference_mode():
            features = embed(module, prepared.meta, x)
            if init.config.support_fit_guard and shift > 0:
                views = embed(module, prepared.meta, support_views(x, y, shift)[0])
        sizes = prepared.sizes if step_size is None else {}
        steps = served_head_steps(
            init.config,
            features,
            views,
            y,
            len(classes),
            prepared.meta[HEAD_SCALE],
            sizes,
            default,
        )
    params, features, initial = adapt_params_fast(
        module,
        prepared,
        x,
        y,
        len(classes),
        steps=steps,
        default_step_size=default,
        mode=mode,
        recipe=InnerRecipe.from_config(init.config),
        learned_step_sizes=step_size is None,
        embedded=features if mode == "head" else None,
        embedded_views=views if mode == "head" else None,
    )
    model = finished_model(init, module, params, x, y, classes, mode, steps, features)
    return model, initial


def finished_model(
    init: Initialization,
    module: Conv4,
    params: Params,
    x: Tensor,
    y: Tensor,
    classes: list[str],
    mode: AdaptMode,
    steps: int,
    features: Tensor | None = None,
) -> AdaptedModel:
    """The AdaptedModel fewshot.adapt builds from adapted parameters (one support pass, shared).

    `features` (non-empty) are the support embeddings under `params`' backbone, when known.
    """
    with torch.inference_mode():
        if features is None or features.numel() == 0:
            features = embed(module, params, x)
        out = head_logits(features, params[HEAD_WEIGHT], params[HEAD_BIAS], params[HEAD_SCALE])
        accuracy = float((out.argmax(dim=1) == y).float().mean().item())
        prototypes = class_prototypes(features, y, len(classes)).clone()
    return AdaptedModel(
        config=init.config,
        params=params,
        labels=classes,
        mode=mode,
        steps=steps,
        support_accuracy=accuracy,
        initialization_version=init.version,
        prototypes=prototypes.clone(),
        class_counts=torch.bincount(y, minlength=len(classes)).tolist(),
        unknown=calibration_of(init),
        backbone_shared=shares_backbone(params, init),
        plda=plda_of(init),
    )
