"""API key request and response bodies: never a hash, the plaintext only once at creation."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from app.core.schemas import KEY_ID, WHEN, CleanText
from app.models import ApiKey, utcnow

_KEY: dict[str, Any] = {
    "id": KEY_ID,
    "prefix": "msk_4kq2Xw",
    "name": "labelling-app",
    "scopes": ["user"],
    "state": "active",
    "created_at": WHEN,
    "last_used_at": None,
    "expires_at": "2027-05-31T00:00:00Z",
    "revoked_at": None,
}


class KeyPublic(BaseModel):
    """An API key as its tenant's admins see it: the shown prefix, never the key or its hash."""

    model_config = ConfigDict(from_attributes=True, json_schema_extra={"examples": [_KEY]})

    id: uuid.UUID
    prefix: str = Field(description="The key's first characters, to tell keys apart.")
    name: str | None
    scopes: list[str]
    state: Literal["active", "revoked", "expired"]
    created_at: datetime
    last_used_at: datetime | None = Field(description="Kept to the minute.")
    expires_at: datetime | None
    revoked_at: datetime | None


class KeyCreated(KeyPublic):
    """A new key; `key` is shown only in this response."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{**_KEY, "key": "msk_4kq2Xw9vB7cT1nLp0sRzY3eHfJ6uGdKa8mQo5iVbN2cE0d"}]
        }
    )

    key: str = Field(description="The API key itself; store it now, it is not shown again.")


class KeyList(BaseModel):
    """Your tenant's keys, newest first."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"items": [_KEY]}]})

    items: list[KeyPublic]


class KeyCreate(BaseModel):
    """A new key for your tenant."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"name": "labelling-app", "admin": False, "expires_at": "2027-05-31T00:00:00Z"}
            ]
        },
    )

    name: CleanText | None = Field(default=None, min_length=1, max_length=100)
    admin: bool = Field(default=False, description="Add the admin scope.")
    expires_at: AwareDatetime | None = Field(
        default=None, description="When the key stops working (default: never)."
    )


class KeyRotate(BaseModel):
    """How long the replaced key keeps working."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"grace_seconds": 3600}]}
    )

    grace_seconds: int = Field(
        default=0,
        ge=0,
        le=7 * 24 * 3600,
        description="0 (default): the old key is revoked at once; otherwise it expires then.",
    )


def key_public(row: ApiKey) -> KeyPublic:
    """A key row as the API shows it."""
    state: Literal["active", "revoked", "expired"] = "active"
    if row.revoked_at is not None:
        state = "revoked"
    elif row.expires_at is not None and row.expires_at <= utcnow():
        state = "expired"
    return KeyPublic(
        id=row.id,
        prefix=row.prefix,
        name=row.name,
        scopes=list(row.scopes),
        state=state,
        created_at=row.created_at,
        last_used_at=row.last_used_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
    )
