"""Adaptation request and response bodies."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.core.schemas import CleanText


class AdaptationCreate(BaseModel):
    """Re-adapt a task (keeps its earlier adapted models)."""

    model_config = ConfigDict(extra="forbid")

    initialization_version: CleanText | None = Field(
        default=None, description="Defaults to the active version."
    )
    mode: Literal["full", "head"] | None = None
    steps: int | None = Field(default=None, ge=0)


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

    items: list[AdaptedModelRecord]
