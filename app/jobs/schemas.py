"""Job response bodies."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel

from app.core.schemas import ErrorInfo


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
