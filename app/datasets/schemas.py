"""Dataset request and response bodies."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, computed_field

from app.core.schemas import DATASET_ID, WHEN, CleanText

_DATASET: dict[str, Any] = {
    "id": DATASET_ID,
    "name": "omniglot-background",
    "class_count": 964,
    "image_count": 19280,
    "size_bytes": 9464212,
    "sha256": "e4a7b2c9d1f3e5a7b9c1d3e5f7a9b1c3d5e7f9a1b3c5d7e9f1a3b5c7d9e1f3a5",
    "details": {
        "layout": "grouped",
        "groups": 30,
        "images_per_class": 20,
        "source": "omniglot",
        "validation_by": "group",
        "validation_groups": [
            "Anglo-Saxon_Futhorc",
            "Early_Aramaic",
            "Greek",
            "Japanese_(katakana)",
        ],
        "validation_classes": 122,
    },
    "validation_groups": ["Anglo-Saxon_Futhorc", "Early_Aramaic", "Greek", "Japanese_(katakana)"],
    "created_at": WHEN,
}


class DatasetPublic(BaseModel):
    """A registered meta-training dataset."""

    model_config = ConfigDict(from_attributes=True, json_schema_extra={"examples": [_DATASET]})

    id: uuid.UUID
    name: str
    class_count: int
    image_count: int
    size_bytes: int
    sha256: str
    details: dict[str, Any] = Field(description="Layout, group count, images per class, source.")
    created_at: datetime

    @computed_field(  # type: ignore[prop-decorator]
        description="Groups (or, in a flat dataset, classes) held out for validation, fixed at "
        "registration: every run validates on exactly these and never trains on them."
    )
    @property
    def validation_groups(self) -> list[str]:
        """The held-out groups recorded in the details."""
        return [str(g) for g in self.details.get("validation_groups") or []]


class DatasetList(BaseModel):
    """The tenant's datasets, newest first."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"items": [_DATASET]}]})

    items: list[DatasetPublic]


class OmniglotIn(BaseModel):
    """Register the server's configured Omniglot background zip under a name."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"name": "omniglot-background"}]}
    )

    name: CleanText = Field(default="omniglot-background", min_length=1, max_length=200)
