"""Tenants and their API keys (stored hashed)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.security import display_prefix, generate_key, hash_key
from app.models import (
    ApiKey,
    Tenant,
)


def get_or_create_tenant(*, session: Session, name: str) -> Tenant:
    """The tenant with this name, created if it does not exist."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(name=name)
        session.add(tenant)
        session.flush()
    return tenant


def create_api_key(
    *, session: Session, tenant: Tenant, admin: bool, pepper: str, name: str | None = None
) -> tuple[ApiKey, str]:
    """A new key row and the plaintext key (shown once; only its hash is stored)."""
    key = generate_key()
    scopes = ["user", "admin"] if admin else ["user"]
    row = ApiKey(
        tenant_id=tenant.id,
        prefix=display_prefix(key),
        key_hash=hash_key(key, pepper),
        scopes=scopes,
        name=name,
    )
    session.add(row)
    session.flush()
    return row, key


def authenticate(*, session: Session, key: str, pepper: str) -> ApiKey | None:
    """The live key row matching a presented key, or None."""
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key, pepper)))
    if row is None or row.revoked_at is not None:
        return None
    return row
