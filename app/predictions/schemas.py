"""Prediction request and response bodies."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.core.schemas import ADAPTED_MODEL_ID, TASK_ID, WHEN

REQUEST_ID = "e4a6c8e0-2b4d-4f6a-8c0e-4b6d8f0a2c4e"
_PREDICTION: dict[str, Any] = {
    "id": "f1b3d5f7-9a1c-4e3a-8c5e-7a9c1e3b5d7f",
    "label": "beta",
    "probabilities": {"alpha": 0.07, "beta": 0.91, "gamma": 0.02},
    "top_k": [{"label": "beta", "probability": 0.91}, {"label": "alpha", "probability": 0.07}],
    "score": 0.62,
    "image_sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
}


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
    score: float | None = Field(
        description="Calibrated familiarity in [0, 1] (a conformal p-value: the share of "
        "genuine in-task queries that look less familiar); the label is 'unknown' when it is "
        "below the threshold applied. null: the initialization is not calibrated."
    )
    image_sha256: str


class PredictionResult(BaseModel):
    """Predictions for the images of one request, in the order they were sent."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "task_id": TASK_ID,
                    "adapted_model_id": ADAPTED_MODEL_ID,
                    "request_id": REQUEST_ID,
                    "predictions": [_PREDICTION],
                    "unknown_threshold": 0.01,
                    "unknown_threshold_source": "initialization",
                }
            ]
        }
    )

    task_id: uuid.UUID
    adapted_model_id: uuid.UUID
    request_id: uuid.UUID
    predictions: list[PredictionPublic]
    unknown_threshold: float = Field(
        description="The threshold applied to every prediction's score (0: none)."
    )
    unknown_threshold_source: Literal["request", "task", "initialization", "none"] = Field(
        description="Where the threshold came from: the request, the task (set at creation), "
        "the initialization's calibrated default, or none (not calibrated: 0)."
    )


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

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "items": [
                        {
                            "id": _PREDICTION["id"],
                            "request_id": REQUEST_ID,
                            "position": 0,
                            "adapted_model_id": ADAPTED_MODEL_ID,
                            "image_sha256": _PREDICTION["image_sha256"],
                            "label": "beta",
                            "probabilities": _PREDICTION["probabilities"],
                            "created_at": WHEN,
                        }
                    ],
                    "next_cursor": None,
                }
            ]
        }
    )

    items: list[PredictionRecord]
    next_cursor: str | None
