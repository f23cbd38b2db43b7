"""Adaptation request and response bodies."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from app.core.schemas import (
    ADAPTED_MODEL_ID,
    DOCUMENTED_MAX_STEPS,
    JOB_ID,
    WHEN,
    CleanText,
)


class AdaptationCreate(BaseModel):
    """Re-adapt a task (keeps its earlier adapted models)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"initialization_version": "omniglot-conv4-v8", "mode": "full", "steps": 10}
            ]
        },
    )

    initialization_version: CleanText | None = Field(
        default=None, description="Defaults to the active version."
    )
    mode: Literal["full", "head"] | None = None
    steps: (
        Annotated[
            int,
            Field(ge=0),
            WithJsonSchema({"type": "integer", "minimum": 0, "maximum": DOCUMENTED_MAX_STEPS}),
        ]
        | None
    ) = None


class AdaptedModelRecord(BaseModel):
    """One adapted model of a task."""

    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    job_id: uuid.UUID
    initialization_version: str
    mode: str
    steps: int
    support_accuracy: float
    created_at: datetime


class AdaptedModelList(BaseModel):
    """A task's adapted models, newest (the current one) first."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "items": [
                        {
                            "id": ADAPTED_MODEL_ID,
                            "job_id": JOB_ID,
                            "initialization_version": "omniglot-conv4-v8",
                            "mode": "full",
                            "steps": 10,
                            "support_accuracy": 1.0,
                            "created_at": WHEN,
                        }
                    ]
                }
            ]
        }
    )

    items: list[AdaptedModelRecord]
