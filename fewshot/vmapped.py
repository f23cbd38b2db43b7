"""Many tasks at once: adaptation and query logits vmapped over a leading task dimension."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.func import vmap

from fewshot.config import AdaptMode
from fewshot.inner import PLAIN, InnerRecipe, Params, adapt_params, logits


def query_logits(
    module: nn.Module,
    meta: Mapping[str, Tensor],
    step_sizes: Mapping[str, Tensor],
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    n_way: int,
    *,
    steps: int,
    default_step_size: float,
    mode: AdaptMode = "full",
    first_order: bool = False,
    every_step: bool = False,
    recipe: InnerRecipe = PLAIN,
) -> Tensor:
    """Query logits of T tasks after adaptation: [T, Q, N], or [steps, T, Q, N] with `every_step`.

    support_x: [T, S, C, H, W]; support_y: [T, S]; query_x: [T, Q, C, H, W]. All tasks share
    one shape so they run as one vmapped call (exact for GroupNorm, also in second order).
    """

    def one_task(sx: Tensor, sy: Tensor, qx: Tensor) -> Tensor:
        seen: list[Params] = []
        fast = adapt_params(
            module,
            meta,
            step_sizes,
            sx,
            sy,
            n_way,
            steps=steps,
            default_step_size=default_step_size,
            mode=mode,
            first_order=first_order,
            recipe=recipe,
            on_step=(lambda _t, p: seen.append(dict(p))) if every_step and steps > 0 else None,
        )
        if not every_step:
            return logits(module, fast, qx)
        states = seen or [fast]
        return torch.stack([logits(module, p, qx) for p in states])

    out: Tensor = vmap(one_task)(support_x, support_y, query_x)
    return out.movedim(1, 0) if every_step else out
