"""Task request and response bodies."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.core.schemas import (
    ADAPTED_MODEL_ID,
    JOB_ID,
    TASK_ID,
    ErrorInfo,
)

TASK_EXAMPLE: dict[str, Any] = {
    "id": TASK_ID,
    "name": "letters",
    "status": "ready",
    "mode": "full",
    "steps": None,
    "labels": ["alpha", "beta", "gamma"],
    "counts": {"alpha": 2, "beta": 1, "gamma": 1},
    "example_count": 4,
    "initialization_version": "omniglot-conv4-v8",
    "adapted_model": {
        "id": ADAPTED_MODEL_ID,
        "initialization_version": "omniglot-conv4-v8",
        "mode": "full",
        "steps": 10,
        "support_accuracy": 1.0,
        "created_at": "2026-11-29T21:09:03.412Z",
    },
    "unknown_threshold": None,
    "diagnostics": {
        "leave_one_out_accuracy": 1.0,
        "evaluated_images": 2,
        "per_class": {"alpha": 1.0, "beta": None, "gamma": None},
        "confusable_pairs": [
            {"first": "alpha", "second": "gamma", "similarity": 0.83},
            {"first": "alpha", "second": "beta", "similarity": 0.41},
        ],
    },
    "job": {"id": JOB_ID, "state": "succeeded"},
    "error": None,
    "created_at": "2026-11-29T21:09:03.120Z",
    "updated_at": "2026-11-29T21:09:03.412Z",
    "links": {
        "self": f"/v1/tasks/{TASK_ID}",
        "predictions": f"/v1/tasks/{TASK_ID}/predictions",
        "job": f"/v1/jobs/{JOB_ID}",
    },
}


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
    support_accuracy: float = Field(
        description="Accuracy of the adapted model on its own support set (kept for "
        "compatibility: nearly always 1.0, it says nothing about the support set; see the "
        "task's diagnostics)."
    )
    created_at: datetime


class ConfusablePairPublic(BaseModel):
    """Two classes whose support images look alike to the initialization."""

    first: str
    second: str
    similarity: float = Field(description="Cosine similarity of the two class means (1: same).")


class SupportDiagnosticsPublic(BaseModel):
    """How well the support set separates its classes, computed when the task adapts."""

    leave_one_out_accuracy: float | None = Field(
        description="Each support image of a class with >= 2 images classified by the nearest "
        "class mean of the others; null when no class has 2 images."
    )
    evaluated_images: int
    per_class: dict[str, float | None]
    confusable_pairs: list[ConfusablePairPublic] = Field(
        description="The most similar class pairs, most similar first."
    )


class TaskPublic(BaseModel):
    """A task as clients see it."""

    model_config = ConfigDict(json_schema_extra={"examples": [TASK_EXAMPLE]})

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
    unknown_threshold: float | None = Field(
        default=None,
        description="The task's default 'unknown' threshold set at creation; null: the "
        "initialization's calibrated default applies.",
    )
    diagnostics: SupportDiagnosticsPublic | None = Field(
        default=None, description="Support-set diagnostics of the current adapted model."
    )
    job: JobRef | None
    error: ErrorInfo | None
    created_at: datetime
    updated_at: datetime
    links: dict[str, str]


class TaskPage(BaseModel):
    """One page of tasks, newest first."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "items": [TASK_EXAMPLE],
                    "next_cursor": "eyJjIjoiMjAyNi0xMS0yOVQyMTowOTowMy4xMjBaIn0",
                }
            ]
        }
    )

    items: list[TaskPublic]
    next_cursor: str | None
