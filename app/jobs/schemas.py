"""Job response bodies."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from app.core.schemas import ADAPTED_MODEL_ID, JOB_ID, TASK_ID, WHEN, ErrorInfo

JOB_EXAMPLE: dict[str, Any] = {
    "id": JOB_ID,
    "kind": "adapt",
    "state": "succeeded",
    "progress": 1.0,
    "progress_detail": {},
    "attempts": 1,
    "max_attempts": 3,
    "error": None,
    "result": {"adapted_model_id": ADAPTED_MODEL_ID, "support_accuracy": 1.0},
    "created_at": "2026-11-29T21:09:03.120Z",
    "started_at": "2026-11-29T21:09:03.151Z",
    "finished_at": WHEN,
    "updated_at": WHEN,
    "links": {
        "self": f"/v1/jobs/{JOB_ID}",
        "task": f"/v1/tasks/{TASK_ID}",
        "predictions": f"/v1/tasks/{TASK_ID}/predictions",
    },
}


class JobPublic(BaseModel):
    """A unit of background work and where it stands."""

    model_config = ConfigDict(json_schema_extra={"examples": [JOB_EXAMPLE]})

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
