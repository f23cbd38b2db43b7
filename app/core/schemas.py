"""Request and response bodies of the v1 API; responses never carry internal fields."""

from __future__ import annotations

import unicodedata
from http import HTTPStatus
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, WithJsonSchema

from app.core.config import Settings
from app.core.problems import PROBLEM_JSON


def unstorable_character(text: str) -> str | None:
    """The first character no database column can hold (a control character such as NUL, or a
    lone UTF-16 surrogate from a JSON escape), as ``U+XXXX``; None when the text is clean."""
    for char in text:
        if unicodedata.category(char) in ("Cc", "Cs"):
            return f"U+{ord(char):04X}"
    return None


def invisible_character(text: str) -> str | None:
    """The first invisible format character (bidi controls such as U+202E, zero-width characters,
    the BOM: Unicode category Cf), as ``U+XXXX``; None when there is none.

    Such characters make two different labels look identical to a person, or reorder how one
    is displayed.
    """
    for char in text:
        if unicodedata.category(char) == "Cf":
            return f"U+{ord(char):04X}"
    return None


def _clean_text(value: str) -> str:
    bad = unstorable_character(value)
    if bad is not None:
        raise ValueError(f"contains the character {bad}, which is not allowed in text")
    return value


CleanText = Annotated[str, AfterValidator(_clean_text)]
"""A string without control characters or lone surrogates (both fail as 500s in a database)."""

# Ids and an image the OpenAPI examples share.
TASK_ID = "3f2c7a9e-1b4d-4c8e-9a6f-0d2b5e7c1a90"
JOB_ID = "8a1e4c2b-6d3f-4b7a-9c5e-2f0d1b3a4e6c"
ADAPTED_MODEL_ID = "c7d9e1f3-2a4b-4c6d-8e0f-1a3b5c7d9e2f"
DATASET_ID = "5b7d9f1a-3c5e-4a7b-9d1f-3e5a7c9b1d3f"
KEY_ID = "2d4f6a8c-0e2a-4c6e-8a0c-2e4a6c8e0a2c"
WHEN = "2026-11-29T21:09:03.412Z"
PNG_BASE64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGP4DwABAQEAsTj2FAAAAABJRU5ErkJggg=="
)
"""A PNG of one white pixel, base64-encoded as JSON bodies carry images."""

DOCUMENTED_MAX_STEPS: int = Settings.model_fields["max_steps"].default
"""The largest `steps` the schema shows: the default of max_steps (a server may allow more)."""

DOCUMENTED_MAX_PAGE: int = Settings.model_fields["max_page_size"].default
"""The largest page `limit` the schema shows: the default of max_page_size (larger: cut to it)."""

AdaptMode = Annotated[str, WithJsonSchema({"type": "string", "enum": ["full", "head"]})]
"""'full' or 'head', documented as an enum; the route checks it (422 invalid_mode)."""

AdaptSteps = Annotated[
    StrictInt,
    WithJsonSchema({"type": "integer", "minimum": 0, "maximum": DOCUMENTED_MAX_STEPS}),
]
"""Inner-loop steps, documented with their bounds; the route checks them (422 invalid_steps)."""


class Problem(BaseModel):
    """An RFC 9457 problem document."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "type": "https://maml-serve.dev/problems/not-adapted-yet",
                    "title": "Conflict",
                    "status": 409,
                    "code": "not_adapted_yet",
                    "detail": "the task is still adapting; retry after Retry-After seconds",
                    "instance": "/v1/tasks/3f2c7a9e-1b4d-4c8e-9a6f-0d2b5e7c1a90/predictions",
                }
            ]
        }
    )

    type: str
    title: str
    status: int
    code: str = Field(description="Machine-readable error code, e.g. invalid_image.")
    detail: str = Field(description="What went wrong and what to change.")
    instance: str | None = None


# A short example code and detail per status; a route may name its own (problem_responses).
_PROBLEM_EXAMPLES: dict[int, tuple[str, str, str]] = {
    401: (
        "invalid_api_key",
        "Missing, unknown, revoked or expired API key.",
        "the API key is not valid or has been revoked; check it or create a new one",
    ),
    403: (
        "forbidden",
        "The key lacks the scope this route needs (admin or operator).",
        "this route needs an admin key (`maml-serve keys create --tenant NAME --admin`)",
    ),
    404: (
        "not_found",
        "No such resource for your tenant (malformed, unknown or another tenant's id).",
        "no task 3f2c7a9e-1b4d-4c8e-9a6f-0d2b5e7c1a90",
    ),
    408: (
        "body_timeout",
        "The request body stalled (no part of it arrived for body_read_timeout_seconds).",
        "no part of the request body arrived for 30 s; send the whole body without pausing",
    ),
    409: (
        "conflict",
        "The resource is not in a state that allows this request.",
        "the resource is not in a state that allows this request",
    ),
    413: (
        "payload_too_large",
        "The body, a file or an image is over its limit.",
        "the request body is over the 33554432-byte limit; send fewer or smaller images",
    ),
    415: (
        "unsupported_media_type",
        "The body's media type is not one this route reads.",
        "send multipart/form-data or application/json; got text/plain",
    ),
    422: (
        "validation_error",
        "The request breaks a rule; `code` says which (and `errors` lists each field).",
        "limit: Input should be greater than or equal to 1",
    ),
    429: (
        "rate_limited",
        "Over a per-key rate or in-flight limit, a failed-key throttle or a backlog bound; "
        "retry after Retry-After.",
        "this API key is over 20 requests per second (bursts of 40); slow down",
    ),
    503: (
        "database_unavailable",
        "A dependency (database, broker, initialization) is unavailable; retry after Retry-After.",
        "the database is not reachable right now; try again shortly",
    ),
}

_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before trying again.",
        "schema": {"type": "integer", "minimum": 1},
    }
}

PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
"""Where every problem+json response's schema points (app.main adds Problem to components)."""


def problem_responses(
    *statuses: int, codes: dict[int, tuple[str, str]] | None = None
) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses`: problem+json, the Problem schema and an example for each status."""
    # `codes`: a route's own example code and detail for a status (e.g. 409 not_adapted_yet).
    responses: dict[int | str, dict[str, Any]] = {}
    for status in sorted(set(statuses)):
        code, description, detail = _PROBLEM_EXAMPLES[status]
        if codes and status in codes:
            code, detail = codes[status]
        try:
            title = HTTPStatus(status).phrase
        except ValueError:
            title = "Error"
        example = {
            "type": f"https://maml-serve.dev/problems/{code.replace('_', '-')}",
            "title": title,
            "status": status,
            "code": code,
            "detail": detail,
            "instance": "/v1/tasks",
        }
        response: dict[str, Any] = {
            "description": description,
            "content": {PROBLEM_JSON: {"schema": PROBLEM_REF, "example": example}},
        }
        if status in (429, 503):
            response["headers"] = _RETRY_AFTER
        responses[status] = response
    return responses


KEYED = (401, 429, 503)
"""What any route behind an API key can answer: no or a bad key, a limit, the database down."""

ADMIN = (*KEYED, 403)
"""KEYED, and 403 for a key without the admin scope."""

BODY = (408, 413, 422)
"""What a route that reads a body can answer: it stalled, it is too large, it breaks a rule."""


class ErrorInfo(BaseModel):
    """Why a job or task failed."""

    code: str
    message: str


def multipart_body(
    fields: dict[str, Any],
    required: list[str],
    *,
    example: dict[str, Any],
    json_example: dict[str, Any],
) -> dict[str, Any]:
    """OpenAPI extra for a route that reads a multipart (or the matching JSON) body itself."""
    json_schema = "SupportSetJson" if "labels" in fields else "QueriesJson"
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "properties": fields, "required": required},
                    "example": example,
                },
                "application/json": {
                    "schema": {"$ref": f"#/components/schemas/{json_schema}"},
                    "example": json_example,
                },
            },
        }
    }


FILES = {"type": "array", "items": {"type": "string", "format": "binary"}}
