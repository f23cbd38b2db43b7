"""Task request and response bodies."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.core.schemas import (
    ADAPTED_MODEL_ID,
    JOB_ID,
    PNG_BASE64,
    TASK_ID,
    AdaptMode,
    AdaptSteps,
    CleanText,
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
    "initialization_version": "omniglot-conv4-v2",
    "adapted_model": {
        "id": ADAPTED_MODEL_ID,
        "initialization_version": "omniglot-conv4-v2",
        "mode": "full",
        "steps": 10,
        "support_accuracy": 1.0,
        "created_at": "2026-11-29T21:09:03.412Z",
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
    support_accuracy: float
    created_at: datetime


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


class SupportExampleJson(BaseModel):
    """One support image as JSON."""

    label: CleanText
    image: str = Field(description="Base64-encoded PNG or JPEG bytes.")


class SupportSetJson(BaseModel):
    """A support set sent as JSON instead of multipart."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "examples": [
                        {"label": "alpha", "image": PNG_BASE64},
                        {"label": "beta", "image": PNG_BASE64},
                    ],
                    "name": "letters",
                    "mode": "head",
                    "steps": 10,
                }
            ]
        },
    )

    examples: list[SupportExampleJson]
    name: CleanText | None = None
    mode: AdaptMode = "full"
    steps: AdaptSteps | None = Field(
        default=None, description="Inner-loop steps; default: the initialization's own."
    )
