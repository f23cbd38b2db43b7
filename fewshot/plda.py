"""Probabilistic LDA for "is this query one of the task's classes?" (the "unknown" score).

The two-covariance model (Ioffe 2006; Prince and Elder 2007; Sizov et al. 2014): an embedding
x [D], centred and projected to d dimensions, is z = y + e with a class variable y ~ N(0, B)
shared by the class's images and e ~ N(0, W) drawn per image. B and W are estimated once on the
training classes (between and within classes), then diagonalised together: in the stored basis
W = I and B = diag(psi). A task's class with n support images of mean m then predicts a new
image of that class as N(n psi / (1 + n psi) * m, 1 + psi / (1 + n psi)), and an image of any
class as N(0, 1 + psi); the log-likelihood ratio of the two is the score. Unlike a distance to
the nearest prototype it discounts the directions in which drawings of one character vary (W)
and rewards agreement in the directions in which characters differ (B), and it knows that one
support image pins a class down less than five.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Tensor names in an initialization's or adapted model's safetensors file.
PREFIX = "unknown.plda."
# Floor on the between-class eigenvalues relative to the largest (B's estimate is a difference
# of two covariances and can dip below zero in directions where classes barely differ).
_PSI_FLOOR = 1e-6


@dataclass(frozen=True)
class PLDA:
    """mean [D], projection [D, d] (to the basis where W = I and B = diag(psi)), psi [d]."""

    mean: Tensor
    projection: Tensor
    psi: Tensor

    @property
    def dim(self) -> int:
        """d, the dimension of the projected embedding."""
        return int(self.psi.shape[0])

    def to(self, device: str | torch.device) -> PLDA:
        """This model with its tensors on `device` (itself when they are there already)."""
        if self.mean.device == torch.device(device):
            return self
        return PLDA(self.mean.to(device), self.projection.to(device), self.psi.to(device))

    def project(self, features: Tensor) -> Tensor:
        """Embeddings [B, D] -> [B, d] in the diagonal basis (affine: class means map to means)."""
        return (features.double() - self.mean) @ self.projection

    def scores(self, features: Tensor, prototypes: Tensor, counts: Tensor) -> Tensor:
        """Log-likelihood ratios [B, N]: query [B, D] of class k (mean prototypes[k] [D] of
        counts[k] support images) against of no class in particular."""
        z = self.project(features)  # [B, d]
        m = self.project(prototypes)  # [N, d]
        n = counts.to(m).clamp_min(1.0).unsqueeze(1)  # [N, 1]
        psi = self.psi.unsqueeze(0)  # [1, d]
        shrink = n * psi / (1.0 + n * psi)  # [N, d]
        variance = 1.0 + psi / (1.0 + n * psi)  # [N, d]
        marginal = 1.0 + self.psi  # [d]
        centred = z.unsqueeze(1) - (shrink * m).unsqueeze(0)  # [B, N, d]
        same = -0.5 * (centred.square() / variance + variance.log()).sum(-1)
        other = -0.5 * (z.square() / marginal + marginal.log()).sum(-1, keepdim=True)
        return (same - other).float()

    def to_tensors(self) -> dict[str, Tensor]:
        """The tensors to store beside the weights, named with PREFIX."""
        return {
            PREFIX + "mean": self.mean.float().contiguous(),
            PREFIX + "projection": self.projection.float().contiguous(),
            PREFIX + "psi": self.psi.float().contiguous(),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> PLDA | None:
        """The model stored by to_tensors, or None when `tensors` hold none; checks shapes."""
        names = [PREFIX + part for part in ("mean", "projection", "psi")]
        if not any(name in tensors for name in names):
            return None
        try:
            mean, projection, psi = (tensors[name].double() for name in names)
        except KeyError as exc:
            raise ValueError(f"incomplete PLDA tensors: {exc.args[0]} missing") from exc
        if (
            mean.dim() != 1
            or psi.dim() != 1
            or tuple(projection.shape) != (mean.shape[0], psi.shape[0])
        ):
            raise ValueError(
                "PLDA tensor shapes do not fit: mean [D], projection [D, d], psi [d] expected, got "
                f"{list(mean.shape)}, {list(projection.shape)}, {list(psi.shape)}"
            )
        return cls(mean=mean, projection=projection, psi=psi)


def fit_plda(features: Tensor, targets: Tensor, dim: int) -> PLDA:
    """Fit the two-covariance model on training embeddings [n, D] with class indices [n].

    Principal components first (d = `dim` <= D), where the within-class covariance is well
    estimated; every class needs >= 2 images.
    """
    x = features.double()
    classes, inverse, counts = torch.unique(targets, return_inverse=True, return_counts=True)
    if len(classes) < 2 or bool((counts < 2).any()):
        raise ValueError("PLDA needs >= 2 classes with >= 2 images each")
    if not 1 <= dim <= x.shape[1]:
        raise ValueError(f"dim must be within 1..{x.shape[1]}, got {dim}")
    mean = x.mean(dim=0)
    _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
    pca = vh[:dim].T  # [D, d]
    z = (x - mean) @ pca
    onehot = torch.nn.functional.one_hot(inverse, len(classes)).to(z)
    class_means = (onehot.T @ z) / counts.to(z).unsqueeze(1)
    residual = z - class_means[inverse]
    within = residual.T @ residual / (len(z) - len(classes))
    between = torch.cov(class_means.T) - within / counts.to(z).mean()
    # Whiten W, then diagonalise B in that basis: W = I, B = diag(psi).
    w_values, w_vectors = torch.linalg.eigh(within)
    whiten = w_vectors @ torch.diag(w_values.clamp_min(1e-12).rsqrt()) @ w_vectors.T
    psi, rotation = torch.linalg.eigh(whiten @ between @ whiten)
    psi = psi.clamp_min(_PSI_FLOOR * float(psi.max().clamp_min(1e-12)))
    return PLDA(mean=mean, projection=pca @ whiten @ rotation, psi=psi)
