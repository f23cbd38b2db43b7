"""A per-task linear head initialised from class prototypes (Proto-MAML, Triantafillou et al. 2020)."""

from __future__ import annotations

import torch
from torch import Tensor


def prototype_head(features: Tensor, onehot: Tensor) -> tuple[Tensor, Tensor]:
    """Head weights [N, D] and bias [N] whose logits are -||f - c_k||^2 up to a per-row constant.

    features: [S, D] support embeddings; onehot: [S, N] class membership (any counts >= 1).
    With prototypes c_k (class means), W_k = 2 c_k and b_k = -||c_k||^2, so zero inner steps
    reproduce a Prototypical Network (Snell et al. 2017) and any number of ways N works.
    """
    counts = onehot.sum(dim=0).clamp_min(1.0)
    prototypes = (onehot.transpose(0, 1) @ features) / counts.unsqueeze(1)
    return 2.0 * prototypes, -(prototypes * prototypes).sum(dim=1)


def head_logits(features: Tensor, weight: Tensor, bias: Tensor, log_scale: Tensor) -> Tensor:
    """Logits [B, N] = exp(log_scale) * (features [B, D] @ weight.T + bias)."""
    return torch.exp(log_scale) * (features @ weight.transpose(0, 1) + bias)
