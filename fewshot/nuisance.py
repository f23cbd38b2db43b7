"""A task's head that discounts the directions an image's own shifts move its embedding.

One drawing per class cannot say which differences between two embeddings matter; the
embeddings of a support image's shifted copies can say which do not. Their offsets from the
image's own embedding span the task's nuisance directions; a linear discriminant (Fisher 1936)
with that scatter as the within-class covariance, shrunk toward the identity (the prototype
head), weighs the other directions up. Closed form, per task, from the support set alone, so a
query's answer still depends only on itself and the task. Mahalanobis prototypes with shrunk
class covariances: Bateni et al. 2020 ("Improved few-shot visual classification", Simple
CNAPS); here the covariance is estimated from augmentations, which works at one shot.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Below this total variance the offsets carry no direction (e.g. images with no ink to shift).
_MIN_SCATTER = 1e-12


def nuisance_head(
    features: Tensor, onehot: Tensor, offsets: Tensor, shrinkage: float
) -> tuple[Tensor, Tensor]:
    """Head weight [..., N, D] and bias [..., N] whose logits are -(f - c_k)^T P (f - c_k) up to
    a constant per query f, P the inverse of shrinkage * I + (1 - shrinkage) * S.

    features: [..., S, D] support embeddings; onehot: [..., S, N] class membership; offsets:
    [..., M, D] nuisance offsets (support_offsets); leading dimensions are tasks. S = D *
    offsets^T offsets / ||offsets||_F^2 is their scatter scaled to mean eigenvalue 1, so P keeps
    the prototype head's scale; shrinkage 1, or offsets without variance (nothing to shift),
    gives the prototype head (fewshot.head.prototype_head). Solved through the M x M Woodbury
    identity rather than a D x D inverse (M is a few hundred at most); no data-dependent branch,
    so it runs under torch.func.vmap.
    """
    counts = onehot.sum(dim=-2).clamp_min(1.0)
    prototypes = (onehot.transpose(-1, -2) @ features) / counts.unsqueeze(-1)  # [..., N, D]
    plain_bias = -(prototypes * prototypes).sum(dim=-1)
    if shrinkage >= 1.0 or offsets.shape[-2] == 0:
        return 2.0 * prototypes, plain_bias
    delta = offsets.double()
    total = delta.pow(2).sum(dim=(-2, -1), keepdim=True)  # [..., 1, 1]
    usable = total > _MIN_SCATTER
    # Sigma = shrinkage * I + alpha * delta^T delta; alpha sets S's mean eigenvalue to 1.
    alpha = (1.0 - shrinkage) * features.shape[-1] / total.clamp_min(_MIN_SCATTER)
    eye = torch.eye(delta.shape[-2], dtype=delta.dtype, device=delta.device)
    gram = delta @ delta.transpose(-1, -2) + eye * (shrinkage / alpha)
    mu = prototypes.double()
    # mu Sigma^-1 = (mu - (mu delta^T) (shrinkage / alpha I + delta delta^T)^-1 delta) / shrinkage
    solved = torch.linalg.solve(gram, delta @ mu.transpose(-1, -2))  # [..., M, N]
    whitened = (mu - solved.transpose(-1, -2) @ delta) / shrinkage  # [..., N, D]
    whitened = torch.where(usable, whitened, mu)
    weight = (2.0 * whitened).to(features.dtype)
    bias = -(whitened * mu).sum(dim=-1).to(features.dtype)
    return weight, bias


def support_offsets(features: Tensor, views: Tensor, onehot: Tensor) -> Tensor:
    """Nuisance offsets [..., M, D]: each shifted view's offset from its image, then each
    image's offset from its class mean, corrected for the mean's own shrink (zero for one shot).

    features: [..., S, D] support embeddings; views: [..., V * S, D] their views, unshifted
    copies first (V - 1 shifted copies of each image follow, in the same order); onehot:
    [..., S, N]. M = V * S: a fixed count, so tasks of one shape stack.
    """
    count, dim = features.shape[-2], features.shape[-1]
    lead = features.shape[:-2]
    shifted = views[..., count:, :].reshape(*lead, -1, count, dim) - features.unsqueeze(-3)
    counts = onehot.sum(dim=-2)  # [..., N]
    prototypes = (onehot.transpose(-1, -2) @ features) / counts.clamp_min(1.0).unsqueeze(-1)
    own = (onehot @ counts.unsqueeze(-1)).squeeze(-1)  # [..., S]: the size of each image's class
    # An image's residual from the mean of its k shots is shrunk by (k - 1) / k: undo it.
    scale = torch.sqrt(own / (own - 1.0).clamp_min(1.0)) * (own > 1).to(features.dtype)
    residual = (features - onehot @ prototypes) * scale.unsqueeze(-1)
    return torch.cat([shifted.reshape(*lead, -1, dim), residual], dim=-2)


def initial_head(
    features: Tensor, onehot: Tensor, views: Tensor | None, shrinkage: float
) -> tuple[Tensor, Tensor]:
    """The head a task starts from: nuisance_head when `shrinkage` < 1 and the support's
    shifted views [..., V * S, D] are given, else the prototype head."""
    if views is None or shrinkage >= 1.0:
        return nuisance_head(features, onehot, features[..., :0, :], 1.0)
    return nuisance_head(features, onehot, support_offsets(features, views, onehot), shrinkage)
