"""The JSON forms of the two image bodies: a support set and a batch of queries."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictInt, WithJsonSchema

from app.core.schemas import PNG_BASE64, AdaptMode, AdaptSteps, CleanText

UNKNOWN_THRESHOLD_HELP = (
    "Answer 'unknown' for images whose calibrated score is below this (0..1; 0 never answers "
    "'unknown'). Default: the task's own, else the initialization's calibrated default."
)


class SupportExampleJson(BaseModel):
    """One support image as JSON."""

    label: CleanText
    image: str = Field(description="Base64-encoded PNG or JPEG bytes.")


class SupportSetJson(BaseModel):
    """A support set sent as JSON instead of multipart."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "examples": [
                        {"label": "alpha", "image": PNG_BASE64},
                        {"label": "beta", "image": PNG_BASE64},
                    ],
                    "name": "letters",
                    "mode": "head",
                    "steps": 10,
                }
            ]
        },
    )

    examples: list[SupportExampleJson]
    name: CleanText | None = None
    initialization: str | None = Field(
        default=None,
        max_length=100,
        description="The initialization version to adapt from (GET /v1/initializations lists "
        "them, with each one's domain and input); default: your tenant's default.",
    )
    mode: AdaptMode | None = Field(
        default=None,
        description="'full' adapts every layer, 'head' the head only; default: the "
        "initialization's own (config.default_mode: 'full' for characters, 'head' for photos).",
    )
    steps: AdaptSteps | None = Field(
        default=None,
        description="Inner-loop steps; default: the initialization's own (chosen per task from "
        "the support set where config.step_candidates lists counts).",
    )
    unknown_threshold: float | None = Field(
        default=None,
        description="This task's default 'unknown' threshold on prediction scores (0..1; "
        "0 never answers 'unknown'); default: the initialization's calibrated one.",
        json_schema_extra={"minimum": 0, "maximum": 1},
    )


class QueriesJson(BaseModel):
    """Query images sent as JSON instead of multipart."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"images": [PNG_BASE64], "top_k": 2}]},
    )

    images: list[str] = Field(description="Base64-encoded PNG or JPEG bytes, one per query image.")
    top_k: Annotated[StrictInt, WithJsonSchema({"type": "integer", "minimum": 1})] | None = Field(
        default=None, description="Also list the k most probable labels of each image."
    )
    unknown_threshold: float | None = Field(
        default=None,
        description=UNKNOWN_THRESHOLD_HELP,
        json_schema_extra={"minimum": 0, "maximum": 1},
    )
