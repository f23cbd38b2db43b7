"""/v1/admin/datasets: the data a tenant's admin meta-trains on."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Body, File, Form, Response, UploadFile, status

from app.core.schemas import ADMIN, BODY, CleanText, problem_responses
from app.datasets import service as datasets
from app.datasets.schemas import DatasetList, DatasetPublic, OmniglotIn
from app.deps import AdminDep, RuntimeDep, SessionDep

router = APIRouter(prefix="/v1/admin", tags=["admin"])
_NAME_TAKEN = ("dataset_name_taken", "a dataset named 'omniglot-background' exists already")
_UPLOAD_PROBLEMS = problem_responses(*ADMIN, *BODY, 409, codes={409: _NAME_TAKEN})
_OMNIGLOT_PROBLEMS = problem_responses(
    *ADMIN,
    *BODY,
    409,
    codes={
        409: _NAME_TAKEN,
        503: (
            "omniglot_not_configured",
            "this server has no Omniglot zip configured (MAML_SERVE_OMNIGLOT_PATH)",
        ),
    },
)
_LIST_PROBLEMS = problem_responses(*ADMIN)
_ONE_PROBLEMS = problem_responses(*ADMIN, 404)
_DELETE_PROBLEMS = problem_responses(
    *ADMIN,
    404,
    409,
    codes={409: ("dataset_in_use", "a meta-training run is using this dataset; wait or cancel it")},
)


@router.post(
    "/datasets",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetPublic,
    responses=_UPLOAD_PROBLEMS,
    openapi_extra={
        "requestBody": {
            "content": {
                "multipart/form-data": {
                    "example": {"file": "letters.zip", "name": "letters", "min_classes": 20}
                }
            }
        }
    },
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
    responses=_OMNIGLOT_PROBLEMS,
)
def register_omniglot(
    caller: AdminDep,
    session: SessionDep,
    runtime: RuntimeDep,
    response: Response,
    body: Annotated[
        OmniglotIn | None,
        Body(
            openapi_examples={
                "default": {"summary": "No body: the default name", "value": {}},
                "named": {"summary": "A name of your own", "value": {"name": "omniglot-2"}},
            }
        ),
    ] = None,
) -> DatasetPublic:
    """Register the server's Omniglot zip (MAML_SERVE_OMNIGLOT_PATH); the body is optional."""
    row = datasets.register_omniglot(
        session=session,
        runtime=runtime,
        tenant_id=caller.tenant_id,
        name=(body or OmniglotIn()).name,
    )
    response.headers["Location"] = f"/v1/admin/datasets/{row.id}"
    return DatasetPublic.model_validate(row)


@router.get("/datasets", response_model=DatasetList, responses=_LIST_PROBLEMS)
def list_datasets(caller: AdminDep, session: SessionDep) -> DatasetList:
    """Datasets with their class and image counts, newest first."""
    rows = datasets.list_datasets(session=session, tenant_id=caller.tenant_id)
    return DatasetList(items=[DatasetPublic.model_validate(row) for row in rows])


@router.get("/datasets/{dataset_id}", response_model=DatasetPublic, responses=_ONE_PROBLEMS)
def get_dataset(caller: AdminDep, session: SessionDep, dataset_id: uuid.UUID) -> DatasetPublic:
    """One dataset."""
    return DatasetPublic.model_validate(
        datasets.get_dataset(session=session, tenant_id=caller.tenant_id, dataset_id=dataset_id)
    )


@router.delete(
    "/datasets/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT, responses=_DELETE_PROBLEMS
)
def delete_dataset(
    caller: AdminDep, session: SessionDep, runtime: RuntimeDep, dataset_id: uuid.UUID
) -> None:
    """Delete a dataset and its zip (409 while a run uses it); finished runs keep its name."""
    row = datasets.get_dataset(session=session, tenant_id=caller.tenant_id, dataset_id=dataset_id)
    datasets.delete_dataset(session=session, runtime=runtime, dataset=row)
