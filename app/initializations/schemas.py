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
    """One change of the global active initialization or of a tenant's own default."""

    model_config = ConfigDict(from_attributes=True)

    action: Literal["initial", "promote", "auto_promote", "rollback"]
    version: str = Field(description="The version made active.")
    previous_version: str | None = Field(description="The version it replaced.")
    actor: str = Field(
        description="'key:<api key id>', 'job:<meta-training id>', 'system', or 'operator' for "
        "a global change made by a key outside your tenant."
    )
    scope: Literal["global", "tenant"] = Field(
        description="'global': the version every tenant without its own default adapts from; "
        "'tenant': your tenant's own default."
    )
    tenant: str | None = Field(
        default=None, description="The tenant of a 'tenant' change (shown to operator keys only)."
    )
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
    scope: Literal["global", "tenant"] = Field(
        description="'global': served to every tenant; 'tenant': your tenant's own version."
    )
    is_active: bool = Field(description="New tasks of your tenant adapt from this version.")
    is_global_default: bool = Field(
        description="The global active version (tenants without their own default use it)."
    )
    is_tenant_default: bool = Field(description="Your tenant's own default.")
    config: dict[str, Any]
    metrics: dict[str, Any]
    sha256: str
    parent_version: str | None
    promoted_at: datetime | None
    created_at: datetime


class InitializationList(BaseModel):
    """Every initialization version and which one is active."""

    items: list[InitializationPublic]
    active_version: str | None = Field(description="The version your new tasks adapt from.")
    global_version: str | None = Field(description="The global active version.")
