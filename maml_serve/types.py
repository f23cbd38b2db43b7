"""Typed views of the API's JSON bodies; each keeps the whole body in `raw`."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


def _time(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else None


def _error(value: Any) -> tuple[str | None, str | None]:
    if isinstance(value, dict):
        return value.get("code"), value.get("message")
    return None, None


@dataclass(frozen=True)
class AdaptedModel:
    """The weights a task predicts with, and what made them."""

    id: str
    initialization_version: str
    mode: str
    steps: int
    support_accuracy: float
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> AdaptedModel:
        """Parse an adapted-model object."""
        return cls(
            id=str(body["id"]),
            initialization_version=str(body["initialization_version"]),
            mode=str(body["mode"]),
            steps=int(body["steps"]),
            support_accuracy=float(body["support_accuracy"]),
            raw=body,
        )


@dataclass(frozen=True)
class Task:
    """A support set and its adaptation: status `adapting`, `ready` or `failed`."""

    id: str
    name: str | None
    status: str
    labels: list[str]
    counts: dict[str, int]
    initialization_version: str
    adapted_model: AdaptedModel | None
    job_id: str | None
    error_code: str | None
    error_message: str | None
    created_at: datetime | None
    raw: dict[str, Any] = field(repr=False)
    # The task's own "unknown" threshold (None: the initialization's default applies), and the
    # support-set diagnostics of its adapted model (leave_one_out_accuracy, per_class,
    # confusable_pairs), as the API returns them.
    unknown_threshold: float | None = None
    diagnostics: dict[str, Any] | None = None

    @property
    def ready(self) -> bool:
        """True once the task has an adapted model to predict with."""
        return self.status == "ready"

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Task:
        """Parse a task object."""
        code, message = _error(body.get("error"))
        job = body.get("job")
        model = body.get("adapted_model")
        return cls(
            id=str(body["id"]),
            name=body.get("name"),
            status=str(body["status"]),
            labels=[str(label) for label in body.get("labels", [])],
            counts={str(k): int(v) for k, v in body.get("counts", {}).items()},
            initialization_version=str(body.get("initialization_version", "")),
            adapted_model=AdaptedModel.from_json(model) if isinstance(model, dict) else None,
            job_id=str(job["id"]) if isinstance(job, dict) else None,
            error_code=code,
            error_message=message,
            created_at=_time(body.get("created_at")),
            raw=body,
            unknown_threshold=_float_or_none(body.get("unknown_threshold")),
            diagnostics=body["diagnostics"] if isinstance(body.get("diagnostics"), dict) else None,
        )


def _float_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


@dataclass(frozen=True)
class TaskPage:
    """One page of tasks; pass `next_cursor` back to get the next."""

    items: list[Task]
    next_cursor: str | None


@dataclass(frozen=True)
class Job:
    """Background work: kind, state (`queued`, `running`, `succeeded`, `failed`, `cancelled`)."""

    id: str
    kind: str
    state: str
    progress: float
    attempts: int
    error_code: str | None
    error_message: str | None
    result: dict[str, Any] | None
    raw: dict[str, Any] = field(repr=False)

    @property
    def finished(self) -> bool:
        """True in a terminal state."""
        return self.state in {"succeeded", "failed", "cancelled"}

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Job:
        """Parse a job object."""
        code, message = _error(body.get("error"))
        return cls(
            id=str(body["id"]),
            kind=str(body.get("kind", "")),
            state=str(body["state"]),
            progress=float(body.get("progress") or 0.0),
            attempts=int(body.get("attempts") or 0),
            error_code=code,
            error_message=message,
            result=body.get("result"),
            raw=body,
        )


@dataclass(frozen=True)
class Prediction:
    """The prediction for one query image: its label ("unknown" when its score is below the
    threshold), every task label's probability, the top k and the calibrated score."""

    label: str
    probabilities: dict[str, float]
    top_k: list[tuple[str, float]]
    raw: dict[str, Any] = field(repr=False)
    score: float | None = None

    @property
    def unknown(self) -> bool:
        """True when the image looks like none of the task's classes."""
        return self.label == "unknown"

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Prediction:
        """Parse one entry of a prediction response."""
        return cls(
            label=str(body["label"]),
            probabilities={str(k): float(v) for k, v in body.get("probabilities", {}).items()},
            top_k=[(str(e["label"]), float(e["probability"])) for e in body.get("top_k", [])],
            raw=body,
            score=_float_or_none(body.get("score")),
        )


@dataclass(frozen=True)
class PredictionResult:
    """Predictions for the images of one request, in the order they were sent."""

    task_id: str
    adapted_model_id: str
    predictions: list[Prediction]
    raw: dict[str, Any] = field(repr=False)
    unknown_threshold: float | None = None
    unknown_threshold_source: str | None = None

    @property
    def labels(self) -> list[str]:
        """The predicted label of each image."""
        return [p.label for p in self.predictions]

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> PredictionResult:
        """Parse a prediction response."""
        return cls(
            task_id=str(body["task_id"]),
            adapted_model_id=str(body["adapted_model_id"]),
            predictions=[Prediction.from_json(p) for p in body.get("predictions", [])],
            raw=body,
            unknown_threshold=_float_or_none(body.get("unknown_threshold")),
            unknown_threshold_source=body.get("unknown_threshold_source"),
        )


@dataclass(frozen=True)
class Initialization:
    """A meta-learned initialization version, its metrics and whether it is active."""

    version: str
    status: str
    is_active: bool
    metrics: dict[str, Any]
    raw: dict[str, Any] = field(repr=False)
    # What it knows ("handwritten characters", "photos") and the input it expects.
    domain: str = "handwritten characters"
    in_channels: int = 1
    image_size: int = 28

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Initialization:
        """Parse an initialization object."""
        config = dict(body.get("config") or {})
        return cls(
            version=str(body["version"]),
            status=str(body.get("status", "")),
            is_active=bool(body.get("is_active")),
            metrics=dict(body.get("metrics") or {}),
            raw=body,
            domain=str(body.get("domain", "handwritten characters")),
            in_channels=int(config.get("in_channels", 1)),
            image_size=int(config.get("image_size", 28)),
        )


@dataclass(frozen=True)
class Dataset:
    """A meta-training dataset with its class and image counts."""

    id: str
    name: str
    class_count: int
    image_count: int
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Dataset:
        """Parse a dataset object."""
        return cls(
            id=str(body["id"]),
            name=str(body["name"]),
            class_count=int(body.get("class_count") or 0),
            image_count=int(body.get("image_count") or 0),
            raw=body,
        )


@dataclass(frozen=True)
class MetaTraining:
    """A meta-training run: state, progress (0..1), the curve so far and, when done, its result."""

    id: str
    state: str
    progress: float
    stage: str | None
    curve: list[dict[str, Any]]
    result: dict[str, Any] | None
    error_code: str | None
    error_message: str | None
    raw: dict[str, Any] = field(repr=False)

    @property
    def finished(self) -> bool:
        """True in a terminal state."""
        return self.state in {"succeeded", "failed", "cancelled"}

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> MetaTraining:
        """Parse a meta-training object."""
        code, message = _error(body.get("error"))
        progress = body.get("progress") or {}
        return cls(
            id=str(body["id"]),
            state=str(body["state"]),
            progress=float(progress.get("fraction") or 0.0),
            stage=progress.get("stage"),
            curve=list(body.get("curve") or []),
            result=body.get("result"),
            error_code=code,
            error_message=message,
            raw=body,
        )


@dataclass(frozen=True)
class Promotion:
    """The result of a promote or rollback: the active version and the one it replaced."""

    active_version: str
    previous_version: str | None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Promotion:
        """Parse a promotion result."""
        previous = body.get("previous_version")
        return cls(
            active_version=str(body["active_version"]),
            previous_version=None if previous is None else str(previous),
        )


@dataclass(frozen=True)
class ApiKey:
    """An API key as its tenant's admins see it; `key` is set only when it was just created."""

    id: str
    prefix: str
    name: str | None
    scopes: list[str]
    state: str
    key: str | None
    expires_at: datetime | None
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> ApiKey:
        """Parse a key object."""
        return cls(
            id=str(body["id"]),
            prefix=str(body.get("prefix", "")),
            name=body.get("name"),
            scopes=[str(s) for s in body.get("scopes", [])],
            state=str(body.get("state", "")),
            key=body.get("key"),
            expires_at=_time(body.get("expires_at")),
            raw=body,
        )
