"""Adapting an initialization to a user's support set, and predicting with the result."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor

from fewshot.backbone import Conv4, shared_module
from fewshot.config import AdaptMode, ModelConfig
from fewshot.errors import CheckpointError, EpisodeError
from fewshot.head import head_logits
from fewshot.initialization import Initialization
from fewshot.inner import (
    HEAD_BIAS,
    HEAD_SCALE,
    HEAD_WEIGHT,
    InnerRecipe,
    adapt_params,
    effective_step_sizes,
    embed,
    embed_with_norms,
    predict_logits_batched,
    support_views,
)
from fewshot.plda import PLDA
from fewshot.plda import PREFIX as PLDA_PREFIX
from fewshot.stepchoice import chooses_steps, served_head_steps
from fewshot.unknown import (
    UNKNOWN_LABEL,
    UnknownCalibration,
    calibration_of,
    class_prototypes,
    familiarity,
    plda_of,
)

HEAD_PROTOTYPES = "head.prototypes"


@dataclass
class PredictionScores:
    """What predict_scores returns for B images of a task with N classes.

    probabilities [B, N] (columns in `labels` order, as predict_proba); score [B] the calibrated
    familiarity (a conformal p-value in [0, 1]; nan when the model is not calibrated); raw [B]
    the uncalibrated familiarity; known [B] score >= threshold; labels: the most probable label,
    or "unknown" where not known; threshold: the one applied; norms [B] the embeddings' norms
    before normalisation (fewshot.unknown's norm check).
    """

    probabilities: Tensor
    score: Tensor
    raw: Tensor
    known: Tensor
    labels: list[str]
    threshold: float
    # Pre-normalisation embedding norms [B] (the norm check's input), when they were computed.
    norms: Tensor | None = None


ADAPTED_FORMAT = "maml-serve/adapted-model/v1"
# Metadata "backbone" of a file that holds a head alone (its backbone is the initialization's).
BACKBONE_FROM_INITIALIZATION = "initialization"


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
    # Class means [N, D] of the support embeddings under the adapted backbone, the number of
    # support images per class, and the initialization's "unknown" calibration (may be None).
    prototypes: Tensor | None = None
    class_counts: list[int] | None = None
    unknown: UnknownCalibration | None = field(default=None)
    # True when the backbone tensors are the initialization's own (head mode): they are neither
    # saved with the model nor counted in its bytes.
    backbone_shared: bool = False
    # The initialization's PLDA model (ModelConfig.unknown_distance "plda"), shared, not owned.
    plda: PLDA | None = None

    @property
    def unknown_threshold(self) -> float | None:
        """The default threshold on the calibrated score, or None when not calibrated."""
        return None if self.unknown is None else self.unknown.threshold

    @property
    def nbytes(self) -> int:
        """Bytes this model holds beyond its initialization (for caches bounded in bytes)."""
        own = [t for name, t in self.params.items() if self._own(name)]
        if self.prototypes is not None:
            own.append(self.prototypes)
        return sum(t.numel() * t.element_size() for t in own)

    def _own(self, name: str) -> bool:
        return name.startswith("head.") or not self.backbone_shared

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

    @torch.no_grad()
    def predict_scores(self, x: Tensor, threshold: float | None = None) -> PredictionScores:
        """Probabilities [B, N], a calibrated familiarity score [B] and "unknown" below `threshold`.

        `threshold` (a p-value in [0, 1]) defaults to the initialization's calibrated default
        (keeps ~95% of genuine queries); 0 never answers "unknown". Uncalibrated models score
        nan and answer "unknown" only if a threshold > 0 is given. Each image is scored on its
        own: results never depend on the other images of the batch.
        """
        _check_images(x, self.config, "query")
        if threshold is not None and not (0.0 <= threshold <= 1.0):
            raise EpisodeError(f"threshold must be within [0, 1], got {threshold}")
        device = next(iter(self.params.values())).device
        module = shared_module(self.config)
        # Conv4 embeds multi-view images a few at a time (ACTIVATIONS_PER_PASS): memory stays bounded.
        features, norms = embed_with_norms(module, self.params, x.to(device))
        return self.scores_of_features(features, threshold, norms)

    @torch.no_grad()
    def scores_of_features(
        self, features: Tensor, threshold: float | None = None, norms: Tensor | None = None
    ) -> PredictionScores:
        """predict_scores from query embeddings [B, D] under this model's backbone and their
        pre-normalisation norms [B] (without them, no norm check)."""
        if threshold is not None and not (0.0 <= threshold <= 1.0):
            raise EpisodeError(f"threshold must be within [0, 1], got {threshold}")
        device = next(iter(self.params.values())).device
        features = features.to(device)
        out = head_logits(
            features, self.params[HEAD_WEIGHT], self.params[HEAD_BIAS], self.params[HEAD_SCALE]
        )
        probabilities = torch.softmax(out.float(), dim=1).cpu()
        prototypes = (
            self.prototypes if self.prototypes is not None else self.params[HEAD_WEIGHT] / 2
        )
        counts = torch.tensor(self.class_counts or [1] * len(self.labels))
        raw, nearest = familiarity(
            features,
            prototypes.to(features.dtype).to(device),
            counts.to(device),
            self.config.unknown_distance,
            self.plda,
        )
        raw, nearest = raw.cpu(), nearest.cpu()
        norms = None if norms is None else norms.float().cpu()
        if self.unknown is not None:
            score = self.unknown.p_values(raw, counts[nearest], len(self.labels), norms)
        else:
            score = torch.full_like(raw, float("nan"))
        applied = (self.unknown_threshold or 0.0) if threshold is None else threshold
        known = ~(score < applied) if applied > 0 else torch.ones_like(raw, dtype=torch.bool)
        best = probabilities.argmax(dim=1).tolist()
        labels = [
            self.labels[i] if ok else UNKNOWN_LABEL
            for i, ok in zip(best, known.tolist(), strict=True)
        ]
        return PredictionScores(probabilities, score, raw, known, labels, applied, norms)

    def save(
        self, path: str | Path, *, with_calibration: bool = True, with_backbone: bool = True
    ) -> Path:
        """Write one safetensors file (see `to_bytes`), atomically: a temporary file renamed."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(
            self.to_bytes(with_calibration=with_calibration, with_backbone=with_backbone)
        )
        tmp.replace(path)
        return path

    def to_bytes(self, *, with_calibration: bool = True, with_backbone: bool = True) -> bytes:
        """The safetensors file `save` writes; labels and settings go in its string metadata.

        What is the initialization's can stay out, for `load` to take from the initialization
        it is given: `with_calibration=False` leaves out the "unknown" calibration table;
        `with_backbone=False` the backbone when it is the initialization's unchanged (head mode:
        ~2 KB instead of ~450 KB for Conv4).
        """
        head_only = self.backbone_shared and not with_backbone
        metadata = {
            "format": ADAPTED_FORMAT,
            "model": json.dumps(self.config.to_dict()),
            "labels": json.dumps(self.labels),
            "mode": self.mode,
            "steps": str(self.steps),
            "support_accuracy": repr(self.support_accuracy),
            "initialization_version": self.initialization_version,
        }
        if self.class_counts is not None:
            metadata["class_counts"] = json.dumps(self.class_counts)
        if self.unknown is not None and with_calibration:
            metadata["unknown"] = json.dumps(self.unknown.to_dict())
        if head_only:
            metadata["backbone"] = BACKBONE_FROM_INITIALIZATION
        tensors = {
            k: v.detach().cpu().contiguous()
            for k, v in self.params.items()
            if k.startswith("head.") or not head_only
        }
        if self.prototypes is not None:
            tensors[HEAD_PROTOTYPES] = self.prototypes.detach().cpu().contiguous()
        if self.plda is not None and with_calibration:
            tensors.update(self.plda.to_tensors())
        return save(tensors, metadata=metadata)

    @classmethod
    def load(
        cls, path: str | Path, init: Initialization | None = None, device: str = "cpu"
    ) -> AdaptedModel:
        """Read a file written by `save` (safetensors only; never unpickles); `init` supplies
        what a file saved without it lacks (the calibration; the backbone of a head-only file)."""
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
        shared = meta.get("backbone") == BACKBONE_FROM_INITIALIZATION
        if shared:
            if init is None:
                raise CheckpointError(
                    f"{path} holds a head alone; load it with the initialization it was adapted from"
                )
            # The initialization's own tensors: one copy in memory for all of its head models.
            tensors.update(
                {k: v.to(device) for k, v in init.params.items() if not k.startswith("head.")}
            )
        expected = {name: tuple(p.shape) for name, p in Conv4(config).named_parameters()}
        expected[HEAD_SCALE] = ()
        expected[HEAD_WEIGHT] = (len(labels), config.feature_dim)
        expected[HEAD_BIAS] = (len(labels),)
        prototypes = tensors.pop(HEAD_PROTOTYPES, None)
        stored = {k: tensors.pop(k) for k in list(tensors) if k.startswith(PLDA_PREFIX)}
        try:
            plda = PLDA.from_tensors(stored)
            if plda is None and init is not None:
                plda = plda_of(init)
            counts = json.loads(meta["class_counts"]) if "class_counts" in meta else None
            unknown: UnknownCalibration | None
            if "unknown" in meta:
                unknown = UnknownCalibration.from_dict(json.loads(meta["unknown"]))
            else:
                unknown = calibration_of(init) if init is not None else None
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"{path}: unreadable class counts or calibration ({exc})"
            ) from exc
        if {name: tuple(t.shape) for name, t in tensors.items()} != expected:
            raise CheckpointError(
                f"{path}: tensor names or shapes do not match its config and {len(labels)} labels"
            )
        if prototypes is not None and tuple(prototypes.shape) != expected[HEAD_WEIGHT]:
            raise CheckpointError(f"{path}: prototypes do not match {len(labels)} labels")
        return cls(
            config=config,
            params=tensors,
            labels=labels,
            mode="head" if meta.get("mode") == "head" else "full",
            steps=int(meta.get("steps", "0")),
            support_accuracy=float(meta.get("support_accuracy", "nan")),
            initialization_version=str(meta.get("initialization_version", "unversioned")),
            prototypes=prototypes,
            class_counts=[int(c) for c in counts] if isinstance(counts, list) else None,
            unknown=unknown,
            backbone_shared=shared,
            plda=plda,
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


def shares_backbone(params: dict[str, Tensor], init: Initialization) -> bool:
    """True when every backbone tensor in `params` is a view of the initialization's own memory
    (head mode, or no steps): the backbone is the initialization's, unchanged."""
    return all(
        _same_memory(params.get(name), value)
        for name, value in init.params.items()
        if not name.startswith("head.")
    )


def _same_memory(x: Tensor | None, y: Tensor) -> bool:
    return x is y or (
        x is not None
        and x.data_ptr() == y.data_ptr()
        and x.shape == y.shape
        and x.stride() == y.stride()
        and x.dtype == y.dtype
        and x.device == y.device
    )


def open_set_fields(
    init: Initialization, params: dict[str, Tensor], support_x: Tensor, y: Tensor, n_way: int
) -> dict[str, Any]:
    """The AdaptedModel fields predict_scores needs: prototypes [N, D], class_counts, unknown.

    params: adapted parameters; support_x: [S, C, H, W]; y: [S] in 0..N-1. For other adaptation
    paths (e.g. batched serving): `AdaptedModel(..., **open_set_fields(init, params, x, y, n))`.
    """
    with torch.no_grad():
        features = embed(shared_module(init.config), params, support_x)
        return {
            "prototypes": class_prototypes(features, y, n_way),
            "class_counts": torch.bincount(y, minlength=n_way).tolist(),
            "unknown": calibration_of(init),
            "backbone_shared": shares_backbone(params, init),
            "plda": plda_of(init),
        }


def check_adapt_args(
    init: Initialization,
    support_x: Tensor,
    labels: Sequence[str],
    mode: str,
    steps: int | None,
    device: str | torch.device | None,
) -> tuple[int, list[str], Tensor, torch.device]:
    """Validate adapt()'s arguments; returns (steps, classes, targets [S], device)."""
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
    return steps, classes, y, target


def adapt(
    init: Initialization,
    support_x: Tensor,
    labels: Sequence[str],
    *,
    mode: AdaptMode | None = None,
    steps: int | None = None,
    step_size: float | None = None,
    device: str | torch.device | None = None,
) -> AdaptedModel:
    """Adapt `init` to a support set: images [S, C, H, W] with one string label each.

    Any number of ways (>= 2) and any, even unequal, number of shots per class. `mode` "full"
    adapts every layer (MAML); "head" adapts only the prototype-initialised head (ANIL);
    default: the initialization's config.default_mode.
    `steps` defaults to the initialization's; `step_size` overrides the learned step sizes.
    Deterministic: the same inputs give the same weights.

    Example:
        >>> init = Initialization.load(shipped_initialization_path())
        >>> model = adapt(init, preprocess_images(images, init.config), ["a", "b", "c"])
        >>> model.predict_proba(preprocess_images(queries, init.config))
    """
    mode = init.config.default_mode if mode is None else mode
    chosen = chooses_steps(init, mode, steps)
    steps, classes, y, target = check_adapt_args(init, support_x, labels, mode, steps, device)
    meta = {k: v.to(target) for k, v in init.params.items()}
    sizes = {} if step_size is not None else {k: v.to(target) for k, v in init.step_sizes.items()}
    default = init.config.inner_step_size if step_size is None else step_size
    x, y = support_x.to(target), y.to(target)
    module = shared_module(init.config)
    recipe = InnerRecipe.from_config(init.config)
    if chosen:
        effective = effective_step_sizes(sizes, recipe.transform)
        floats = {k: [float(v) for v in t.reshape(-1).tolist()] for k, t in effective.items()}
        shift = init.config.inner_shift_views
        with torch.no_grad():
            features = embed(module, meta, x)
            views = None
            if init.config.support_fit_guard and shift > 0:
                views = embed(module, meta, support_views(x, y, shift)[0])
        steps = served_head_steps(
            init.config, features, views, y, len(classes), meta[HEAD_SCALE], floats, default
        )
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
        recipe=recipe,
    )
    with torch.no_grad():
        accuracy = (
            (predict_logits_batched(module, fast, x).argmax(dim=1) == y).float().mean().item()
        )
        extra = open_set_fields(init, fast, x, y, len(classes))
    return AdaptedModel(
        config=init.config,
        params=fast,
        labels=classes,
        mode=mode,
        steps=steps,
        support_accuracy=accuracy,
        initialization_version=init.version,
        **extra,
    )
