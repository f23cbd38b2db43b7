"""Bodies of the admin API (datasets, meta-training runs, promotion) and of re-adaptation."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.core.schemas import DATASET_ID, JOB_ID, CleanText, ErrorInfo

_RUN: dict[str, Any] = {
    "id": JOB_ID,
    "state": "running",
    "dataset_id": DATASET_ID,
    "dataset_name": "omniglot-background",
    "start": "scratch",
    "settings": {"algorithm": {"iterations": 10000, "meta_batch": 16}, "log_every": 25},
    "progress": {
        "stage": "training",
        "fraction": 0.25,
        "iteration": 2500,
        "total": 10000,
        "elapsed_seconds": 912.4,
        "eta_seconds": 2737.2,
        "checkpoint_iteration": 2400,
        "resumes": [],
    },
    "curve": [
        {"iteration": 25, "loss": 1.52, "train_accuracy": 0.41, "elapsed_s": 9.1},
        {
            "iteration": 2500,
            "loss": 0.38,
            "train_accuracy": 0.88,
            "elapsed_s": 912.4,
            "val_5w1s": 0.93,
            "val_20w1s": 0.81,
        },
    ],
    "attempts": 1,
    "error": None,
    "result": None,
    "cancel_requested_at": None,
    "created_at": "2026-11-29T20:53:50Z",
    "started_at": "2026-11-29T20:53:51Z",
    "finished_at": None,
    "links": {
        "self": f"/v1/admin/meta-trainings/{JOB_ID}",
        "curve": f"/v1/admin/meta-trainings/{JOB_ID}/curve.png",
        "cancel": f"/v1/admin/meta-trainings/{JOB_ID}/cancel",
    },
}


class AlgorithmIn(BaseModel):
    """MAML / MAML++ settings of a run (defaults: fewshot's MetaTrainConfig)."""

    model_config = ConfigDict(extra="forbid")

    order: Literal["second", "first"] = Field(
        default="second", description="Meta-gradient order; 'second' runs first order early."
    )
    first_order_fraction: float = Field(default=0.5, ge=0, le=1)
    inner_steps: int = Field(default=5, ge=1, le=20)
    inner_step_size: float = Field(default=0.1, gt=0, le=10)
    learn_step_sizes: bool = Field(default=True, description="MAML++ LSLR.")
    multi_step_loss: bool = False
    adapt_mode: Literal["full", "head"] = "full"
    meta_batch: int = Field(default=16, ge=1, le=256)
    iterations: int = Field(default=10_000, ge=1, le=1_000_000)
    ways: tuple[int, int] = Field(default=(5, 20), description="Inclusive range of ways.")
    shots: tuple[int, int] = Field(default=(1, 5), description="Inclusive range of shots.")
    queries: int = Field(default=5, ge=1, le=50)
    outer_lr: float = Field(default=1e-3, gt=0, le=1)
    cosine_annealing: bool = True
    rotations: bool = Field(default=True, description="90-degree rotations as new classes.")
    shift: int = Field(default=0, ge=0, le=8, description="Random translation in pixels.")
    within_group_fraction: float = Field(
        default=0.0, ge=0, le=1, description="Share of meta-batches drawn from one group each."
    )
    seed: int = 0

    @model_validator(mode="after")
    def _ranges(self) -> AlgorithmIn:
        if not 2 <= self.ways[0] <= self.ways[1] <= 100:
            raise ValueError("ways must be [low, high] with 2 <= low <= high <= 100")
        if not 1 <= self.shots[0] <= self.shots[1] <= 50:
            raise ValueError("shots must be [low, high] with 1 <= low <= high <= 50")
        return self


class ModelIn(BaseModel):
    """Backbone of a run from scratch (a run from a version keeps that version's backbone)."""

    model_config = ConfigDict(extra="forbid")

    in_channels: Literal[1, 3] = 1
    image_size: int = Field(default=28, ge=8, le=224)
    width: int = Field(default=64, ge=4, le=512)
    pooling: Literal["stride", "maxpool"] = "stride"
    norm_groups: int = Field(default=1, ge=1)
    invert: bool = True


class MetaTrainingCreate(BaseModel):
    """Start a meta-training run on a dataset."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "dataset_id": DATASET_ID,
                    "start": "scratch",
                    "algorithm": {"iterations": 10000, "meta_batch": 16, "ways": [5, 20]},
                    "validate_every": 500,
                    "auto_promote": False,
                }
            ]
        },
    )

    dataset_id: uuid.UUID
    start: CleanText = Field(
        default="scratch", description="'scratch', or the initialization version to start from."
    )
    algorithm: AlgorithmIn = Field(default_factory=AlgorithmIn)
    model: ModelIn | None = None
    validation_split: float = Field(
        default=0.2,
        gt=0,
        lt=1,
        description="Ignored (kept for old clients): a run validates on the dataset's validation "
        "groups, fixed when the dataset was registered.",
    )
    validation_episodes: int = Field(
        default=200,
        ge=2,
        le=10_000,
        description="Episodes per task shape in the final scoring; at least 400 with auto_promote.",
    )
    validate_every: int = Field(default=500, ge=0, description="Iterations; 0: only at the end.")
    log_every: int = Field(
        default=25, ge=1, description="Iterations between progress reports and cancel checks."
    )
    checkpoint_every_s: float = Field(default=120.0, gt=0)
    max_seconds: float | None = Field(default=None, gt=0)
    auto_promote: bool = Field(
        default=False,
        description="Promote at the end only if, on the same seeded episodes (at least 400 per "
        "shape) of the validation groups, no required shape (5w1s, 20w1s; 5w5s, 20w5s when the "
        "classes have 10 images) is worse than the current default beyond the margin, every "
        "required shape could be drawn, and neither version trained on a validation group.",
    )


class TrainingProgress(BaseModel):
    """Where a run stands."""

    stage: str | None = None
    fraction: float
    iteration: int | None = None
    total: int | None = None
    elapsed_seconds: float | None = None
    eta_seconds: float | None = None
    checkpoint_iteration: int | None = None
    resumes: list[dict[str, Any]] = Field(default_factory=list)


class MetaTrainingPublic(BaseModel):
    """A meta-training run: its state, progress, curve so far and result."""

    model_config = ConfigDict(json_schema_extra={"examples": [_RUN]})

    id: uuid.UUID
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    dataset_id: uuid.UUID | None = Field(description="Null once the dataset is deleted.")
    dataset_name: str | None = Field(default=None, description="Kept after a dataset delete.")
    start: str
    settings: dict[str, Any]
    progress: TrainingProgress
    curve: list[dict[str, Any]] = Field(
        description="Points: iteration, loss, train_accuracy, val_5w1s / val_20w1s when validated."
    )
    attempts: int
    error: ErrorInfo | None
    result: dict[str, Any] | None
    cancel_requested_at: datetime | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    links: dict[str, str]


class MetaTrainingList(BaseModel):
    """Meta-training runs, newest first."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"items": [_RUN]}]})

    items: list[MetaTrainingPublic]
