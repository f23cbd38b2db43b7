"""/v1/admin: datasets, meta-training runs, and which initialization is in service."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, Response, UploadFile, status

from app import crud, datasets, training_service
from app.deps import AdminDep, DispatcherDep, RuntimeDep, SessionDep
from app.schemas import CleanText, Problem
from app.schemas_admin import (
    DatasetList,
    DatasetPublic,
    MetaTrainingCreate,
    MetaTrainingList,
    MetaTrainingPublic,
    OmniglotIn,
    PromotionList,
    PromotionRecord,
    PromotionResult,
)

router = APIRouter(prefix="/v1/admin", tags=["admin"])

_PROBLEMS: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem, "content": {"application/problem+json": {}}}
    for code in (401, 403, 404, 409, 413, 422, 503)
}


# --- datasets ---------------------------------------------------------------------------------


@router.post(
    "/datasets",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetPublic,
    responses=_PROBLEMS,
)
def upload_dataset(
    caller: AdminDep,
    session: SessionDep,
    runtime: RuntimeDep,
    response: Response,
    file: Annotated[UploadFile, File(description="A zip: one folder per class (or group/class).")],
    name: Annotated[CleanText, Form(min_length=1, max_length=200)],
    min_classes: Annotated[
        int, Form(ge=2, le=1000, description="The largest way count it will be used for.")
    ] = 5,
) -> DatasetPublic:
    """Upload a meta-training dataset; it is checked in full before it is kept."""
    row = datasets.create_dataset(
        session=session,
        runtime=runtime,
        tenant_id=caller.tenant_id,
        name=name,
        source=file.file,
        min_classes=min_classes,
        details={"source": "upload", "file": file.filename},
    )
    response.headers["Location"] = f"/v1/admin/datasets/{row.id}"
    return DatasetPublic.model_validate(row)


@router.post(
    "/datasets/omniglot",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetPublic,
    responses=_PROBLEMS,
)
def register_omniglot(
    caller: AdminDep, session: SessionDep, runtime: RuntimeDep, response: Response, body: OmniglotIn
) -> DatasetPublic:
    """Register the Omniglot background zip configured on the server (MAML_SERVE_OMNIGLOT_PATH)."""
    row = datasets.register_omniglot(
        session=session, runtime=runtime, tenant_id=caller.tenant_id, name=body.name
    )
    response.headers["Location"] = f"/v1/admin/datasets/{row.id}"
    return DatasetPublic.model_validate(row)


@router.get("/datasets", response_model=DatasetList, responses=_PROBLEMS)
def list_datasets(caller: AdminDep, session: SessionDep) -> DatasetList:
    """Datasets with their class and image counts, newest first."""
    rows = datasets.list_datasets(session=session, tenant_id=caller.tenant_id)
    return DatasetList(items=[DatasetPublic.model_validate(row) for row in rows])


@router.get("/datasets/{dataset_id}", response_model=DatasetPublic, responses=_PROBLEMS)
def get_dataset(caller: AdminDep, session: SessionDep, dataset_id: uuid.UUID) -> DatasetPublic:
    """One dataset."""
    return DatasetPublic.model_validate(
        datasets.get_dataset(session=session, tenant_id=caller.tenant_id, dataset_id=dataset_id)
    )


@router.delete(
    "/datasets/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT, responses=_PROBLEMS
)
def delete_dataset(
    caller: AdminDep, session: SessionDep, runtime: RuntimeDep, dataset_id: uuid.UUID
) -> None:
    """Delete a dataset and its zip (409 while a run uses it); finished runs keep its name."""
    row = datasets.get_dataset(session=session, tenant_id=caller.tenant_id, dataset_id=dataset_id)
    datasets.delete_dataset(session=session, runtime=runtime, dataset=row)


# --- meta-training runs -----------------------------------------------------------------------


@router.post(
    "/meta-trainings",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=MetaTrainingPublic,
    responses=_PROBLEMS,
)
def start_meta_training(
    caller: AdminDep,
    session: SessionDep,
    runtime: RuntimeDep,
    dispatcher: DispatcherDep,
    response: Response,
    body: MetaTrainingCreate,
) -> MetaTrainingPublic:
    """Start a meta-training run on the train queue."""
    job = training_service.start_meta_training(
        session=session,
        runtime=runtime,
        dispatcher=dispatcher,
        tenant_id=caller.tenant_id,
        body=body,
    )
    response.headers["Location"] = f"/v1/admin/meta-trainings/{job.id}"
    return training_service.meta_training_public(job)


@router.get("/meta-trainings", response_model=MetaTrainingList, responses=_PROBLEMS)
def list_meta_trainings(caller: AdminDep, session: SessionDep) -> MetaTrainingList:
    """The latest 100 runs, newest first."""
    jobs = training_service.list_meta_trainings(session=session, tenant_id=caller.tenant_id)
    return MetaTrainingList(items=[training_service.meta_training_public(j) for j in jobs])


@router.get("/meta-trainings/{job_id}", response_model=MetaTrainingPublic, responses=_PROBLEMS)
def get_meta_training(
    caller: AdminDep, session: SessionDep, job_id: uuid.UUID
) -> MetaTrainingPublic:
    """State, progress (iteration of total, ETA), the curve so far and the result."""
    job = training_service.get_meta_training(
        session=session, tenant_id=caller.tenant_id, job_id=job_id
    )
    return training_service.meta_training_public(job)


@router.get(
    "/meta-trainings/{job_id}/curve.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, **_PROBLEMS},
)
def get_curve(caller: AdminDep, session: SessionDep, job_id: uuid.UUID) -> Response:
    """The curve so far: meta-train loss and validation accuracy against iteration."""
    job = training_service.get_meta_training(
        session=session, tenant_id=caller.tenant_id, job_id=job_id
    )
    return Response(content=training_service.curve_png(job), media_type="image/png")


@router.post(
    "/meta-trainings/{job_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=MetaTrainingPublic,
    responses=_PROBLEMS,
)
def cancel_meta_training(
    caller: AdminDep, session: SessionDep, job_id: uuid.UUID
) -> MetaTrainingPublic:
    """Stop a run at its next checkpoint (a queued run is cancelled at once)."""
    job = training_service.get_meta_training(
        session=session, tenant_id=caller.tenant_id, job_id=job_id
    )
    return training_service.meta_training_public(
        training_service.cancel_meta_training(session=session, job=job)
    )


# --- versions in service ----------------------------------------------------------------------


@router.post(
    "/initializations/{version}/promote", response_model=PromotionResult, responses=_PROBLEMS
)
def promote(caller: AdminDep, session: SessionDep, version: str) -> PromotionResult:
    """Make a version the one new tasks adapt from."""
    row, previous = training_service.promote(
        session=session, version=version, actor=f"key:{caller.key_id}"
    )
    return PromotionResult(active_version=row.version, previous_version=previous)


@router.post("/initializations/rollback", response_model=PromotionResult, responses=_PROBLEMS)
def rollback(caller: AdminDep, session: SessionDep) -> PromotionResult:
    """Return to the version that was active before the current one."""
    row, previous = training_service.rollback(session=session, actor=f"key:{caller.key_id}")
    return PromotionResult(active_version=row.version, previous_version=previous)


@router.post(
    "/initializations/{version}/rollback", response_model=PromotionResult, responses=_PROBLEMS
)
def rollback_version(caller: AdminDep, session: SessionDep, version: str) -> PromotionResult:
    """Roll back `version` (which must be the active one) to the version active before it."""
    row, previous = training_service.rollback(
        session=session, version=version, actor=f"key:{caller.key_id}"
    )
    return PromotionResult(active_version=row.version, previous_version=previous)


@router.get("/promotions", response_model=PromotionList, responses=_PROBLEMS)
def list_promotions(
    _caller: AdminDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> PromotionList:
    """Every change of the active version (first start-up, promote, auto-promote, rollback)."""
    rows = crud.list_promotions(session=session, limit=limit)
    return PromotionList(items=[PromotionRecord.model_validate(row) for row in rows])
