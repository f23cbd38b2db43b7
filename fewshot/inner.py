"""The functional inner loop: adapt parameters to one task's support set with torch.func.

Parameters travel as a flat dict {name: Tensor}: the backbone's names ("blocks.0.weight", ...)
plus HEAD_SCALE (a meta-learned temperature). Each task adds HEAD_WEIGHT [N, D] and HEAD_BIAS [N],
initialised from its prototypes, so one initialization serves any number of ways.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad

from fewshot.backbone import Conv4
from fewshot.config import AdaptMode, ModelConfig, StepSizeTransform
from fewshot.head import head_logits
from fewshot.nuisance import initial_head

HEAD_WEIGHT = "head.weight"
HEAD_BIAS = "head.bias"
HEAD_SCALE = "head.log_scale"

Params = dict[str, Tensor]


@dataclass(frozen=True)
class InnerRecipe:
    """How the inner loop's support loss and step sizes are formed (see ModelConfig's fields).

    The defaults are the v1/v2 recipe: plain cross-entropy on the support set, raw step sizes.
    """

    temperature: float = 1.0
    label_smoothing: float = 0.0
    shift_views: int = 0
    transform: StepSizeTransform = "identity"
    per_class: bool = False
    nuisance_shrinkage: float = 1.0

    @classmethod
    def from_config(cls, config: ModelConfig) -> InnerRecipe:
        """The recipe an initialization's config records."""
        return cls(
            temperature=config.inner_temperature,
            label_smoothing=config.inner_label_smoothing,
            shift_views=config.inner_shift_views,
            transform=config.step_size_transform,
            per_class=config.inner_loss_per_class,
            nuisance_shrinkage=config.nuisance_shrinkage,
        )

    @property
    def whitens(self) -> bool:
        """Whether the head starts from fewshot.nuisance's discriminant (needs shifted views)."""
        return self.shift_views > 0 and self.nuisance_shrinkage < 1.0


PLAIN = InnerRecipe()


def support_views(x: Tensor, y: Tensor, shift: int) -> tuple[Tensor, Tensor]:
    """Support images [S, C, H, W] plus four copies shifted by `shift` pixels: [5S, ...], labels [5S].

    Deterministic (so adaptation is reproducible) and vmap-able; `shift` 0 returns the inputs.
    """
    if shift <= 0:
        return x, y
    height, width = x.shape[-2], x.shape[-1]
    padded = F.pad(x, (shift, shift, shift, shift))
    views = [x]
    for dy, dx in ((0, shift), (2 * shift, shift), (shift, 0), (shift, 2 * shift)):
        views.append(padded[..., dy : dy + height, dx : dx + width])
    return torch.cat(views), y.repeat(len(views))


def effective_step_sizes(
    step_sizes: Mapping[str, Tensor], transform: StepSizeTransform
) -> dict[str, Tensor]:
    """The step sizes the inner loop uses: stored values, or softplus(stored) > 0."""
    if transform == "softplus":
        return {name: F.softplus(value) for name, value in step_sizes.items()}
    return dict(step_sizes)


def raw_step_sizes(effective: Tensor, transform: StepSizeTransform) -> Tensor:
    """Inverse of effective_step_sizes for one tensor (values below 1e-3 clamp up under softplus)."""
    if transform == "softplus":
        value = effective.clamp_min(1e-3)
        return value + torch.log(-torch.expm1(-value))
    return effective.clone()


def backbone_names(params: Mapping[str, Tensor]) -> list[str]:
    """Names of the backbone's parameters in a parameter dict."""
    return [name for name in params if not name.startswith("head.")]


def adapted_names(params: Mapping[str, Tensor], mode: AdaptMode) -> list[str]:
    """Names the inner loop updates: all layers (MAML) or the head alone (ANIL, Raghu et al. 2020)."""
    head = [HEAD_WEIGHT, HEAD_BIAS]
    return head if mode == "head" else [*backbone_names(params), *head]


def embed(module: nn.Module, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """Embeddings [B, D] of images [B, C, H, W] under the backbone parameters in `params`."""
    if isinstance(module, Conv4):
        return module.forward_with(params, x)
    weights = {name: params[name] for name in params if not name.startswith("head.")}
    out: Tensor = functional_call(module, weights, (x,))
    return out


def embed_with_norms(
    module: nn.Module, params: Mapping[str, Tensor], x: Tensor
) -> tuple[Tensor, Tensor]:
    """embed's [B, D] and each embedding's norm before normalisation [B] (Conv4; for other
    modules the norm of what they return)."""
    if isinstance(module, Conv4):
        return module.forward_with_norms(params, x)
    features = embed(module, params, x)
    return features, features.norm(dim=-1)


def logits(module: nn.Module, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """Class logits [B, N] of images [B, C, H, W] under adapted parameters (with a head)."""
    features = embed(module, params, x)
    return head_logits(features, params[HEAD_WEIGHT], params[HEAD_BIAS], params[HEAD_SCALE])


def step_size(
    step_sizes: Mapping[str, Tensor], name: str, step: int, default: float
) -> Tensor | float:
    """Inner step size for `name` at `step`: learned per layer and step (MAML++ LSLR) or the default."""
    sizes = step_sizes.get(name)
    if sizes is None:
        return default
    return sizes[min(step, sizes.shape[0] - 1)]


def _full_loss(
    adapted: Params, base: Params, module: nn.Module, x: Tensor, y: Tensor, recipe: InnerRecipe
) -> Tensor:
    out = logits(module, {**base, **adapted}, x)
    return _support_loss(out, y, recipe)


def _head_loss(
    adapted: Params, features: Tensor, log_scale: Tensor, y: Tensor, recipe: InnerRecipe
) -> Tensor:
    out = head_logits(features, adapted[HEAD_WEIGHT], adapted[HEAD_BIAS], log_scale)
    return _support_loss(out, y, recipe)


def _support_loss(out: Tensor, y: Tensor, recipe: InnerRecipe) -> Tensor:
    if recipe.temperature != 1.0:
        out = out * recipe.temperature
    loss = F.cross_entropy(out, y, label_smoothing=recipe.label_smoothing)
    return loss * out.shape[-1] if recipe.per_class else loss


def support_loss(
    module: nn.Module, params: Mapping[str, Tensor], x: Tensor, y: Tensor, recipe: InnerRecipe
) -> Tensor:
    """The inner loop's loss on a support set [S, C, H, W] / [S] under adapted params (with head)."""
    views_x, views_y = support_views(x, y, recipe.shift_views)
    return _support_loss(logits(module, params, views_x), views_y, recipe)


def adapt_params(
    module: nn.Module,
    meta: Mapping[str, Tensor],
    step_sizes: Mapping[str, Tensor],
    support_x: Tensor,
    support_y: Tensor,
    n_way: int,
    *,
    steps: int,
    default_step_size: float,
    mode: AdaptMode = "full",
    first_order: bool = False,
    on_step: Callable[[int, Params], None] | None = None,
    differentiable: bool = True,
    recipe: InnerRecipe = PLAIN,
) -> Params:
    """Run `steps` SGD steps on the support cross-entropy; return the adapted parameter dict.

    support_x: [S, C, H, W]; support_y: [S] in 0..n_way-1 (unbalanced counts allowed).
    Differentiable in `meta` and `step_sizes`: second order by default (Finn et al. 2017, eq. 1),
    first order (FOMAML) when `first_order` (inner gradients are treated as constants).
    Works under torch.func.vmap over a leading task dimension. `on_step(t, params)` sees the
    parameters after each step (t = 1..steps), e.g. for MAML++'s multi-step loss.
    With `differentiable=False` (serving one task) the result is detached and the steps use
    plain reverse-mode autograd, which skips torch.func's per-op wrapping; not for vmap.
    `recipe` sets the support loss (temperature, label smoothing, shifted views) and whether
    the stored step sizes pass through softplus; the head starts from the plain support's
    prototypes (or, when `recipe.whitens`, fewshot.nuisance's discriminant of them).
    """
    onehot = F.one_hot(support_y, n_way).to(support_x.dtype)
    loss_x, loss_y = support_views(support_x, support_y, recipe.shift_views)
    fits_views = recipe.shift_views > 0 and mode == "head" and steps > 0
    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        features = embed(module, meta, support_x)
        views = embed(module, meta, loss_x) if fits_views or recipe.whitens else None
        weight, bias = initial_head(
            features, onehot, views if recipe.whitens else None, recipe.nuisance_shrinkage
        )
        step_sizes = effective_step_sizes(step_sizes, recipe.transform) if steps > 0 else {}
    loss_features = views if fits_views and views is not None else features
    fast: Params = {**meta, HEAD_WEIGHT: weight, HEAD_BIAS: bias}
    if not differentiable:
        fast = {name: value.detach() for name, value in fast.items()}
    names = adapted_names(fast, mode)
    support_grads = _func_grads if differentiable else _autograd_grads
    for t in range(steps):
        adapted = {name: fast[name] for name in names}
        base = {name: fast[name] for name in fast if name not in adapted}
        grads = support_grads(adapted, base, module, loss_features, loss_x, loss_y, mode, recipe)
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
            for name in names:
                g = grads[name].detach() if first_order else grads[name]
                fast[name] = fast[name] - step_size(step_sizes, name, t, default_step_size) * g
        if on_step is not None:
            on_step(t + 1, fast)
    return fast


def _func_grads(
    adapted: Params,
    base: Params,
    module: nn.Module,
    features: Tensor,
    x: Tensor,
    y: Tensor,
    mode: AdaptMode,
    recipe: InnerRecipe,
) -> Params:
    """Support-loss gradients with torch.func.grad: differentiable, and vmap-able."""
    if mode == "head":
        out: Params = grad(_head_loss)(adapted, features, base[HEAD_SCALE], y, recipe)
    else:
        out = grad(_full_loss)(adapted, base, module, x, y, recipe)
    return out


def _autograd_grads(
    adapted: Params,
    base: Params,
    module: nn.Module,
    features: Tensor,
    x: Tensor,
    y: Tensor,
    mode: AdaptMode,
    recipe: InnerRecipe,
) -> Params:
    """Support-loss gradients on fresh leaves with torch.autograd.grad: constants, not vmap-able.

    For serving one task this skips torch.func's per-op wrapping (1.8x faster here).
    """
    with torch.enable_grad():
        leaves = {name: value.detach().requires_grad_(True) for name, value in adapted.items()}
        if mode == "head":
            loss = _head_loss(leaves, features.detach(), base[HEAD_SCALE], y, recipe)
        else:
            loss = _full_loss(leaves, base, module, x, y, recipe)
        grads = torch.autograd.grad(loss, list(leaves.values()))
    return dict(zip(leaves, grads, strict=True))


def predict_logits_batched(
    module: nn.Module, params: Mapping[str, Tensor], x: Tensor, chunk: int = 1024
) -> Tensor:
    """Logits [B, N] computed in chunks; each image is processed independently of the others."""
    if x.shape[0] <= chunk:
        return logits(module, params, x)
    return torch.cat([logits(module, params, part) for part in torch.split(x, chunk)])


def head_grads(
    features: Tensor,
    weight: Tensor,
    bias: Tensor,
    log_scale: Tensor,
    targets: Tensor,
    temperature: float,
    per_class: bool = False,
) -> tuple[Tensor, Tensor]:
    """Closed-form gradients of the support loss in the head's weight [N, D] and bias [N].

    loss = mean_i CE(t * exp(s) * (f_i W^T + b), q_i) with soft targets q (label smoothing
    folded in), so dloss/dlogits = (softmax - q) / B and the chain rule through the linear head;
    `per_class` multiplies the loss by N (InnerRecipe.per_class).
    """
    factor = torch.exp(log_scale) * temperature
    if per_class:
        factor = factor * targets.shape[1]
    out = head_logits(features, weight, bias, log_scale)
    if temperature != 1.0:
        out = out * temperature
    dlogits = (torch.softmax(out, dim=1) - targets) * (factor / features.shape[0])
    return dlogits.transpose(0, 1) @ features, dlogits.sum(dim=0)


def soft_targets(y: Tensor, n_way: int, smoothing: float, dtype: torch.dtype) -> Tensor:
    """The cross-entropy's target distribution [B, N]: one-hot mixed with uniform by `smoothing`."""
    onehot = F.one_hot(y, n_way).to(dtype)
    if smoothing == 0.0:
        return onehot
    return onehot * (1.0 - smoothing) + smoothing / n_way
