"""Initialization and promotion response bodies."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class PromotionResult(BaseModel):
    """Which version is active now, and which one was before."""

    active_version: str
    previous_version: str | None


class PromotionRecord(BaseModel):
    """One change of the active initialization."""

    model_config = ConfigDict(from_attributes=True)

    action: Literal["initial", "promote", "auto_promote", "rollback"]
    version: str = Field(description="The version made active.")
    previous_version: str | None = Field(description="The version it replaced.")
    actor: str = Field(description="'key:<api key id>', 'job:<meta-training id>' or 'system'.")
    created_at: datetime


class PromotionList(BaseModel):
    """Changes of the active version, newest first."""

    items: list[PromotionRecord]


class InitializationPublic(BaseModel):
    """A meta-learned initialization version."""

    model_config = ConfigDict(from_attributes=True)

    version: str
    status: str
    source: str
    is_active: bool
    config: dict[str, Any]
    metrics: dict[str, Any]
    sha256: str
    parent_version: str | None
    promoted_at: datetime | None
    created_at: datetime


class InitializationList(BaseModel):
    """Every initialization version and which one is active."""

    items: list[InitializationPublic]
    active_version: str | None
