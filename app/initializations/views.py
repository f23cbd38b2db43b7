"""/v1/initializations: the meta-learned starting points and which one is active."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from app.core.schemas import problem_responses
from app.deps import AdminDep, SessionDep, TenantDep
from app.initializations import audit, promotion, registry
from app.initializations.schemas import (
    InitializationList,
    InitializationPublic,
    PromotionList,
    PromotionRecord,
    PromotionResult,
)

router = APIRouter(prefix="/v1/initializations", tags=["initializations"])


admin_router = APIRouter(prefix="/v1/admin", tags=["admin"])
_PROBLEMS = problem_responses(401, 403, 404, 409, 413, 422, 503)


@router.get("", response_model=InitializationList, responses=problem_responses(401))
def list_initializations(_caller: TenantDep, session: SessionDep) -> InitializationList:
    """Every version with its metrics, newest first."""
    rows = registry.list_initializations(session=session)
    items = [InitializationPublic.model_validate(row) for row in rows]
    active = next((row.version for row in rows if row.is_active), None)
    return InitializationList(items=items, active_version=active)


@router.get(
    "/{version}",
    response_model=InitializationPublic,
    responses=problem_responses(401, 404),
)
def get_initialization(
    _caller: TenantDep, session: SessionDep, version: str
) -> InitializationPublic:
    """One version by name."""
    return InitializationPublic.model_validate(
        registry.get_initialization(session=session, version=version)
    )


@admin_router.post(
    "/initializations/{version}/promote", response_model=PromotionResult, responses=_PROBLEMS
)
def promote(caller: AdminDep, session: SessionDep, version: str) -> PromotionResult:
    """Make a version the one new tasks adapt from."""
    row, previous = promotion.promote(
        session=session, version=version, actor=f"key:{caller.key_id}"
    )
    return PromotionResult(active_version=row.version, previous_version=previous)


@admin_router.post("/initializations/rollback", response_model=PromotionResult, responses=_PROBLEMS)
def rollback(caller: AdminDep, session: SessionDep) -> PromotionResult:
    """Return to the version that was active before the current one."""
    row, previous = promotion.rollback(session=session, actor=f"key:{caller.key_id}")
    return PromotionResult(active_version=row.version, previous_version=previous)


@admin_router.post(
    "/initializations/{version}/rollback", response_model=PromotionResult, responses=_PROBLEMS
)
def rollback_version(caller: AdminDep, session: SessionDep, version: str) -> PromotionResult:
    """Roll back `version` (which must be the active one) to the version active before it."""
    row, previous = promotion.rollback(
        session=session, version=version, actor=f"key:{caller.key_id}"
    )
    return PromotionResult(active_version=row.version, previous_version=previous)


@admin_router.get("/promotions", response_model=PromotionList, responses=_PROBLEMS)
def list_promotions(
    _caller: AdminDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> PromotionList:
    """Every change of the active version (first start-up, promote, auto-promote, rollback)."""
    rows = audit.list_promotions(session=session, limit=limit)
    return PromotionList(items=[PromotionRecord.model_validate(row) for row in rows])
