"""Tenants and their API keys: created (shown once, stored hashed), listed, revoked, rotated."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from app.core.errors import Conflict, InvalidRequest, NotFound
from app.core.security import display_prefix, generate_key, hash_key
from app.models import (
    ApiKey,
    Tenant,
    utcnow,
)

# last_used_at is written at most this often per key: a busy key costs no write per request.
USE_RESOLUTION = timedelta(minutes=1)


def scopes_for(*, admin: bool = False, operator: bool = False) -> list[str]:
    """A key's scopes: every key is a user; an operator is an admin too."""
    if operator:
        return ["user", "admin", "operator"]
    return ["user", "admin"] if admin else ["user"]


def get_or_create_tenant(*, session: Session, name: str) -> Tenant:
    """The tenant with this name, created if it does not exist."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(name=name)
        session.add(tenant)
        session.flush()
    return tenant


def create_api_key(
    *,
    session: Session,
    tenant: Tenant,
    admin: bool,
    pepper: str,
    name: str | None = None,
    operator: bool = False,
    expires_at: datetime | None = None,
) -> tuple[ApiKey, str]:
    """A new key row and the plaintext key (shown once; only its hash is stored)."""
    if expires_at is not None and expires_at <= utcnow():
        raise InvalidRequest("expires_at must be in the future", code="invalid_expiry")
    key = generate_key()
    row = ApiKey(
        tenant_id=tenant.id,
        prefix=display_prefix(key),
        key_hash=hash_key(key, pepper),
        scopes=scopes_for(admin=admin, operator=operator),
        name=name,
        expires_at=expires_at,
    )
    session.add(row)
    session.flush()
    return row, key


def is_live(row: ApiKey, now: datetime) -> bool:
    """Not revoked and not expired."""
    return row.revoked_at is None and (row.expires_at is None or row.expires_at > now)


def authenticate(*, session: Session, key: str, pepper: str) -> ApiKey | None:
    """The live key row matching a presented key, or None; notes its use (once a minute)."""
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key, pepper)))
    now = utcnow()
    if row is None or not is_live(row, now):
        return None
    if row.last_used_at is None or now - row.last_used_at >= USE_RESOLUTION:
        # Conditional, so concurrent requests of one key write once; committed on its own.
        session.execute(
            update(ApiKey)
            .where(
                ApiKey.id == row.id,
                or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at <= now - USE_RESOLUTION),
            )
            .values(last_used_at=now)
            .execution_options(synchronize_session=False)
        )
        session.commit()
    return row


def list_keys(
    *, session: Session, tenant_id: uuid.UUID | None = None, include_revoked: bool = True
) -> Sequence[tuple[ApiKey, str]]:
    """Keys with their tenant's name, newest first (one tenant's, or every tenant's)."""
    query = select(ApiKey, Tenant.name).join(Tenant, Tenant.id == ApiKey.tenant_id)
    if tenant_id is not None:
        query = query.where(ApiKey.tenant_id == tenant_id)
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    return [
        (row, name)
        for row, name in session.execute(query.order_by(ApiKey.created_at.desc(), ApiKey.id))
    ]


def get_key(*, session: Session, key_id: uuid.UUID, tenant_id: uuid.UUID | None = None) -> ApiKey:
    """A key by id (of `tenant_id` when given), or 404 (another tenant's too)."""
    query = select(ApiKey).where(ApiKey.id == key_id)
    if tenant_id is not None:
        query = query.where(ApiKey.tenant_id == tenant_id)
    row = session.scalar(query)
    if row is None:
        raise NotFound(f"no API key {key_id}")
    return row


def find_key(*, session: Session, ref: str) -> ApiKey:
    """A key by id or by its shown prefix (unique), for the command line."""
    try:
        return get_key(session=session, key_id=uuid.UUID(ref))
    except ValueError:
        pass
    rows = session.scalars(select(ApiKey).where(ApiKey.prefix == ref)).all()
    if len(rows) != 1:
        raise NotFound(
            f"no API key with id or prefix {ref!r}"
            if not rows
            else f"{len(rows)} keys share the prefix {ref!r}; name the key by its id"
        )
    return rows[0]


def revoke_key(*, session: Session, row: ApiKey) -> ApiKey:
    """Revoke a key now (every later request with it is a 401); revoking twice is a no-op."""
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    session.commit()
    return row


def rotate_key(
    *, session: Session, row: ApiKey, pepper: str, grace: timedelta = timedelta(0)
) -> tuple[ApiKey, str]:
    """A new key with the old one's tenant, scopes, name and expiry; the old one ends.

    With a grace period the old key keeps working until then (its expires_at), so clients can
    switch over; without one it is revoked at once.
    """
    now = utcnow()
    if not is_live(row, now):
        raise Conflict(
            "the key is revoked or expired; create a new key instead", code="key_not_live"
        )
    key = generate_key()
    new = ApiKey(
        tenant_id=row.tenant_id,
        prefix=display_prefix(key),
        key_hash=hash_key(key, pepper),
        scopes=list(row.scopes),
        name=row.name,
        expires_at=row.expires_at,
    )
    session.add(new)
    if grace > timedelta(0):
        ends = now + grace
        row.expires_at = ends if row.expires_at is None else min(row.expires_at, ends)
    else:
        row.revoked_at = now
    session.commit()
    return new, key
