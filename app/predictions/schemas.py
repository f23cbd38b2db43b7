"""Prediction request and response bodies."""

from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, StrictInt


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


class QueriesJson(BaseModel):
    """Query images sent as JSON instead of multipart."""

    model_config = ConfigDict(extra="forbid")

    images: list[str] = Field(description="Base64-encoded PNG or JPEG bytes, one per query image.")
    top_k: StrictInt | None = None
