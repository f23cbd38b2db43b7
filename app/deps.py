"""FastAPI dependencies as Annotated aliases: runtime, settings, session, caller.

Dependencies that only look at objects in memory are `async def`: FastAPI runs every plain `def`
dependency on the thread pool, a hand-off per dependency per request. Those that touch the
database stay `def`.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.core.config import Settings
from app.core.errors import Forbidden, ProblemError, Unauthorized
from app.core.limits import Limits
from app.core.media import request_media_type
from app.core.runtime import Runtime
from app.core.security import hash_key
from app.jobs.dispatch import Dispatcher
from app.keys import service as keys
from app.models import Task
from app.tasks import service as tasks

_bearer = HTTPBearer(auto_error=False, description="An API key from `maml-serve keys create`.")


async def get_runtime(request: Request) -> Runtime:
    """The process's runtime, built by the app's lifespan."""
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def get_settings_dep(runtime: RuntimeDep) -> Settings:
    """The app's settings."""
    return runtime.settings


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


async def get_dispatcher(request: Request) -> Dispatcher:
    """Where committed jobs are sent."""
    dispatcher: Dispatcher = request.app.state.dispatcher
    return dispatcher


DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]


def get_session(runtime: RuntimeDep) -> Iterator[Session]:
    """One session per request, closed (and rolled back if uncommitted) at the end."""
    with runtime.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


@dataclass(frozen=True)
class Caller:
    """Who is calling: their tenant and the key's scopes."""

    tenant_id: uuid.UUID
    key_id: uuid.UUID
    scopes: tuple[str, ...]

    @property
    def is_operator(self) -> bool:
        """Whether the key may change what serves every tenant (the global default version)."""
        return "operator" in self.scopes

    @property
    def actor(self) -> str:
        """How the audit trail names this caller."""
        return f"key:{self.key_id}"


def _limits(request: Request) -> Limits:
    limits: Limits = request.app.state.limits
    return limits


def _missing_key() -> Unauthorized:
    return Unauthorized(
        "missing API key; send the header 'Authorization: Bearer <key>' (create one with "
        "`maml-serve keys create --tenant NAME`)",
        code="missing_api_key",
    )


def _look_up(runtime: Runtime, key: str) -> Caller | None:
    """The caller a key belongs to, or None for an unknown, revoked or expired key."""
    # A session of its own, closed before the body is read: a slow upload holds no connection.
    with runtime.sessions() as session:
        row = keys.authenticate(
            session=session, key=key, pepper=runtime.settings.api_key_pepper.get_secret_value()
        )
        if row is None:
            return None
        return Caller(tenant_id=row.tenant_id, key_id=row.id, scopes=tuple(row.scopes))


async def admit_caller(
    request: Request,
    runtime: RuntimeDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> AsyncIterator[Caller]:
    """Count the request against its key's rate and in-flight limits (429 when over one), then
    authenticate the key (401; 429 for an address with too many failed attempts).

    The limits are counted by the key's hash, before it is looked up: a request over a limit
    costs no thread and no query, so a crowd of them cannot queue ahead of other tenants.
    """
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise _missing_key()
    limits = _limits(request)
    address = request.client.host if request.client is not None else "unknown"
    await limits.check_address(address)
    token = hash_key(credentials.credentials, runtime.settings.api_key_pepper.get_secret_value())
    await limits.admit_key(token)
    try:
        caller = await run_in_threadpool(_look_up, runtime, credentials.credentials)
        if caller is None:
            await limits.record_failure(address)
            raise Unauthorized(
                "the API key is not valid or has been revoked; check it or create a new one"
            )
        yield caller
    finally:
        limits.release_key(token)


async def require_user(caller: Annotated[Caller, Depends(admit_caller)]) -> Caller:
    """Any valid key."""
    return caller


async def require_admin(caller: Annotated[Caller, Depends(admit_caller)]) -> Caller:
    """A key with the admin scope; 403 otherwise."""
    if "admin" not in caller.scopes:
        raise Forbidden(
            "this route needs an admin key (`maml-serve keys create --tenant NAME --admin`)"
        )
    return caller


TenantDep = Annotated[Caller, Depends(require_user)]
AdminDep = Annotated[Caller, Depends(require_admin)]


def get_owned_task(caller: TenantDep, session: SessionDep, task_id: uuid.UUID) -> Task:
    """The caller's task named in the path, or 404 (malformed, unknown or another tenant's).

    Routes that also read a body depend on this first, so a missing task is a 404 whatever the
    body holds, and the body is not parsed for nothing.
    """
    task = tasks.get_task(session=session, tenant_id=caller.tenant_id, task_id=task_id)
    # Ends the read transaction: its connection goes back to the pool while the body is read.
    session.commit()
    return task


OwnedTaskDep = Annotated[Task, Depends(get_owned_task)]


async def require_json_if_body(request: Request, _task: OwnedTaskDep) -> None:
    """415 when a request that takes an optional JSON body sends a body of another media type."""
    # Depending on the task keeps the order: an unknown or malformed id is a 404 first.
    has_body = request.headers.get("content-length", "0") not in ("", "0") or (
        "transfer-encoding" in request.headers
    )
    media = request_media_type(request)
    if has_body and not (media == "application/json" or media.endswith("+json")):
        raise ProblemError(
            f"send the body as application/json (or no body); got {media or 'no content type'}",
            status=415,
            code="unsupported_media_type",
        )


JsonIfBodyDep = Annotated[None, Depends(require_json_if_body)]
