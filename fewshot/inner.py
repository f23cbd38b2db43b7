"""The functional inner loop: adapt parameters to one task's support set with torch.func.

Parameters travel as a flat dict {name: Tensor}: the backbone's names ("blocks.0.weight", ...)
plus HEAD_SCALE (a meta-learned temperature). Each task adds HEAD_WEIGHT [N, D] and HEAD_BIAS [N],
initialised from its prototypes, so one initialization serves any number of ways.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad

from fewshot.backbone import Conv4
from fewshot.config import AdaptMode
from fewshot.head import head_logits, prototype_head

HEAD_WEIGHT = "head.weight"
HEAD_BIAS = "head.bias"
HEAD_SCALE = "head.log_scale"

Params = dict[str, Tensor]


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


def _full_loss(adapted: Params, base: Params, module: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits(module, {**base, **adapted}, x), y)


def _head_loss(adapted: Params, features: Tensor, log_scale: Tensor, y: Tensor) -> Tensor:
    out = head_logits(features, adapted[HEAD_WEIGHT], adapted[HEAD_BIAS], log_scale)
    return F.cross_entropy(out, y)


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
) -> Params:
    """Run `steps` SGD steps on the support cross-entropy; return the adapted parameter dict.

    support_x: [S, C, H, W]; support_y: [S] in 0..n_way-1 (unbalanced counts allowed).
    Differentiable in `meta` and `step_sizes`: second order by default (Finn et al. 2017, eq. 1),
    first order (FOMAML) when `first_order` (inner gradients are treated as constants).
    Works under torch.func.vmap over a leading task dimension. `on_step(t, params)` sees the
    parameters after each step (t = 1..steps), e.g. for MAML++'s multi-step loss.
    With `differentiable=False` (serving one task) the result is detached and the steps use
    plain reverse-mode autograd, which skips torch.func's per-op wrapping; not for vmap.
    """
    onehot = F.one_hot(support_y, n_way).to(support_x.dtype)
    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        features = embed(module, meta, support_x)
        weight, bias = prototype_head(features, onehot)
    fast: Params = {**meta, HEAD_WEIGHT: weight, HEAD_BIAS: bias}
    if not differentiable:
        fast = {name: value.detach() for name, value in fast.items()}
    names = adapted_names(fast, mode)
    support_grads = _func_grads if differentiable else _autograd_grads
    for t in range(steps):
        adapted = {name: fast[name] for name in names}
        base = {name: fast[name] for name in fast if name not in adapted}
        grads = support_grads(adapted, base, module, features, support_x, support_y, mode)
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
) -> Params:
    """Support-loss gradients with torch.func.grad: differentiable, and vmap-able."""
    if mode == "head":
        out: Params = grad(_head_loss)(adapted, features, base[HEAD_SCALE], y)
    else:
        out = grad(_full_loss)(adapted, base, module, x, y)
    return out


def _autograd_grads(
    adapted: Params,
    base: Params,
    module: nn.Module,
    features: Tensor,
    x: Tensor,
    y: Tensor,
    mode: AdaptMode,
) -> Params:
    """Support-loss gradients on fresh leaves with torch.autograd.grad: constants, not vmap-able.

    For serving one task this skips torch.func's per-op wrapping (1.8x faster here).
    """
    with torch.enable_grad():
        leaves = {name: value.detach().requires_grad_(True) for name, value in adapted.items()}
        if mode == "head":
            loss = _head_loss(leaves, features.detach(), base[HEAD_SCALE], y)
        else:
            loss = _full_loss(leaves, base, module, x, y)
        grads = torch.autograd.grad(loss, list(leaves.values()))
    return dict(zip(leaves, grads, strict=True))


def predict_logits_batched(
    module: nn.Module, params: Mapping[str, Tensor], x: Tensor, chunk: int = 1024
) -> Tensor:
    """Logits [B, N] computed in chunks; each image is processed independently of the others."""
    if x.shape[0] <= chunk:
        return logits(module, params, x)
    return torch.cat([logits(module, params, part) for part in torch.split(x, chunk)])
