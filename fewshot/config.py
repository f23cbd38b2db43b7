"""Configuration dataclasses for the backbone and the inner loop."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

Pooling = Literal["stride", "maxpool"]
Norm = Literal["group", "none", "batch"]
AdaptMode = Literal["full", "head"]
StepSizeTransform = Literal["identity", "softplus"]
Readout = Literal["mean", "flatten"]
FeatureNorm = Literal["none", "l2"]
Resize = Literal["stretch", "center_crop"]
UnknownDistance = Literal["relative", "absolute", "plda"]


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and preprocessing of an initialization (Conv4 of Finn et al. 2017, sec. 5.2)."""

    # What the initialization knows, shown to users choosing one (e.g. "photos").
    domain: str = "handwritten characters"
    in_channels: int = 1
    image_size: int = 28
    # How a non-square image fits the square input (fewshot.images.to_array).
    resize: Resize = "stretch"
    width: int = 64
    depth: int = 4
    # "stride": 3x3 convolutions with stride 2 (MAML's Omniglot variant, ~3.7x fewer FLOPs);
    # "maxpool": stride 1 followed by 2x2 max-pooling (MAML's MiniImagenet variant).
    pooling: Pooling = "stride"
    # GroupNorm is per image, so a query's prediction never depends on its batch.
    # "batch": BatchNorm for supervised pre-training only; fold_batch_norm turns its frozen
    # statistics into the convolutions (norm "none"), so serving stays per image.
    norm: Norm = "group"
    norm_groups: int = 1
    # Omniglot strokes are dark on white; inverting makes strokes 1 and background 0.
    invert: bool = True
    inner_steps: int = 5
    inner_step_size: float = 0.1
    # The inner loop's support loss (defaults reproduce v1/v2, whose support loss is ~0):
    # logits are multiplied by `inner_temperature` in the support loss only (< 1 keeps the loss
    # and its gradients away from zero under the prototype head), cross-entropy with
    # `inner_label_smoothing`, over the support images plus, with `inner_shift_views` = s > 0,
    # four copies shifted by s pixels (up, down, left, right; zero fill).
    inner_temperature: float = 1.0
    inner_label_smoothing: float = 0.0
    inner_shift_views: int = 0
    # The support loss summed over classes (cross-entropy mean times N ways): each class's head
    # row then moves as far in a 5-way task as in a 20-way one for the same step size.
    inner_loss_per_class: bool = False
    # < 1 (needs inner_shift_views): head mode starts a task's head as a linear discriminant
    # whose within-class covariance, shrunk toward the identity by this weight, is the scatter
    # of the support's shifted views (fewshot.nuisance): directions a shift moves count less.
    # 1: the prototype head. (omniglot-conv4-v6: 0.6 on 4-px views, +1.9 points over the
    # prototypes within one alphabet at 20-way 1-shot, +0.9 across alphabets.)
    nuisance_shrinkage: float = 1.0
    # "softplus": stored step sizes are raw values and the inner loop uses softplus(raw) > 0.
    step_size_transform: StepSizeTransform = "identity"
    # How the last feature map [width, s, s] becomes the embedding: "mean" over space (MAML's
    # Omniglot net) or "flatten" (ProtoNet's 1600-d read-out; keeps where a part was seen).
    readout: Readout = "mean"
    # Cosine read-outs work better without the last ReLU (Gidaris & Komodakis 2018): features
    # may then point anywhere, not only into the positive orthant.
    final_relu: bool = True
    # "l2": embeddings are unit vectors, so the prototype head's squared distances are cosines.
    feature_norm: FeatureNorm = "none"
    # Embed each image as the mean of its and its mirror image's embeddings (photos: a flipped
    # photo shows the same thing; +0.9-1.4 points on mini-ImageNet val prototypes; 2x compute).
    mirror_average: bool = False
    # > 0: also embed five crops of each image (centre and corners, this fraction of its side,
    # resized back) and average them in (with mirror_average, their mirror images too): the
    # crops a photo model saw in training, so its embedding depends less on framing (+1.2 points
    # at 5-way 1-shot, +0.8 at 5-shot on mini-ImageNet val; 6x the trunk's compute).
    crop_views: float = 0.0
    # > 0: also embed copies of each image shifted by up to this many pixels in each direction
    # (every offset in [-r, r]^2, zero fill) and average them in: a handwritten character's
    # embedding then depends less on where its strokes fall on the grid (r = 1, 9 views: +1.1
    # points at 20-way 1-shot, +1.7 within one alphabet on Omniglot's held-out alphabets).
    view_shift: int = 0
    # The adaptation a task gets when it names none ("full": every layer; "head": ANIL).
    default_mode: AdaptMode = "full"
    # Head steps chosen per task on held-out folds of its support set (fewshot.stepchoice) from
    # these counts, 0 included, when a task names no steps; empty: config.inner_steps.
    step_candidates: tuple[int, ...] = ()
    # With step_candidates: the head steps of a task where some class has a single example, so
    # nothing can be held out to choose by (0: the prototype read-out).
    single_example_steps: int = 0
    # With step_candidates: a task where some class has fewer examples than this keeps 0 steps
    # (held-out folds of a few shots choose worse than the prototypes: photos at 5 shots).
    steps_min_shots: int = 0
    # Head mode: a task whose served steps would misclassify a support image that the prototype
    # read-out classifies right keeps 0 steps (adaptation never makes the support fit worse; e.g.
    # shifted views of textures that are not characters pull the head off its classes).
    support_fit_guard: bool = False
    # The "unknown" score's distance to the nearest prototype (fewshot.unknown.raw_scores):
    # "relative" divides it by the task's mean distance between prototypes; "absolute" does not,
    # so tasks of alike classes (one alphabet) keep their calibrated share of genuine queries;
    # "plda" scores by fewshot.plda's likelihood ratio (the initialization stores its model).
    unknown_distance: UnknownDistance = "relative"

    @property
    def final_side(self) -> int:
        """Side of the last feature map: each block halves it, rounding up."""
        side = self.image_size
        for _ in range(self.depth):
            side = (side + 1) // 2
        return side

    @property
    def feature_dim(self) -> int:
        """Length of the embedding the head sees."""
        if self.readout == "flatten":
            return self.width * self.final_side * self.final_side
        return self.width

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a dict, ignoring unknown keys written by newer versions."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        if "step_candidates" in kwargs:
            kwargs["step_candidates"] = tuple(int(s) for s in kwargs["step_candidates"])
        return cls(**kwargs)


@dataclass
class MetaTrainConfig:
    """Settings of one meta-training run (MAML, Finn et al. 2017; MAML++, Antoniou et al. 2019)."""

    iterations: int = 10_000
    meta_batch: int = 16
    # Each meta-iteration draws one (ways, shots) pair so that its tasks stack under vmap.
    ways: tuple[int, int] = (5, 20)
    shots: tuple[int, int] = (1, 5)
    queries: int = 5
    inner_steps: int = 5
    inner_step_size: float = 0.1
    learn_step_sizes: bool = True
    # The inner loop's support-loss recipe (see ModelConfig); None keeps the start's (or the
    # model field's, from scratch).
    inner_temperature: float | None = None
    inner_label_smoothing: float | None = None
    inner_shift_views: int | None = None
    step_size_transform: StepSizeTransform | None = None
    # Start the learned step sizes afresh at `inner_step_size` instead of the start's.
    reset_step_sizes: bool = False
    # With reset_step_sizes: the head's starting step size (None: inner_step_size).
    head_step_size: float | None = None
    # The learned step sizes' outer learning rate is outer_lr times this (their raw values under
    # softplus move in log space, slowly at the parameters' rate).
    step_size_lr_factor: float = 1.0
    # Fraction of iterations run first-order before switching to second order (1.0: first order only).
    first_order_fraction: float = 0.5
    second_order: bool = True
    multi_step_loss: bool = False
    adapt_mode: AdaptMode = "full"
    outer_lr: float = 1e-3
    cosine_annealing: bool = True
    min_outer_lr: float = 1e-5
    rotations: bool = True
    # Random translation of meta-training images by up to this many pixels (0: off).
    shift: int = 0
    # Share of meta-iterations whose tasks draw all classes from one group (alphabet): harder tasks,
    # like Lake et al. 2015's within-alphabet runs, where cross-alphabet tasks become too easy.
    within_group_fraction: float = 0.0
    seed: int = 0
    val_every: int = 500
    val_episodes: int = 200
    # Tasks per (ways, shots) to calibrate the "unknown" score on the validation groups at the
    # end of the run (fewshot.unknown; 0: not calibrated).
    unknown_calibration_episodes: int = 40
    checkpoint_every_s: float = 120.0
    max_seconds: float | None = None
    model: ModelConfig = field(default_factory=ModelConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MetaTrainConfig:
        """Build from a dict written by to_dict."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        if "model" in kwargs and isinstance(kwargs["model"], dict):
            kwargs["model"] = ModelConfig.from_dict(kwargs["model"])
        for key in ("ways", "shots"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)
