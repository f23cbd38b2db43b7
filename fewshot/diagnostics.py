"""Support-set diagnostics at task creation: leave-one-out accuracy and confusable class pairs.

Computed on the initialization's embeddings (no inner steps, so a few ms): leave-one-out
accuracy classifies each support image of a class with >= 2 examples by its nearest prototype
(Snell et al. 2017), the prototypes recomputed without that image; class pairs are ranked by the
cosine similarity of their prototypes. Unlike the support accuracy after adaptation (always ~1),
both say whether the support set is likely to work: a low leave-one-out accuracy or a pair at
similarity near 1 means the classes are hard to tell apart from these examples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fewshot.backbone import shared_module
from fewshot.initialization import Initialization
from fewshot.inner import embed


@dataclass
class ConfusablePair:
    """Two class labels and the cosine similarity of their prototypes (1: indistinguishable)."""

    first: str
    second: str
    similarity: float


@dataclass
class SupportDiagnostics:
    """Leave-one-out accuracy (None when no class has 2 examples), per class, and close pairs."""

    leave_one_out_accuracy: float | None
    evaluated_images: int
    per_class: dict[str, float | None] = field(default_factory=dict)
    confusable_pairs: list[ConfusablePair] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return asdict(self)


@torch.no_grad()
def diagnose_support(
    init: Initialization,
    images: Tensor,
    labels: Sequence[str],
    *,
    top_pairs: int = 5,
) -> SupportDiagnostics:
    """Leave-one-out accuracy and the `top_pairs` most similar class pairs of a support set.

    images: [S, C, H, W] preprocessed as for adapt(); labels: one string per image (>= 2
    distinct). Classes with a single image get None in per_class and are only candidates.
    """
    from fewshot.adapted import _check_images

    _check_images(images, init.config, "support")
    if len(labels) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} support images but {len(labels)} labels")
    device = next(iter(init.params.values())).device
    features = embed(shared_module(init.config), init.params, images.to(device))
    return diagnose_embeddings(features, labels, top_pairs=top_pairs)


@torch.no_grad()
def diagnose_embeddings(
    features: Tensor, labels: Sequence[str], *, top_pairs: int = 5
) -> SupportDiagnostics:
    """`diagnose_support` from the support images' embeddings [S, D] under the initialization.

    The adaptation's first forward pass computes these embeddings anyway
    (`fewshot.fast.adapt_fast_with_embeddings`), so the service does not run the trunk again.
    """
    from fewshot.adapted import encode_labels

    if len(labels) != features.shape[0]:
        raise ValueError(f"{features.shape[0]} support embeddings but {len(labels)} labels")
    classes, y = encode_labels(labels)
    n = len(classes)
    features = features.detach().double()
    y = y.to(features.device)
    onehot = F.one_hot(y, n).double()  # [S, N]
    sums = onehot.T @ features  # [N, D]
    counts = onehot.sum(dim=0)  # [N]
    # Leave-one-out prototypes: for image i of class k, (sum_k - f_i) / (count_k - 1).
    distances = torch.cdist(features, sums / counts.clamp_min(1).unsqueeze(1)) ** 2  # [S, N]
    own_count = counts[y]
    eligible = own_count >= 2
    own_loo = (sums[y] - features) / (own_count - 1).clamp_min(1).unsqueeze(1)
    distances[torch.arange(len(y)), y] = ((features - own_loo) ** 2).sum(dim=1)
    correct = distances.argmin(dim=1) == y
    per_class: dict[str, float | None] = {}
    for k, name in enumerate(classes):
        mask = (y == k) & eligible
        per_class[name] = float(correct[mask].double().mean()) if bool(mask.any()) else None
    accuracy = float(correct[eligible].double().mean()) if bool(eligible.any()) else None
    prototypes = F.normalize(sums / counts.unsqueeze(1), dim=1)
    similarity = prototypes @ prototypes.T
    rows, cols = torch.triu_indices(n, n, offset=1, device=similarity.device)
    values = similarity[rows, cols]
    order = torch.argsort(values, descending=True)[:top_pairs]
    pairs = [
        ConfusablePair(classes[int(rows[i])], classes[int(cols[i])], round(float(values[i]), 4))
        for i in order
    ]
    return SupportDiagnostics(
        leave_one_out_accuracy=accuracy,
        evaluated_images=int(eligible.sum()),
        per_class=per_class,
        confusable_pairs=pairs,
    )
