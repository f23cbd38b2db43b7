"""Every kind of bad input: its own status and code, a detail, and nothing written."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select

from app.main import create_app
from app.models import AdaptedModel, Job, Prediction, SupportExample, Task
from tests.helpers import create_key, make_settings, png, query_files, runtime_of, support_files


def _encoded(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def _noise(width: int, height: int) -> np.ndarray:
    return (np.random.default_rng(0).random((height, width, 3)) * 255).astype(np.uint8)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size and has no pixel data at all."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = (
        struct.pack(">I", len(ihdr))
        + b"IHDR"
        + ihdr
        + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    )
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk
        + struct.pack(">I", 0)
        + b"IEND"
        + struct.pack(">I", zlib.crc32(b"IEND"))
    )


LIMITS = {
    "max_support_images": 4,
    "max_query_images": 3,
    "max_image_pixels": 200 * 200,
    "max_image_bytes": 60_000,
    "max_body_bytes": 300_000,
}
BIG_FILE = _encoded(_noise(200, 150), "PNG")  # > 60 kB, 30k pixels
TOO_MANY_PIXELS = _encoded(np.zeros((300, 300), np.uint8), "PNG")  # small file, 90k pixels


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory, tiny_init_dir: Path) -> Iterator[TestClient]:
    """An embedded app with small limits, shared by the cases below (none of which may write)."""
    settings = make_settings(tmp_path_factory.mktemp("limited") / "data", tiny_init_dir, **LIMITS)
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture(scope="module")
def key(limited: TestClient) -> dict[str, str]:
    """A user key on the limited app."""
    return create_key(limited, "acme")


def _assert_nothing_written(client: TestClient) -> None:
    runtime = runtime_of(client)
    with runtime.sessions() as session:
        for model in (Task, SupportExample, Job, AdaptedModel, Prediction):
            assert session.scalar(select(func.count()).select_from(model)) == 0, model.__name__
    tasks_dir = runtime.store.root / "tasks"
    assert not tasks_dir.exists() or not any(tasks_dir.iterdir())


def _files(*blobs: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [
        ("images", (f"{i}.png", blob, "application/octet-stream")) for i, blob in enumerate(blobs)
    ]


OK = png(1)
OK2 = png(2)
CASES: dict[str, tuple[dict[str, Any], int, str]] = {
    "not an image": (
        {"files": _files(b"hello, world", OK2), "data": {"labels": ["a", "b"]}},
        422,
        "invalid_image",
    ),
    "empty file": (
        {"files": _files(b"", OK2), "data": {"labels": ["a", "b"]}},
        422,
        "invalid_image",
    ),
    "truncated png": (
        {"files": _files(OK[: len(OK) // 2], OK2), "data": {"labels": ["a", "b"]}},
        422,
        "invalid_image",
    ),
    "gif": (
        {
            "files": _files(_encoded(np.zeros((8, 8), np.uint8), "GIF"), OK2),
            "data": {"labels": ["a", "b"]},
        },
        422,
        "unsupported_image_format",
    ),
    "bmp": (
        {
            "files": _files(_encoded(np.zeros((8, 8), np.uint8), "BMP"), OK2),
            "data": {"labels": ["a", "b"]},
        },
        422,
        "unsupported_image_format",
    ),
    "too many pixels": (
        {"files": _files(TOO_MANY_PIXELS, OK2), "data": {"labels": ["a", "b"]}},
        422,
        "image_too_large",
    ),
    "huge header, no pixels": (
        {"files": _files(_png_header_only(100_000, 100_000), OK2), "data": {"labels": ["a", "b"]}},
        422,
        "image_too_large",
    ),
    "file over the byte cap": (
        {"files": _files(BIG_FILE, OK2), "data": {"labels": ["a", "b"]}},
        413,
        "file_too_large",
    ),
    "body over the limit": (
        {
            "files": _files(BIG_FILE, BIG_FILE, BIG_FILE, BIG_FILE),
            "data": {"labels": ["a", "b", "a", "b"]},
        },
        413,
        "payload_too_large",
    ),
    "too many images": (
        {
            "files": _files(*(png(i) for i in range(5))),
            "data": {"labels": ["a", "b", "a", "b", "a"]},
        },
        422,
        "too_many_images",
    ),
    "far too many images": (
        {"files": _files(*(png(i) for i in range(9))), "data": {"labels": ["a", "b"] * 4 + ["c"]}},
        422,
        "too_many_images",
    ),
    "no images": (
        {"data": {"labels": ["a", "b"]}, "files": [("other", ("x", b"x", "text/plain"))]},
        422,
        "no_images",
    ),
    "fewer labels than images": (
        {"files": _files(OK, OK2), "data": {"labels": ["a"]}},
        422,
        "labels_mismatch",
    ),
    "more labels than images": (
        {"files": _files(OK, OK2), "data": {"labels": ["a", "b", "c"]}},
        422,
        "labels_mismatch",
    ),
    "one class": (
        {"files": _files(OK, OK2), "data": {"labels": ["a", "a"]}},
        422,
        "too_few_classes",
    ),
    "empty label": ({"files": _files(OK, OK2), "data": {"labels": ["a", " "]}}, 422, "empty_label"),
    "label too long": (
        {"files": _files(OK, OK2), "data": {"labels": ["a", "b" * 500]}},
        422,
        "label_too_long",
    ),
    "bad mode": (
        {"files": _files(OK, OK2), "data": {"labels": ["a", "b"], "mode": "half"}},
        422,
        "invalid_mode",
    ),
    "bad steps": (
        {"files": _files(OK, OK2), "data": {"labels": ["a", "b"], "steps": "1000"}},
        422,
        "invalid_steps",
    ),
    "steps not a number": (
        {"files": _files(OK, OK2), "data": {"labels": ["a", "b"], "steps": "x"}},
        422,
        "validation_error",
    ),
    "plain text body": (
        {"content": b"hi", "headers": {"Content-Type": "text/plain"}},
        415,
        "unsupported_media_type",
    ),
    "malformed json": (
        {"content": b"{", "headers": {"Content-Type": "application/json"}},
        422,
        "invalid_json",
    ),
    "json without examples": ({"json": {"images": []}}, 422, "validation_error"),
    "json bad base64": (
        {
            "json": {
                "examples": [
                    {"label": "a", "image": "%%%"},
                    {"label": "b", "image": base64.b64encode(OK2).decode()},
                ]
            }
        },
        422,
        "invalid_base64",
    ),
    "json one class": (
        {"json": {"examples": [{"label": "a", "image": base64.b64encode(OK).decode()}] * 2}},
        422,
        "too_few_classes",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_support_set(limited: TestClient, key: dict[str, str], case: str) -> None:
    kwargs, status, code = CASES[case]
    extra = {k: v for k, v in kwargs.items() if k != "headers"}
    response = limited.post("/v1/tasks", headers={**key, **kwargs.get("headers", {})}, **extra)
    assert response.status_code == status, response.text
    body = response.json()
    assert response.headers["content-type"].startswith("application/problem+json")
    assert body["code"] == code and body["status"] == status and body["detail"]
    _assert_nothing_written(limited)


def test_wait_is_validated(limited: TestClient, key: dict[str, str]) -> None:
    files, data = support_files(["a", "b"])
    response = limited.post("/v1/tasks?wait=-1", headers=key, files=files, data=data)
    assert response.status_code == 422 and response.json()["code"] == "validation_error"
    _assert_nothing_written(limited)


QUERY_CASES: dict[str, tuple[dict[str, Any], int, str]] = {
    "not an image": ({"files": _files(b"nope")}, 422, "invalid_image"),
    "gif": (
        {"files": _files(_encoded(np.zeros((8, 8), np.uint8), "GIF"))},
        422,
        "unsupported_image_format",
    ),
    "too many pixels": ({"files": _files(TOO_MANY_PIXELS)}, 422, "image_too_large"),
    "too many images": ({"files": _files(*(png(i) for i in range(4)))}, 422, "too_many_images"),
    "no images": ({"files": [("other", ("x", b"x", "text/plain"))]}, 422, "no_images"),
    "bad top_k": ({"files": _files(OK), "data": {"top_k": "0"}}, 422, "validation_error"),
    "json bad base64": ({"json": {"images": ["***"]}}, 422, "invalid_base64"),
}


@pytest.fixture(scope="module")
def ready_task(
    tmp_path_factory: pytest.TempPathFactory, tiny_init_dir: Path
) -> Iterator[tuple[TestClient, str, dict[str, str]]]:
    """A second limited app holding one ready task."""
    settings = make_settings(tmp_path_factory.mktemp("ready") / "data", tiny_init_dir, **LIMITS)
    with TestClient(create_app(settings)) as client:
        headers = create_key(client, "acme")
        files, data = support_files(["a", "b"])
        task = client.post("/v1/tasks?wait=30", headers=headers, files=files, data=data).json()
        assert task["status"] == "ready"
        yield client, task["id"], headers


@pytest.mark.parametrize("case", list(QUERY_CASES))
def test_bad_queries(ready_task: tuple[TestClient, str, dict[str, str]], case: str) -> None:
    client, task_id, headers = ready_task
    kwargs, status, code = QUERY_CASES[case]
    response = client.post(f"/v1/tasks/{task_id}/predictions", headers=headers, **kwargs)
    assert response.status_code == status, response.text
    assert response.json()["code"] == code
    with runtime_of(client).sessions() as session:
        assert session.scalar(select(func.count()).select_from(Prediction)) == 0


def test_predict_while_adapting_is_409_with_retry_after(
    client: TestClient, auth: dict[str, str]
) -> None:
    dispatcher = client.app.state.dispatcher  # type: ignore[attr-defined]
    dispatcher.submit = lambda *args: None  # the job stays queued
    files, data = support_files(["a", "b"])
    task = client.post("/v1/tasks", headers=auth, files=files, data=data).json()
    assert task["status"] == "adapting"
    response = client.post(
        f"/v1/tasks/{task['id']}/predictions", headers=auth, files=query_files(1)
    )
    assert response.status_code == 409
    assert response.json()["code"] == "not_adapted_yet"
    assert int(response.headers["Retry-After"]) >= 1


def test_unknown_ids_are_404(client: TestClient, auth: dict[str, str]) -> None:
    missing = "00000000-0000-4000-8000-000000000000"
    for method, url in [
        ("GET", f"/v1/tasks/{missing}"),
        ("DELETE", f"/v1/tasks/{missing}"),
        ("GET", f"/v1/tasks/{missing}/predictions"),
        ("GET", f"/v1/jobs/{missing}"),
        ("GET", "/v1/initializations/no-such-version"),
    ]:
        response = client.request(method, url, headers=auth)
        assert response.status_code == 404, (method, url)
        assert response.json()["code"] == "not_found"
    response = client.post(f"/v1/tasks/{missing}/predictions", headers=auth, files=query_files(1))
    assert response.status_code == 404 and response.json()["code"] == "not_found"
