"""/v1/initializations: the meta-learned starting points and which one is active."""

from __future__ import annotations

from fastapi import APIRouter

from app import crud
from app.deps import SessionDep, TenantDep
from app.schemas import InitializationList, InitializationPublic, problem_responses

router = APIRouter(prefix="/v1/initializations", tags=["initializations"])


@router.get("", response_model=InitializationList, responses=problem_responses(401))
def list_initializations(_caller: TenantDep, session: SessionDep) -> InitializationList:
    """Every version with its metrics, newest first."""
    rows = crud.list_initializations(session=session)
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
        crud.get_initialization(session=session, version=version)
    )
