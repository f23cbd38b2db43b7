"""Initialization and promotion response bodies."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.core.schemas import KEY_ID, WHEN

_VERSION: dict[str, Any] = {
    "version": "omniglot-conv4-v8",
    "status": "ready",
    "source": "shipped",
    "scope": "global",
    "domain": "handwritten characters",
    "is_active": True,
    "is_global_default": True,
    "is_domain_default": True,
    "is_tenant_default": False,
    "config": {"in_channels": 1, "image_size": 42, "width": 128, "inner_steps": 10},
    "metrics": {"val_5w1s": 0.987, "val_20w1s": 0.953},
    "sha256": "b5d7f9a1c3e5a7b9d1f3a5c7e9b1d3f5a7c9e1b3d5f7a9c1e3b5d7f9a1c3e5a7",
    "parent_version": "omniglot-conv4-v7",
    "promoted_at": WHEN,
    "created_at": "2026-12-06T15:30:00Z",
}


class PromotionResult(BaseModel):
    """Which version is active now, and which one was before."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"active_version": "omniglot-conv4-v8", "previous_version": "omniglot-conv4-v7"}
            ]
        }
    )

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

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "items": [
                        {
                            "action": "promote",
                            "version": "omniglot-conv4-v8",
                            "previous_version": "omniglot-conv4-v7",
                            "actor": f"key:{KEY_ID}",
                            "scope": "tenant",
                            "tenant": None,
                            "created_at": WHEN,
                        }
                    ]
                }
            ]
        }
    )

    items: list[PromotionRecord]


class InitializationPublic(BaseModel):
    """A meta-learned initialization version."""

    model_config = ConfigDict(from_attributes=True, json_schema_extra={"examples": [_VERSION]})

    version: str
    status: str
    source: str
    scope: Literal["global", "tenant"] = Field(
        description="'global': served to every tenant; 'tenant': your tenant's own version."
    )
    domain: str = Field(
        description="What it knows, e.g. 'handwritten characters' or 'photos'; config says the "
        "input it expects (in_channels, image_size)."
    )
    is_active: bool = Field(
        description="New tasks of your tenant that name no initialization adapt from this version."
    )
    is_global_default: bool = Field(
        description="The global active version of the default domain (tenants without their own "
        "default use it)."
    )
    is_domain_default: bool = Field(
        description="The global active version of its domain (promotion and rollback act per "
        "domain)."
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

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "items": [_VERSION],
                    "active_version": "omniglot-conv4-v8",
                    "global_version": "omniglot-conv4-v8",
                    "domain_versions": {
                        "handwritten characters": "omniglot-conv4-v8",
                        "photos": "photos-conv4-v5",
                    },
                }
            ]
        }
    )

    items: list[InitializationPublic]
    active_version: str | None = Field(description="The version your new tasks adapt from.")
    global_version: str | None = Field(
        description="The global active version of the default domain."
    )
    domain_versions: dict[str, str] = Field(
        default_factory=dict, description="Each domain's global active version."
    )
