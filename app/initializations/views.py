"""/v1/initializations: the meta-learned starting points and which one is in service.

Promotion and rollback act on the caller's tenant's own default (admin keys) or, with
`?scope=global`, on the version every tenant without a default of its own adapts from
(operator keys).
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query

from app.core.errors import Forbidden
from app.core.schemas import ADMIN, KEYED, problem_responses
from app.deps import AdminDep, Caller, SessionDep, TenantDep
from app.initializations import audit, promotion, public
from app.initializations.schemas import (
    InitializationList,
    InitializationPublic,
    PromotionList,
    PromotionRecord,
    PromotionResult,
)

router = APIRouter(prefix="/v1/initializations", tags=["initializations"])


admin_router = APIRouter(prefix="/v1/admin", tags=["admin"])
_CHANGE_CODES = {
    409: (
        "initialization_not_ready",
        "initialization 'omniglot-conv4-v8' is failed, not ready",
    )
}
_PROMOTE_PROBLEMS = problem_responses(*ADMIN, 404, 409, 422, codes=_CHANGE_CODES)
_ROLLBACK_PROBLEMS = problem_responses(
    *ADMIN,
    409,
    422,
    codes={
        409: (
            "no_previous_version",
            "omniglot-conv4-v7 is the first version ever promoted; there is nothing to roll "
            "back to",
        )
    },
)
_ROLLBACK_VERSION_PROBLEMS = problem_responses(
    *ADMIN,
    404,
    409,
    422,
    codes={
        409: (
            "not_active",
            "omniglot-conv4-v7 is not the active version (omniglot-conv4-v8 is); only the active "
            "version can be rolled back",
        )
    },
)

Scope = Annotated[
    Literal["tenant", "global"],
    Query(
        description="'tenant' (default): your tenant's own default, with an admin key; "
        "'global': the version served to every tenant without its own default, with an "
        "operator key."
    ),
]


def _check_scope(caller: Caller, scope: str) -> None:
    if scope == "global" and not caller.is_operator:
        raise Forbidden(
            "changing the global default needs an operator key "
            "(`maml-serve keys create --tenant NAME --operator`); without ?scope=global the "
            "change applies to your tenant only"
        )


@router.get("", response_model=InitializationList, responses=problem_responses(*KEYED))
def list_initializations(caller: TenantDep, session: SessionDep) -> InitializationList:
    """The global versions and your tenant's own, newest first, with the one in force for you."""
    return public.initialization_list(session=session, tenant_id=caller.tenant_id)


@router.get(
    "/{version}",
    response_model=InitializationPublic,
    responses=problem_responses(*KEYED, 404),
)
def get_initialization(
    caller: TenantDep, session: SessionDep, version: str
) -> InitializationPublic:
    """One version by name (404 for another tenant's, as for an unknown one)."""
    return public.initialization_one(session=session, tenant_id=caller.tenant_id, version=version)


@admin_router.post(
    "/initializations/{version}/promote",
    response_model=PromotionResult,
    responses=_PROMOTE_PROBLEMS,
)
def promote(
    caller: AdminDep, session: SessionDep, version: str, scope: Scope = "tenant"
) -> PromotionResult:
    """Make a version the one new tasks adapt from: your tenant's, or everyone's (operator)."""
    _check_scope(caller, scope)
    if scope == "global":
        row, previous = promotion.promote(
            session=session, version=version, actor=caller.actor, tenant_id=caller.tenant_id
        )
    else:
        row, previous = promotion.promote_for_tenant(
            session=session, version=version, actor=caller.actor, tenant_id=caller.tenant_id
        )
    return PromotionResult(active_version=row.version, previous_version=previous)


@admin_router.post(
    "/initializations/rollback", response_model=PromotionResult, responses=_ROLLBACK_PROBLEMS
)
def rollback(caller: AdminDep, session: SessionDep, scope: Scope = "tenant") -> PromotionResult:
    """Return to the version that was in force before the current one."""
    _check_scope(caller, scope)
    if scope == "global":
        row, previous = promotion.rollback(
            session=session, actor=caller.actor, tenant_id=caller.tenant_id
        )
    else:
        row, previous = promotion.rollback_for_tenant(
            session=session, actor=caller.actor, tenant_id=caller.tenant_id
        )
    return PromotionResult(active_version=row.version, previous_version=previous)


@admin_router.post(
    "/initializations/{version}/rollback",
    response_model=PromotionResult,
    responses=_ROLLBACK_VERSION_PROBLEMS,
)
def rollback_version(
    caller: AdminDep, session: SessionDep, version: str, scope: Scope = "tenant"
) -> PromotionResult:
    """Roll back `version` (which must be the one in force) to the version before it."""
    _check_scope(caller, scope)
    if scope == "global":
        row, previous = promotion.rollback(
            session=session, version=version, actor=caller.actor, tenant_id=caller.tenant_id
        )
    else:
        row, previous = promotion.rollback_for_tenant(
            session=session, version=version, actor=caller.actor, tenant_id=caller.tenant_id
        )
    return PromotionResult(active_version=row.version, previous_version=previous)


@admin_router.get(
    "/promotions", response_model=PromotionList, responses=problem_responses(*ADMIN, 422)
)
def list_promotions(
    caller: AdminDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> PromotionList:
    """Changes of the global version and of your tenant's default (every tenant's: operator)."""
    rows = audit.list_promotions(
        session=session, limit=limit, tenant_id=caller.tenant_id, everything=caller.is_operator
    )
    return PromotionList(items=[PromotionRecord.model_validate(row) for row in rows])
