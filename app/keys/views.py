"""/v1/admin/keys: a tenant's admins list, create, revoke and rotate the tenant's own keys."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Body, Response, status

from app.core.errors import Forbidden, NotFound
from app.core.schemas import ADMIN, BODY, problem_responses
from app.deps import AdminDep, Caller, SessionDep, SettingsDep
from app.keys import service as keys
from app.keys.schemas import KeyCreate, KeyCreated, KeyList, KeyPublic, KeyRotate, key_public
from app.models import ApiKey, Tenant

router = APIRouter(prefix="/v1/admin/keys", tags=["admin"])
_LIST_PROBLEMS = problem_responses(*ADMIN)
_CREATE_PROBLEMS = problem_responses(*ADMIN, *BODY)
_ONE_PROBLEMS = problem_responses(*ADMIN, 404)
_ROTATE_PROBLEMS = problem_responses(
    *ADMIN,
    *BODY,
    404,
    409,
    codes={409: ("key_not_live", "the key is revoked or expired; create a new key instead")},
)


def _created(row: ApiKey, key: str) -> KeyCreated:
    return KeyCreated(**key_public(row).model_dump(), key=key)


def _check_reach(caller: Caller, row: ApiKey) -> None:
    # Acting on a key with a scope the caller lacks (an operator key) would hand it that scope.
    if not set(row.scopes) <= set(caller.scopes):
        raise Forbidden("this key has scopes your key lacks; an operator key must manage it")


def _own_key(caller: Caller, session: SessionDep, key_id: uuid.UUID) -> ApiKey:
    row = keys.get_key(session=session, key_id=key_id, tenant_id=caller.tenant_id)
    _check_reach(caller, row)
    return row


@router.get("", response_model=KeyList, responses=_LIST_PROBLEMS)
def list_keys(caller: AdminDep, session: SessionDep) -> KeyList:
    """Your tenant's keys (revoked and expired ones too), newest first."""
    rows = keys.list_keys(session=session, tenant_id=caller.tenant_id)
    return KeyList(items=[key_public(row) for row, _ in rows])


@router.post(
    "", status_code=status.HTTP_201_CREATED, response_model=KeyCreated, responses=_CREATE_PROBLEMS
)
def create_key(
    caller: AdminDep,
    session: SessionDep,
    settings: SettingsDep,
    response: Response,
    body: KeyCreate,
) -> KeyCreated:
    """A new user (or admin) key for your tenant; the key is shown only in this response."""
    tenant = session.get(Tenant, caller.tenant_id)
    if tenant is None:
        raise NotFound("your tenant no longer exists")
    row, key = keys.create_api_key(
        session=session,
        tenant=tenant,
        admin=body.admin,
        pepper=settings.api_key_pepper.get_secret_value(),
        name=body.name,
        expires_at=body.expires_at,
    )
    session.commit()
    response.headers["Location"] = f"/v1/admin/keys/{row.id}"
    return _created(row, key)


@router.post("/{key_id}/revoke", response_model=KeyPublic, responses=_ONE_PROBLEMS)
def revoke_key(caller: AdminDep, session: SessionDep, key_id: uuid.UUID) -> KeyPublic:
    """Revoke a key of your tenant at once (your own too); revoking twice changes nothing."""
    row = _own_key(caller, session, key_id)
    return key_public(keys.revoke_key(session=session, row=row))


@router.delete("/{key_id}", status_code=status.HTTP_204_NO_CONTENT, responses=_ONE_PROBLEMS)
def delete_key(caller: AdminDep, session: SessionDep, key_id: uuid.UUID) -> None:
    """Revoke a key of your tenant at once (kept in the list as revoked)."""
    keys.revoke_key(session=session, row=_own_key(caller, session, key_id))


@router.post(
    "/{key_id}/rotate",
    status_code=status.HTTP_201_CREATED,
    response_model=KeyCreated,
    responses=_ROTATE_PROBLEMS,
)
def rotate_key(
    caller: AdminDep,
    session: SessionDep,
    settings: SettingsDep,
    response: Response,
    key_id: uuid.UUID,
    body: Annotated[
        KeyRotate | None,
        Body(
            openapi_examples={
                "now": {"summary": "Revoke the old key at once", "value": {"grace_seconds": 0}},
                "grace": {
                    "summary": "Keep the old key working for an hour",
                    "value": {"grace_seconds": 3600},
                },
            }
        ),
    ] = None,
) -> KeyCreated:
    """A new key in place of this one (same scopes and name); the old one ends now or later."""
    row = _own_key(caller, session, key_id)
    new, key = keys.rotate_key(
        session=session,
        row=row,
        pepper=settings.api_key_pepper.get_secret_value(),
        grace=timedelta(seconds=(body or KeyRotate()).grace_seconds),
    )
    response.headers["Location"] = f"/v1/admin/keys/{new.id}"
    return _created(new, key)
