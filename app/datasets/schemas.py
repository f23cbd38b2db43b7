"""Dataset request and response bodies."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.core.schemas import CleanText


class DatasetPublic(BaseModel):
    """A registered meta-training dataset."""

    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str
    class_count: int
    image_count: int
    size_bytes: int
    sha256: str
    details: dict[str, Any] = Field(description="Layout, group count, images per class, source.")
    created_at: datetime


class DatasetList(BaseModel):
    """The tenant's datasets, newest first."""

    items: list[DatasetPublic]


class OmniglotIn(BaseModel):
    """Register the server's configured Omniglot background zip under a name."""

    model_config = ConfigDict(extra="forbid")

    name: CleanText = Field(default="omniglot-background", min_length=1, max_length=200)
