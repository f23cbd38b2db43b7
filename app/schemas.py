"""Request and response bodies of the v1 API; responses never carry internal fields."""

from __future__ import annotations

import unicodedata
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt


def unstorable_character(text: str) -> str | None:
    """The first character no database column can hold (a control character such as NUL, or a
    lone UTF-16 surrogate from a JSON escape), as ``U+XXXX``; None when the text is clean."""
    for char in text:
        if unicodedata.category(char) in ("Cc", "Cs"):
            return f"U+{ord(char):04X}"
    return None


def _clean_text(value: str) -> str:
    bad = unstorable_character(value)
    if bad is not None:
        raise ValueError(f"contains the character {bad}, which is not allowed in text")
    return value


CleanText = Annotated[str, AfterValidator(_clean_text)]
"""A string without control characters or lone surrogates (both fail as 500s in a database)."""


class Problem(BaseModel):
    """An RFC 9457 problem document."""

    type: str
    title: str
    status: int
    code: str = Field(description="Machine-readable error code, e.g. invalid_image.")
    detail: str = Field(description="What went wrong and what to change.")
    instance: str | None = None


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` documenting problem+json bodies for these statuses."""
    return {
        status: {"model": Problem, "content": {"application/problem+json": {}}}
        for status in statuses
    }


class ErrorInfo(BaseModel):
    """Why a job or task failed."""

    code: str
    message: str


class JobRef(BaseModel):
    """A short reference to a job."""

    id: uuid.UUID
    state: str


class AdaptedModelPublic(BaseModel):
    """The adapted model a task predicts with."""

    id: uuid.UUID
    initialization_version: str
    mode: str
    steps: int
    support_accuracy: float
    created_at: datetime


class TaskPublic(BaseModel):
    """A task as clients see it."""

    id: uuid.UUID
    name: str | None
    status: Literal["adapting", "ready", "failed"]
    mode: str
    steps: int | None
    labels: list[str]
    counts: dict[str, int] = Field(description="Support images per label.")
    example_count: int
    initialization_version: str
    adapted_model: AdaptedModelPublic | None
    job: JobRef | None
    error: ErrorInfo | None
    created_at: datetime
    updated_at: datetime
    links: dict[str, str]


class TaskPage(BaseModel):
    """One page of tasks, newest first."""

    items: list[TaskPublic]
    next_cursor: str | None


class JobPublic(BaseModel):
    """A unit of background work and where it stands."""

    id: uuid.UUID
    kind: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    progress: float
    progress_detail: dict[str, Any]
    attempts: int
    max_attempts: int
    error: ErrorInfo | None
    result: dict[str, Any] | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    links: dict[str, str]


class LabelProbability(BaseModel):
    """One entry of a top-k list."""

    label: str
    probability: float


class PredictionPublic(BaseModel):
    """The prediction for one query image."""

    id: uuid.UUID
    label: str
    probabilities: dict[str, float] = Field(
        description="Label -> probability, in the task's label order."
    )
    top_k: list[LabelProbability]
    image_sha256: str


class PredictionResult(BaseModel):
    """Predictions for the images of one request, in the order they were sent."""

    task_id: uuid.UUID
    adapted_model_id: uuid.UUID
    request_id: uuid.UUID
    predictions: list[PredictionPublic]


class PredictionRecord(BaseModel):
    """A recorded prediction."""

    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    request_id: uuid.UUID
    position: int
    adapted_model_id: uuid.UUID
    image_sha256: str
    label: str
    probabilities: dict[str, float]
    created_at: datetime


class PredictionPage(BaseModel):
    """One page of recorded predictions, newest first."""

    items: list[PredictionRecord]
    next_cursor: str | None


class InitializationPublic(BaseModel):
    """A meta-learned initialization version."""

    model_config = ConfigDict(from_attributes=True)

    version: str
    status: str
    source: str
    is_active: bool
    config: dict[str, Any]
    metrics: dict[str, Any]
    sha256: str
    parent_version: str | None
    promoted_at: datetime | None
    created_at: datetime


class InitializationList(BaseModel):
    """Every initialization version and which one is active."""

    items: list[InitializationPublic]
    active_version: str | None


class SupportExampleJson(BaseModel):
    """One support image as JSON."""

    label: CleanText
    image: str = Field(description="Base64-encoded PNG or JPEG bytes.")


class SupportSetJson(BaseModel):
    """A support set sent as JSON instead of multipart."""

    model_config = ConfigDict(extra="forbid")

    examples: list[SupportExampleJson]
    name: CleanText | None = None
    mode: str = "full"
    steps: StrictInt | None = None


class QueriesJson(BaseModel):
    """Query images sent as JSON instead of multipart."""

    model_config = ConfigDict(extra="forbid")

    images: list[str] = Field(description="Base64-encoded PNG or JPEG bytes, one per query image.")
    top_k: StrictInt | None = None
