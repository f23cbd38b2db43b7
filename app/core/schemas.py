"""Request and response bodies of the v1 API; responses never carry internal fields."""

from __future__ import annotations

import unicodedata
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field


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


class Problem(BaseModel):
    """An RFC 9457 problem document."""

    type: str
    title: str
    status: int
    code: str = Field(description="Machine-readable error code, e.g. invalid_image.")
    detail: str = Field(description="What went wrong and what to change.")
    instance: str | None = None


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` documenting problem+json bodies for these statuses."""
    return {
        status: {"model": Problem, "content": {"application/problem+json": {}}}
        for status in statuses
    }


class ErrorInfo(BaseModel):
    """Why a job or task failed."""

    code: str
    message: str


def multipart_body(fields: dict[str, Any], required: list[str]) -> dict[str, Any]:
    """OpenAPI extra for a route that reads a multipart (or the matching JSON) body itself."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "properties": fields, "required": required}
                },
                "application/json": {"schema": {"$ref": "#/components/schemas/SupportSetJson"}}
                if "labels" in fields
                else {"schema": {"$ref": "#/components/schemas/QueriesJson"}},
            },
        }
    }


FILES = {"type": "array", "items": {"type": "string", "format": "binary"}}
