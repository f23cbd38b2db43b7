"""What the sync and async clients share: requests as data, images as files, errors, retries."""

from __future__ import annotations

import io
import json
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Union

import httpx

from maml_serve._version import __version__
from maml_serve.errors import ApiError, error_class

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

# A path, raw PNG/JPEG bytes, an open binary file, or a PIL image.
ImageInput = Union[str, "os.PathLike[str]", bytes, BinaryIO, "PILImage"]
# {label: [images]}, [(image, label), ...], or [images] with the labels given apart
SupportSet = (
    Mapping[str, Sequence[ImageInput]] | Sequence[tuple[ImageInput, str]] | Sequence[ImageInput]
)
Files = list[tuple[str, tuple[str, bytes, str]]]

DEFAULT_TIMEOUT = 60.0
# The longest one GET /v1/jobs/{id}?wait asks the server to hold (it bounds it too): well under
# the read timeout, so a held request is never cut off by the client.
LONG_POLL_SECONDS = 20.0
USER_AGENT = "maml-serve-client"


@dataclass(frozen=True)
class RetryPolicy:
    """Which answers are retried and how long to wait: 409 `not_adapted_yet`, 429, 503 (bounded)."""

    max_retries: int = 30
    # Used when the answer has no Retry-After; doubled per attempt up to max_delay.
    backoff: float = 0.25
    max_delay: float = 10.0
    # Total seconds spent sleeping between retries of one request.
    max_total_delay: float = 60.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to sleep before retry number `attempt` (0-based)."""
        if retry_after is not None:
            return max(0.0, min(retry_after, self.max_delay))
        return float(min(self.backoff * (2**attempt), self.max_delay))


@dataclass
class Call:
    """One API request, as data, so both clients send it the same way."""

    method: str
    path: str
    params: dict[str, Any] = field(default_factory=dict)
    json: Any = None
    files: Files | None = None
    data: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    # 429 and 503 are retried only where a second send cannot do the work twice.
    retry_unavailable: bool = True
    retry_not_adapted: bool = False

    def request_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for httpx's request()."""
        kwargs: dict[str, Any] = {"params": self.params or None, "headers": self.headers or None}
        if self.json is not None:
            kwargs["json"] = self.json
        if self.files is not None:
            kwargs["files"] = self.files
        if self.data is not None:
            kwargs["data"] = self.data
        return kwargs


def default_headers(api_key: str | None) -> dict[str, str]:
    """Headers sent with every request."""

    headers = {"User-Agent": f"{USER_AGENT}/{__version__}", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None when absent or bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def api_error(response: httpx.Response) -> ApiError:
    """The typed error for an error response (problem+json, or any body)."""
    body: dict[str, Any] = {}
    try:
        parsed = response.json()
        if isinstance(parsed, dict):
            body = parsed
    except (json.JSONDecodeError, UnicodeDecodeError):
        pass
    status = response.status_code
    code = str(body.get("code") or f"http_{status}")
    detail = str(body.get("detail") or response.text[:500] or response.reason_phrase)
    cls = error_class(status, code)
    return cls(
        status,
        code,
        detail,
        title=body.get("title"),
        body=body,
        retry_after=parse_retry_after(response.headers.get("Retry-After")),
    )


def should_retry(call: Call, response: httpx.Response) -> bool:
    """True for the answers worth sending the same request again."""
    if response.status_code in (429, 503):
        return call.retry_unavailable
    if response.status_code == 409 and call.retry_not_adapted:
        try:
            return bool(response.json().get("code") == "not_adapted_yet")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return False
    return False


def checked_json(response: httpx.Response) -> Any:
    """The JSON body of a successful response; raises the typed error otherwise."""
    if response.status_code >= 400:
        raise api_error(response)
    if response.status_code == 204 or not response.content:
        return None
    return response.json()


# --- images -----------------------------------------------------------------------------------

_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"))


def _content_type(data: bytes) -> str:
    for signature, content_type in _SIGNATURES:
        if data.startswith(signature):
            return content_type
    return "application/octet-stream"


def image_file(image: ImageInput, index: int) -> tuple[str, bytes, str]:
    """(filename, bytes, content type) for one image given as a path, bytes, file or PIL image."""
    if isinstance(image, bytes):
        return f"image-{index}", image, _content_type(image)
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        data = path.read_bytes()
        return path.name, data, _content_type(data)
    if hasattr(image, "read"):
        data = image.read()
        if not isinstance(data, bytes):
            raise TypeError("an open image file must be opened in binary mode")
        name = Path(str(getattr(image, "name", f"image-{index}"))).name
        return name, data, _content_type(data)
    if hasattr(image, "save") and hasattr(image, "mode"):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return f"image-{index}.png", buffer.getvalue(), "image/png"
    raise TypeError(f"not an image: {type(image).__name__} (give a path, bytes, file or PIL image)")


def image_files(images: Sequence[ImageInput]) -> Files:
    """Multipart `images` parts."""
    return [("images", image_file(image, i)) for i, image in enumerate(images)]


def support_pairs(
    support: SupportSet, labels: Sequence[str] | None
) -> tuple[list[ImageInput], list[str]]:
    """Images and their labels from {label: images}, [(image, label)], or images plus `labels`."""
    pairs: list[tuple[ImageInput, str]]
    if isinstance(support, Mapping):
        if labels is not None:
            raise TypeError("give labels either as the mapping's keys or as `labels`, not both")
        pairs = [(image, str(label)) for label, images in support.items() for image in images]
    elif labels is not None:
        images: list[Any] = list(support)
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        pairs = [(image, str(label)) for image, label in zip(images, labels, strict=True)]
    else:
        pairs = []
        items: list[Any] = list(support)
        for item in items:
            if not (isinstance(item, tuple) and len(item) == 2):
                raise TypeError("give (image, label) pairs, a {label: images} mapping, or `labels`")
            pairs.append((item[0], str(item[1])))
    return [p[0] for p in pairs], [p[1] for p in pairs]


# --- calls ------------------------------------------------------------------------------------


def create_task_call(
    support: SupportSet,
    labels: Sequence[str] | None,
    *,
    name: str | None,
    mode: str | None,
    steps: int | None,
    wait: float | None,
    idempotency_key: str | None,
    unknown_threshold: float | None = None,
    initialization: str | None = None,
) -> Call:
    """POST /v1/tasks as multipart, with an idempotency key so a retried send makes one task."""
    images, image_labels = support_pairs(support, labels)
    data: dict[str, Any] = {"labels": image_labels}
    if name is not None:
        data["name"] = name
    if initialization is not None:
        data["initialization"] = initialization
    if mode is not None:
        data["mode"] = mode
    if steps is not None:
        data["steps"] = str(steps)
    if unknown_threshold is not None:
        data["unknown_threshold"] = repr(float(unknown_threshold))
    params: dict[str, Any] = {}
    if wait:
        params["wait"] = wait
    return Call(
        "POST",
        "/v1/tasks",
        params=params,
        files=image_files(images),
        data=data,
        headers={"Idempotency-Key": idempotency_key or f"client-{uuid.uuid4()}"},
    )


def predict_call(
    task_id: str,
    images: Sequence[ImageInput],
    top_k: int | None,
    unknown_threshold: float | None = None,
) -> Call:
    """POST /v1/tasks/{id}/predictions as multipart; retried while the task adapts."""
    data: dict[str, Any] = {}
    if top_k is not None:
        data["top_k"] = str(top_k)
    if unknown_threshold is not None:
        data["unknown_threshold"] = repr(float(unknown_threshold))
    return Call(
        "POST",
        f"/v1/tasks/{task_id}/predictions",
        files=image_files(images),
        data=data or None,
        retry_not_adapted=True,
    )


def dataset_upload_call(
    archive: str | os.PathLike[str] | bytes | BinaryIO, name: str, min_classes: int | None
) -> Call:
    """POST /v1/admin/datasets with the zip as `file` (a 503 is not retried: it could keep two)."""
    if isinstance(archive, bytes):
        filename, data = "dataset.zip", archive
    elif isinstance(archive, str | os.PathLike):
        filename, data = Path(archive).name, Path(archive).read_bytes()
    else:
        filename, data = Path(str(getattr(archive, "name", "dataset.zip"))).name, archive.read()
    form: dict[str, Any] = {"name": name}
    if min_classes is not None:
        form["min_classes"] = str(min_classes)
    return Call(
        "POST",
        "/v1/admin/datasets",
        files=[("file", (filename, data, "application/zip"))],
        data=form,
        retry_unavailable=False,
    )


def list_params(limit: int | None, cursor: str | None) -> dict[str, Any]:
    """Query parameters of a cursor-paginated list."""
    params: dict[str, Any] = {}
    if limit is not None:
        params["limit"] = limit
    if cursor is not None:
        params["cursor"] = cursor
    return params
