"""Task request and response bodies."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from app.core.schemas import CleanText, ErrorInfo


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
