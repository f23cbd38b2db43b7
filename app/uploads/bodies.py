"""Reading support sets and query images from multipart or JSON bodies, fully checked."""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException

from app.core.config import Settings
from app.core.errors import InvalidRequest, PayloadTooLarge, ProblemError
from app.core.images import CheckedImage, check_image
from app.core.media import request_media_type
from app.core.runtime import Runtime
from app.core.schemas import invisible_character, unstorable_character
from app.uploads.schemas import QueriesJson, SupportSetJson

MULTIPART = "multipart/form-data"
JSON = "application/json"


@dataclass(frozen=True)
class SupportSetIn:
    """A validated support set: images with one label each, and the adaptation options."""

    images: list[CheckedImage]
    labels: list[str]
    name: str | None
    # None: the initialization's default mode.
    mode: str | None
    steps: int | None
    unknown_threshold: float | None = None
    # A version name; None: the tenant's default.
    initialization: str | None = None


@dataclass(frozen=True)
class QueriesIn:
    """Validated query images, the requested top-k and "unknown" threshold."""

    images: list[CheckedImage]
    top_k: int | None
    unknown_threshold: float | None = None


@dataclass(frozen=True)
class _RawImage:
    data: bytes
    what: str


def _settings(request: Request) -> Settings:
    runtime: Runtime = request.app.state.runtime
    return runtime.settings


def _media_type(request: Request) -> str:
    media = request_media_type(request)
    if media not in (MULTIPART, JSON):
        raise ProblemError(
            f"send {MULTIPART} (file parts 'images') or {JSON}; got {media or 'no content type'}",
            status=415,
            code="unsupported_media_type",
        )
    return media


async def _form(request: Request, max_files: int) -> FormData:
    try:
        # One more file than allowed is enough to tell "too many" apart from "just right".
        return await request.form(
            max_files=max_files + 1, max_fields=2 * max_files + 16, max_part_size=64 * 1024
        )
    except HTTPException as exc:
        if "Too many files" in str(exc.detail):
            raise InvalidRequest(
                f"too many images; at most {max_files} are allowed per request",
                code="too_many_images",
            ) from None
        raise InvalidRequest(
            f"the multipart body could not be parsed: {exc.detail}", code="invalid_multipart"
        ) from None


async def _upload_bytes(upload: UploadFile, what: str, max_bytes: int) -> bytes:
    if upload.size is not None and upload.size > max_bytes:
        raise PayloadTooLarge(
            f"{what} is {upload.size} bytes; the limit is {max_bytes} bytes per image",
            code="file_too_large",
        )
    return await upload.read()


# A JSON string (escapes included), replaced by one character before values are counted.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')


def _values(raw: bytes) -> int:
    # Every value after the first in an array or object follows a comma. (Deep nesting without
    # commas fails fast, as too deep for the parser.)
    return raw.count(b",") + 1


def _parse_json(raw: bytes, max_values: int, max_text_chars: int) -> Any:
    # Counted before parsing: a document of millions of tiny values costs far more to parse and
    # validate than its bytes suggest. Commas inside strings (only labels and names hold any)
    # inflate the plain count, so a body over the limit by less than the text it may hold is
    # counted again without its strings.
    values = _values(raw)
    if values > max_values and values <= max_values + max_text_chars:
        values = _values(_JSON_STRING.sub(b"0", raw))
    if values > max_values:
        raise InvalidRequest(
            f"the JSON body holds about {values} values; at most {max_values} are allowed",
            code="too_many_json_values",
        )
    try:
        return json.loads(raw)
    # ValueError covers JSONDecodeError, UnicodeDecodeError and integers over Python's digit
    # limit; RecursionError is a deeply nested document.
    except json.JSONDecodeError as exc:
        raise InvalidRequest(
            f"the body is not valid JSON (line {exc.lineno}, column {exc.colno})",
            code="invalid_json",
        ) from None
    except (ValueError, RecursionError):
        raise InvalidRequest("the body is not valid JSON", code="invalid_json") from None


async def _json(request: Request, settings: Settings) -> Any:
    # Off the event loop: parsing a body of up to max_body_bytes takes long enough to stall it.
    text = settings.max_support_images * (settings.max_label_length + 1) + 256
    return await run_in_threadpool(
        _parse_json, await request.body(), settings.max_json_values, text
    )


def _json_model(model: type[SupportSetJson] | type[QueriesJson], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidRequest(f"{where}: {first['msg']}", code="validation_error") from None


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{what} is not valid base64", code="invalid_base64") from None


def _check_count(count: int, limit: int, what: str) -> None:
    if count == 0:
        raise InvalidRequest(
            f"no {what} images were sent; send one file part 'images' per image", code="no_images"
        )
    if count > limit:
        raise InvalidRequest(
            f"{count} {what} images; at most {limit} are allowed", code="too_many_images"
        )


def _check_labels(labels: list[str], image_count: int, settings: Settings) -> None:
    if len(labels) != image_count:
        raise InvalidRequest(
            f"{image_count} images but {len(labels)} labels; "
            "send exactly one 'labels' field per image, "
            "in the same order",
            code="labels_mismatch",
        )
    for position, label in enumerate(labels):
        if not label.strip():
            raise InvalidRequest(
                f"label {position} is empty; every image needs a non-empty label",
                code="empty_label",
            )
        bad = unstorable_character(label)
        if bad is not None:
            raise InvalidRequest(
                f"label {position} contains the character {bad}; "
                "labels cannot hold control characters",
                code="validation_error",
            )
        invisible = invisible_character(label)
        if invisible is not None:
            raise InvalidRequest(
                f"label {position} contains the invisible character {invisible}; labels cannot "
                "hold bidirectional controls, zero-width characters or byte order marks",
                code="invalid_label",
            )
        if len(label) > settings.max_label_length:
            raise InvalidRequest(
                f"label {position} is {len(label)} characters; "
                f"the limit is {settings.max_label_length}",
                code="label_too_long",
            )
    distinct = len(set(labels))
    if distinct < 2:
        raise InvalidRequest(
            f"a task needs at least 2 distinct labels, got {distinct}; add images of another class",
            code="too_few_classes",
        )


def _check_options(
    name: str | None, mode: str | None, steps: int | None, settings: Settings
) -> None:
    if name is not None and len(name) > 200:
        raise InvalidRequest("name is longer than 200 characters", code="validation_error")
    bad = None if name is None else unstorable_character(name)
    if bad is not None:
        raise InvalidRequest(
            f"name contains the character {bad}; names cannot hold control characters",
            code="validation_error",
        )
    if mode is not None and mode not in ("full", "head"):
        raise InvalidRequest(f"mode must be 'full' or 'head', got {mode!r}", code="invalid_mode")
    if steps is not None and not 0 <= steps <= settings.max_steps:
        raise InvalidRequest(
            f"steps must be between 0 and {settings.max_steps}, got {steps}", code="invalid_steps"
        )


_INTEGER = re.compile(r"-?[0-9]{1,9}")


def _int_field(value: str | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    # Plain ASCII digits only: int() alone would take " 3 ", "3_0" and non-ASCII digits.
    if not _INTEGER.fullmatch(value):
        raise InvalidRequest(f"{name} must be an integer, got {value!r}", code="validation_error")
    return int(value)


_NUMBER = re.compile(r"[0-9]{1,3}(\.[0-9]{1,12})?|\.[0-9]{1,12}")


def _threshold_field(value: str | None) -> float | None:
    """An unknown_threshold text field: a plain decimal within [0, 1], or None when absent."""
    if value is None or value == "":
        return None
    if not _NUMBER.fullmatch(value):
        raise InvalidRequest(
            f"unknown_threshold must be a number within [0, 1], got {value!r}",
            code="invalid_unknown_threshold",
        )
    return _check_threshold(float(value))


def _check_threshold(value: float | None) -> float | None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise InvalidRequest(
            f"unknown_threshold must be within [0, 1], got {value}",
            code="invalid_unknown_threshold",
        )
    return value


def _first(values: list[str]) -> str | None:
    return values[0] if values else None


def _text_fields(form: FormData, name: str) -> list[str]:
    values = form.getlist(name)
    if any(not isinstance(v, str) for v in values):
        raise InvalidRequest(f"'{name}' must be text fields, not files", code="validation_error")
    return [v for v in values if isinstance(v, str)]


async def _image_parts(form: FormData, what: str, max_bytes: int) -> list[_RawImage]:
    images: list[_RawImage] = []
    for position, part in enumerate(form.getlist("images")):
        label = f"{what} image {position}"
        if not isinstance(part, UploadFile):
            raise InvalidRequest(
                f"{label} must be a file part, not a text field", code="invalid_image"
            )
        images.append(_RawImage(await _upload_bytes(part, label, max_bytes), label))
    return images


def _check_all(raw: list[_RawImage], settings: Settings, *, keep: bool) -> list[CheckedImage]:
    # One image at a time: each is decoded, shrunk (kept only for queries) and let go before the
    # next, so a request holds at most one full-size image.
    return [
        check_image(
            r.data,
            what=r.what,
            max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
            keep_side=settings.max_decoded_side if keep else None,
        )
        for r in raw
    ]


async def read_support_set(request: Request) -> SupportSetIn:
    """The support set of POST /v1/tasks (multipart or JSON), fully checked before any write."""
    settings = _settings(request)
    if _media_type(request) == MULTIPART:
        form = await _form(request, settings.max_support_images)
        try:
            raw = await _image_parts(form, "support", settings.max_image_bytes)
            labels = _text_fields(form, "labels")
            names = _text_fields(form, "name")
            modes = _text_fields(form, "mode")
            name = names[0] if names else None
            mode = modes[0] if modes else None
            steps = _int_field(_first(_text_fields(form, "steps")), "steps")
            threshold = _threshold_field(_first(_text_fields(form, "unknown_threshold")))
            initialization = _first(_text_fields(form, "initialization"))
        finally:
            await form.close()
    else:
        body: SupportSetJson = await run_in_threadpool(
            _json_model, SupportSetJson, await _json(request, settings)
        )
        raw = [
            _RawImage(_b64(e.image, f"support image {i}"), f"support image {i}")
            for i, e in enumerate(body.examples)
        ]
        labels = [e.label for e in body.examples]
        name, mode, steps = body.name, body.mode, body.steps
        threshold = _check_threshold(body.unknown_threshold)
        initialization = body.initialization
    _check_count(len(raw), settings.max_support_images, "support")
    _check_labels(labels, len(raw), settings)
    _check_options(name, mode, steps, settings)
    initialization = _check_version(initialization)
    images = await run_in_threadpool(_check_all, raw, settings, keep=False)
    return SupportSetIn(
        images=images,
        labels=labels,
        name=name,
        mode=mode,
        steps=steps,
        unknown_threshold=threshold,
        initialization=initialization,
    )


def _check_version(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    if not value or len(value) > 100 or not value.isprintable():
        raise InvalidRequest(
            "initialization must be a version name of 1 to 100 printable characters (GET "
            "/v1/initializations lists them), or left out for your default",
            code="invalid_initialization",
        )
    return value


async def read_queries(request: Request) -> QueriesIn:
    """The query images of POST /v1/tasks/{id}/predictions, from multipart or JSON."""
    settings = _settings(request)
    top_k: int | None
    if _media_type(request) == MULTIPART:
        form = await _form(request, settings.max_query_images)
        try:
            raw = await _image_parts(form, "query", settings.max_image_bytes)
            top_k = _int_field(_first(_text_fields(form, "top_k")), "top_k")
            threshold = _threshold_field(_first(_text_fields(form, "unknown_threshold")))
        finally:
            await form.close()
    else:
        body: QueriesJson = await run_in_threadpool(
            _json_model, QueriesJson, await _json(request, settings)
        )
        raw = [
            _RawImage(_b64(text, f"query image {i}"), f"query image {i}")
            for i, text in enumerate(body.images)
        ]
        top_k = body.top_k
        threshold = _check_threshold(body.unknown_threshold)
    query_threshold = request.query_params.get("unknown_threshold")
    if query_threshold is not None:
        threshold = _threshold_field(query_threshold)
    query_top_k = request.query_params.get("top_k")
    if query_top_k is not None:
        top_k = _int_field(query_top_k, "top_k")
    if top_k is not None and top_k < 1:
        raise InvalidRequest(f"top_k must be at least 1, got {top_k}", code="validation_error")
    _check_count(len(raw), settings.max_query_images, "query")
    images = await run_in_threadpool(_check_all, raw, settings, keep=True)
    return QueriesIn(images=images, top_k=top_k, unknown_threshold=threshold)


SupportSetDep = Annotated[SupportSetIn, Depends(read_support_set)]
QueriesDep = Annotated[QueriesIn, Depends(read_queries)]
