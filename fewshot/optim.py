"""Adam with a cosine-annealed learning rate, its state kept as plain tensors for safetensors."""

from __future__ import annotations

import math

import torch
from torch import Tensor


class Adam:
    """Adam (Kingma and Ba 2015) over a dict of tensors; state is two dicts of tensors and a count."""

    def __init__(
        self,
        params: dict[str, Tensor],
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        lr_scales: dict[str, float] | None = None,
    ):
        self.params = params
        # Per-tensor multipliers of the learning rate (e.g. faster for learned step sizes).
        self.lr_scales = dict(lr_scales or {})
        self.betas = betas
        self.eps = eps
        self.step_count = 0
        self.exp_avg = {k: torch.zeros_like(v) for k, v in params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(v) for k, v in params.items()}

    @torch.no_grad()
    def step(self, lr: float, max_norm: float | None = None) -> bool:
        """Apply one update from the .grad fields; skip it (returning False) if any is not finite.

        With `max_norm`, gradients are first rescaled to that global L2 norm at most.
        """
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        if not bool(torch.isfinite(norm)):
            for p in self.params.values():
                p.grad = None
            return False
        if max_norm is not None and float(norm) > max_norm:
            for g in grads:
                g.mul_(max_norm / float(norm))
        self.step_count += 1
        beta1, beta2 = self.betas
        correction1 = 1 - beta1**self.step_count
        correction2 = 1 - beta2**self.step_count
        for name, p in self.params.items():
            if p.grad is None:
                continue
            m, v = self.exp_avg[name], self.exp_avg_sq[name]
            m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (v / correction2).sqrt_().add_(self.eps)
            p.addcdiv_(m, denom, value=-lr * self.lr_scales.get(name, 1.0) / correction1)
            p.grad = None
        return True

    def state_tensors(self) -> dict[str, Tensor]:
        """State as a flat dict for safetensors."""
        out = {f"adam.m.{k}": v for k, v in self.exp_avg.items()}
        out.update({f"adam.v.{k}": v for k, v in self.exp_avg_sq.items()})
        return out

    def load_state_tensors(self, tensors: dict[str, Tensor], step_count: int) -> None:
        """Restore state written by state_tensors."""
        for k in self.params:
            self.exp_avg[k].copy_(tensors[f"adam.m.{k}"])
            self.exp_avg_sq[k].copy_(tensors[f"adam.v.{k}"])
        self.step_count = step_count


def cosine_lr(base: float, minimum: float, progress: float) -> float:
    """Cosine annealing from `base` to `minimum` as progress goes 0 -> 1 (Loshchilov and Hutter 2017)."""
    progress = min(max(progress, 0.0), 1.0)
    return minimum + 0.5 * (base - minimum) * (1 + math.cos(math.pi * progress))
