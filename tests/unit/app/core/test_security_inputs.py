"""Hostile inputs answered with a clear 4xx that names no internal file, address or exception."""

from __future__ import annotations

import base64
import io
import json
import struct
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select

from app.core.images import check_image
from app.main import create_app
from app.models import AdaptedModel
from tests.helpers import (
    create_key,
    create_ready_task,
    make_settings,
    png,
    query_files,
    runtime_of,
    support_files,
)


def _problem(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["code"] == code, body
    return body


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def ztxt_bomb(chunks: int, inflated: int = 1 << 20) -> bytes:
    """A small PNG whose zTXt chunks inflate to `chunks` x `inflated` bytes of text."""
    image = png(1)
    text = _chunk(b"zTXt", b"comment\x00\x00" + zlib.compress(b"a" * inflated, 9))
    header_end = 8 + 25  # signature + IHDR
    return image[:header_end] + text * chunks + image[header_end:]


# --- images -----------------------------------------------------------------------------------


def test_a_ztxt_bomb_is_refused_with_its_own_code(client: TestClient, auth: dict[str, str]) -> None:
    bomb = ztxt_bomb(63)
    assert len(bomb) < 100_000
    files = [("images", ("bomb.png", bomb, "image/png")), ("images", ("ok.png", png(2), "x"))]
    body = _problem(
        client.post("/v1/tasks", headers=auth, files=files, data={"labels": ["a", "b"]}),
        422,
        "image_metadata_too_large",
    )
    assert "support image 0" in body["detail"]


def test_modest_png_text_is_still_accepted() -> None:
    checked = check_image(
        ztxt_bomb(2, inflated=4096), what="x", max_bytes=1 << 20, max_pixels=1 << 20
    )
    assert checked.format == "png"


def test_only_png_and_jpeg_decoders_see_the_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[Any] = []
    real_open = Image.open

    def spy(fp: Any, mode: Any = "r", formats: Any = None) -> Any:
        opened.append(formats)
        return real_open(fp, mode, formats)

    monkeypatch.setattr(Image, "open", spy)
    check_image(png(3), what="x", max_bytes=1 << 20, max_pixels=1 << 20)
    assert opened and all(sorted(f) == ["JPEG", "PNG"] for f in opened)


def test_kept_query_pixels_are_shrunk_to_the_working_size() -> None:
    buffer = io.BytesIO()
    Image.new("RGBA", (2048, 1024), (1, 2, 3, 4)).save(buffer, "PNG")
    checked = check_image(
        buffer.getvalue(), what="x", max_bytes=1 << 22, max_pixels=1 << 22, keep_side=128
    )
    assert checked.decoded is not None and max(checked.decoded.size) == 128
    assert (checked.width, checked.height) == (2048, 1024)
    support = check_image(buffer.getvalue(), what="x", max_bytes=1 << 22, max_pixels=1 << 22)
    assert support.decoded is None


# --- JSON bodies ------------------------------------------------------------------------------


def test_a_json_body_of_millions_of_values_is_refused_before_parsing(
    client: TestClient, auth: dict[str, str]
) -> None:
    body = b'{"images": [' + b",".join([b'""'] * 200_000) + b"]}"
    headers = {**auth, "Content-Type": "application/json"}
    task = create_ready_task(client, auth)
    response = client.post(f"/v1/tasks/{task['id']}/predictions", headers=headers, content=body)
    _problem(response, 422, "too_many_json_values")


def test_commas_inside_labels_do_not_count_as_values(
    client: TestClient, auth: dict[str, str]
) -> None:
    labels = [",".join("a" * 10) + str(i) for i in range(2)]
    examples = [
        {"label": label, "image": base64.b64encode(png(i)).decode()}
        for i, label in enumerate(labels * 3)
    ]
    runtime = runtime_of(client)
    runtime.settings.max_json_values = 30  # commas in labels: 6 x 9 = 54 more than that
    response = client.post("/v1/tasks", headers=auth, json={"examples": examples})
    assert response.status_code == 202, response.text


# --- labels -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "char",
    ["\u202a", "\u202e", "\u2066", "\u2069", "\u200b", "\u200c", "\u200d", "\u2060", "\ufeff"],
)
def test_labels_with_invisible_characters_are_refused(
    client: TestClient, auth: dict[str, str], char: str
) -> None:
    files, data = support_files(["cat", f"ca{char}t"])
    body = _problem(
        client.post("/v1/tasks", headers=auth, files=files, data=data), 422, "invalid_label"
    )
    assert f"U+{ord(char):04X}" in body["detail"]
    examples = [
        {"label": label, "image": base64.b64encode(png(i)).decode()}
        for i, label in enumerate(["dog", f"{char}dog2"])
    ]
    _problem(
        client.post("/v1/tasks", headers=auth, json={"examples": examples}), 422, "invalid_label"
    )


# --- cursors ----------------------------------------------------------------------------------


def _cursor(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "value",
    [
        {"t": "2024-01-01T00:00:00+00:00", "id": 12345},
        {"t": 1704067200, "id": str(uuid.uuid4())},
        {"t": ["x"], "id": {"a": 1}},
        {"t": None, "id": None},
        ["t", "id"],
        "a string",
        12,
    ],
)
def test_a_cursor_with_fields_of_the_wrong_type_is_invalid_cursor(
    client: TestClient, auth: dict[str, str], value: Any
) -> None:
    response = client.get("/v1/tasks", headers=auth, params={"cursor": _cursor(value)})
    _problem(response, 422, "invalid_cursor")


# --- corrupted artifacts ----------------------------------------------------------------------


@pytest.fixture
def fresh(tmp_path: Path, tiny_init_dir: Path) -> Iterator[TestClient]:
    """An app whose adapted-model cache is empty after each adaptation (weights read from disk)."""
    settings = make_settings(tmp_path / "data", tiny_init_dir, adapted_cache_bytes=0)
    with TestClient(create_app(settings)) as client:
        yield client


def _weights(client: TestClient, task_id: str) -> Path:
    runtime = runtime_of(client)
    with runtime.sessions() as session:
        row = session.scalar(select(AdaptedModel).where(AdaptedModel.task_id == uuid.UUID(task_id)))
        assert row is not None
        return runtime.store.path(row.weights_key)


@pytest.mark.parametrize("damage", ["flipped bytes", "valid hash, not safetensors"])
def test_a_corrupted_adapted_model_is_a_409_that_names_no_file(
    fresh: TestClient, damage: str
) -> None:
    auth = create_key(fresh, "acme")
    task = create_ready_task(fresh, auth)
    path = _weights(fresh, task["id"])
    if damage == "flipped bytes":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(b"not a safetensors file")
        runtime = runtime_of(fresh)
        with runtime.sessions() as session:
            row = session.scalar(select(AdaptedModel))
            assert row is not None
            from app.core.storage import sha256_file

            row.sha256 = sha256_file(path)
            session.commit()
    response = fresh.post(f"/v1/tasks/{task['id']}/predictions", headers=auth, files=query_files(1))
    body = _problem(response, 409, "artifact_corrupt")
    text = response.text
    assert "adapt the task again" in body["detail"]
    for leak in (
        str(path),
        path.name,
        "safetensors",
        "/models/",
        str(runtime_of(fresh).settings.data_dir),
    ):
        assert leak not in text, leak
