"""Adapting an initialization to a user's support set, and predicting with the result."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from fewshot.backbone import Conv4, shared_module
from fewshot.config import AdaptMode, ModelConfig
from fewshot.errors import CheckpointError, EpisodeError
from fewshot.initialization import Initialization
from fewshot.inner import (
    HEAD_BIAS,
    HEAD_SCALE,
    HEAD_WEIGHT,
    InnerRecipe,
    adapt_params,
    predict_logits_batched,
)

ADAPTED_FORMAT = "maml-serve/adapted-model/v1"


@dataclass
class AdaptedModel:
    """An initialization after the inner loop on one task: backbone, head and its class labels."""

    config: ModelConfig
    params: dict[str, Tensor]
    labels: list[str]
    mode: AdaptMode
    steps: int
    support_accuracy: float
    initialization_version: str = "unversioned"

    @property
    def nbytes(self) -> int:
        """Bytes held by the parameter tensors (for caches bounded in bytes)."""
        return sum(t.numel() * t.element_size() for t in self.params.values())

    @torch.no_grad()
    def predict_proba(self, x: Tensor) -> Tensor:
        """Class probabilities [B, N] for images [B, C, H, W], columns in `labels` order."""
        _check_images(x, self.config, "query")
        device = next(iter(self.params.values())).device
        out = predict_logits_batched(shared_module(self.config), self.params, x.to(device))
        return torch.softmax(out.float(), dim=1).cpu()

    def predict(self, x: Tensor) -> list[str]:
        """The most probable label for each image."""
        return [self.labels[i] for i in self.predict_proba(x).argmax(dim=1).tolist()]

    def save(self, path: str | Path) -> Path:
        """Write one safetensors file; labels and settings go in its string metadata."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {
            "format": ADAPTED_FORMAT,
            "model": json.dumps(self.config.to_dict()),
            "labels": json.dumps(self.labels),
            "mode": self.mode,
            "steps": str(self.steps),
            "support_accuracy": repr(self.support_accuracy),
            "initialization_version": self.initialization_version,
        }
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.params.items()}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.replace(path)
        return path

    @classmethod
    def load(
        cls, path: str | Path, init: Initialization | None = None, device: str = "cpu"
    ) -> AdaptedModel:
        """Read a file written by `save` (safetensors only; never unpickles)."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                meta: dict[str, Any] = handle.metadata() or {}
            tensors = load_file(str(path), device=device)
        except (OSError, SafetensorError) as exc:
            raise CheckpointError(f"cannot read adapted model {path}: {exc}") from exc
        if meta.get("format") != ADAPTED_FORMAT:
            raise CheckpointError(f"{path}: not an adapted model file")
        try:
            if init is not None:
                config = init.config
            else:
                config = ModelConfig.from_dict(json.loads(meta["model"]))
            labels = [str(label) for label in json.loads(meta["labels"])]
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: unreadable model config or labels ({exc})") from exc
        expected = {name: tuple(p.shape) for name, p in Conv4(config).named_parameters()}
        expected[HEAD_SCALE] = ()
        expected[HEAD_WEIGHT] = (len(labels), config.feature_dim)
        expected[HEAD_BIAS] = (len(labels),)
        if {name: tuple(t.shape) for name, t in tensors.items()} != expected:
            raise CheckpointError(
                f"{path}: tensor names or shapes do not match its config and {len(labels)} labels"
            )
        return cls(
            config=config,
            params=tensors,
            labels=labels,
            mode="head" if meta.get("mode") == "head" else "full",
            steps=int(meta.get("steps", "0")),
            support_accuracy=float(meta.get("support_accuracy", "nan")),
            initialization_version=str(meta.get("initialization_version", "unversioned")),
        )


def _check_images(x: Tensor, config: ModelConfig, what: str) -> None:
    expected = (config.in_channels, config.image_size, config.image_size)
    if x.dim() != 4 or tuple(x.shape[1:]) != expected:
        raise EpisodeError(
            f"{what} images must have shape [B, {', '.join(map(str, expected))}], got {list(x.shape)}"
        )
    if x.shape[0] == 0:
        raise EpisodeError(f"{what} set is empty")


def encode_labels(labels: Sequence[str]) -> tuple[list[str], Tensor]:
    """Distinct labels in order of first appearance and the index [S] of each example."""
    classes: dict[str, int] = {}
    for position, label in enumerate(labels):
        if not isinstance(label, str) or not label.strip():
            raise EpisodeError(
                f"label {position} is empty; every support image needs a non-empty label"
            )
        classes.setdefault(label, len(classes))
    if len(classes) < 2:
        raise EpisodeError(f"a task needs at least 2 distinct labels, got {len(classes)}")
    return list(classes), torch.tensor([classes[label] for label in labels], dtype=torch.long)


def adapt(
    init: Initialization,
    support_x: Tensor,
    labels: Sequence[str],
    *,
    mode: AdaptMode = "full",
    steps: int | None = None,
    step_size: float | None = None,
    device: str | torch.device | None = None,
) -> AdaptedModel:
    """Adapt `init` to a support set: images [S, C, H, W] with one string label each.

    Any number of ways (>= 2) and any, even unequal, number of shots per class. `mode` "full"
    adapts every layer (MAML); "head" adapts only the prototype-initialised head (ANIL).
    `steps` defaults to the initialization's; `step_size` overrides the learned step sizes.
    Deterministic: the same inputs give the same weights.

    Example:
        >>> init = Initialization.load(shipped_initialization_path())
        >>> model = adapt(init, preprocess_images(images, init.config), ["a", "b", "c"])
        >>> model.predict_proba(preprocess_images(queries, init.config))
    """
    if mode not in ("full", "head"):
        raise EpisodeError(f"mode must be 'full' or 'head', got {mode!r}")
    _check_images(support_x, init.config, "support")
    if len(labels) != support_x.shape[0]:
        raise EpisodeError(
            f"{support_x.shape[0]} support images but {len(labels)} labels; give one label per image"
        )
    steps = init.config.inner_steps if steps is None else steps
    if steps < 0:
        raise EpisodeError(f"steps must be >= 0, got {steps}")
    classes, y = encode_labels(labels)
    target = (
        torch.device(device) if device is not None else init.params[next(iter(init.params))].device
    )
    meta = {k: v.to(target) for k, v in init.params.items()}
    sizes = {} if step_size is not None else {k: v.to(target) for k, v in init.step_sizes.items()}
    default = init.config.inner_step_size if step_size is None else step_size
    x, y = support_x.to(target), y.to(target)
    module = shared_module(init.config)
    fast = adapt_params(
        module,
        meta,
        sizes,
        x,
        y,
        len(classes),
        steps=steps,
        default_step_size=default,
        mode=mode,
        differentiable=False,
        recipe=InnerRecipe.from_config(init.config),
    )
    with torch.no_grad():
        accuracy = (
            (predict_logits_batched(module, fast, x).argmax(dim=1) == y).float().mean().item()
        )
    return AdaptedModel(
        config=init.config,
        params=fast,
        labels=classes,
        mode=mode,
        steps=steps,
        support_accuracy=accuracy,
        initialization_version=init.version,
    )
