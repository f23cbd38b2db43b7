"""/v1/tasks/{id}/predictions: query images in, labels and probabilities out."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from app.core.prediction_batcher import Expected
from app.core.schemas import (
    BODY,
    DOCUMENTED_MAX_PAGE,
    FILES,
    KEYED,
    PNG_BASE64,
    multipart_body,
    problem_responses,
)
from app.deps import OwnedTaskDep, RuntimeDep, SessionDep, TenantDep
from app.predictions import service as predicting
from app.predictions.schemas import (
    LabelProbability,
    PredictionPage,
    PredictionPublic,
    PredictionRecord,
    PredictionResult,
)
from app.tasks import service as tasks
from app.uploads.bodies import QueriesIn, read_queries
from app.uploads.schemas import UNKNOWN_THRESHOLD_HELP

router = APIRouter(prefix="/v1/tasks", tags=["predictions"])
_PREDICT_PROBLEMS = problem_responses(
    *KEYED,
    *BODY,
    404,
    409,
    415,
    codes={
        409: ("not_adapted_yet", "the task is still adapting; retry after Retry-After seconds"),
        503: (
            "artifact_corrupt",
            "the initialization this task was adapted from failed its integrity check; "
            "try again later",
        ),
    },
)
_LIST_PROBLEMS = problem_responses(*KEYED, 404, 422)
_TOP_K = {
    "type": "integer",
    "minimum": 1,
    "description": "Also list the k most probable labels of each image.",
}
_THRESHOLD = {
    "type": "number",
    "minimum": 0,
    "maximum": 1,
    "description": UNKNOWN_THRESHOLD_HELP,
}
_QUERY_BODY = {
    **multipart_body(
        {"images": FILES, "top_k": _TOP_K, "unknown_threshold": _THRESHOLD},
        ["images"],
        example={"images": ["query-1.png", "query-2.png"], "top_k": 2},
        json_example={"images": [PNG_BASE64], "top_k": 2},
    ),
    # Read by the route itself, like the body (they win over the same fields in the body).
    "parameters": [
        {"name": "top_k", "in": "query", "required": False, "schema": _TOP_K},
        {"name": "unknown_threshold", "in": "query", "required": False, "schema": _THRESHOLD},
    ],
}


async def _queries_of_task(request: Request, _task: OwnedTaskDep) -> QueriesIn:
    # Depends on the task, so an unknown or malformed id is a 404 before the body is read.
    return await read_queries(request)


async def _expected(task: OwnedTaskDep, runtime: RuntimeDep) -> AsyncIterator[Expected | None]:
    # Before the body is read and decoded, so a batch already started can wait for this request;
    # withdrawn as soon as the route ends, whatever happened.
    expected = predicting.expect_prediction(runtime, task)
    try:
        yield expected
    finally:
        if expected is not None:
            expected.withdraw()


@router.post(
    "/{task_id}/predictions",
    response_model=PredictionResult,
    responses=_PREDICT_PROBLEMS,
    openapi_extra=_QUERY_BODY,
)
def create_predictions(
    task: OwnedTaskDep,
    expected: Annotated[Expected | None, Depends(_expected, scope="function")],
    queries: Annotated[QueriesIn, Depends(_queries_of_task)],
    session: SessionDep,
    runtime: RuntimeDep,
) -> PredictionResult:
    """Predict labels for query images with the task's adapted model (409 while it is adapting)."""
    done = predicting.predict(
        session=session, runtime=runtime, task=task, queries=queries, expected=expected
    )
    return PredictionResult(
        task_id=task.id,
        adapted_model_id=done.model_row.id,
        request_id=done.request_id,
        unknown_threshold=done.threshold,
        unknown_threshold_source=done.threshold_source,  # type: ignore[arg-type]
        predictions=[
            PredictionPublic(
                id=p.id,
                label=p.label,
                probabilities=p.probabilities,
                top_k=[LabelProbability(label=label, probability=pr) for label, pr in p.top_k],
                score=p.score,
                image_sha256=p.image_sha256,
            )
            for p in done.predictions
        ],
    )


@router.get("/{task_id}/predictions", response_model=PredictionPage, responses=_LIST_PROBLEMS)
def list_predictions(
    caller: TenantDep,
    session: SessionDep,
    runtime: RuntimeDep,
    task_id: uuid.UUID,
    limit: Annotated[
        int | None,
        Query(
            ge=1,
            json_schema_extra={"maximum": DOCUMENTED_MAX_PAGE},
            description="Page size (default 50; larger than the server's maximum: cut to it).",
        ),
    ] = None,
    cursor: str | None = None,
) -> PredictionPage:
    """The task's recorded predictions, newest first."""
    tasks.get_task(session=session, tenant_id=caller.tenant_id, task_id=task_id)
    size = min(limit or runtime.settings.page_size, runtime.settings.max_page_size)
    page = predicting.list_predictions(
        session=session, tenant_id=caller.tenant_id, task_id=task_id, limit=size, cursor=cursor
    )
    return PredictionPage(
        items=[PredictionRecord.model_validate(p) for p in page.items], next_cursor=page.next_cursor
    )
