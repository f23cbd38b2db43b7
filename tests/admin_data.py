"""Generated meta-training datasets and admin-API helpers shared by the admin tests."""

from __future__ import annotations

import io
import time
import zipfile
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from tests.data_paths import OMNIGLOT_ZIP


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, "L").save(buffer, format="PNG")
    return buffer.getvalue()


def class_images(seed: int, count: int) -> list[bytes]:
    """`count` hand-drawn-like copies of one random character: 2-3 strokes of 2-3 points, each
    copy with its points moved by up to 0.7 px (a learnable class; blank- or noise-like images
    would be "unknown" to the shipped handwriting initialization's norm check)."""
    rng = np.random.default_rng(seed)
    strokes = [
        rng.uniform(4, 24, size=(int(rng.integers(2, 4)), 2))
        for _ in range(int(rng.integers(2, 4)))
    ]
    images = []
    for _ in range(count):
        canvas = Image.new("L", (28, 28), 255)
        draw = ImageDraw.Draw(canvas)
        for points in strokes:
            moved = points + rng.uniform(-0.7, 0.7, size=points.shape)
            draw.line([(float(x), float(y)) for x, y in moved], fill=0, width=2)
        images.append(_png(np.asarray(canvas, dtype=np.uint8)))
    return images


def dataset_zip(groups: int = 4, classes: int = 8, images: int = 6, seed: int = 0) -> bytes:
    """A grouped zip (group/class/image.png) of generated classes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for g in range(groups):
            for c in range(classes):
                for i, data in enumerate(class_images(seed * 10_000 + g * 100 + c, images)):
                    archive.writestr(f"group{g}/class{c}/{i}.png", data)
    return buffer.getvalue()


def omniglot_alphabets_zip(alphabets: int) -> bytes | None:
    """The first `alphabets` alphabets of the shared Omniglot background zip, or None."""
    if not OMNIGLOT_ZIP.is_file():
        return None
    buffer = io.BytesIO()
    with zipfile.ZipFile(OMNIGLOT_ZIP) as source, zipfile.ZipFile(buffer, "w") as target:
        names = [n for n in source.namelist() if n.endswith(".png")]
        chosen = sorted({n.split("/")[1] for n in names})[:alphabets]
        for name in names:
            if name.split("/")[1] in chosen:
                target.writestr(name, source.read(name))
    return buffer.getvalue()


def upload(client: TestClient, headers: dict[str, str], data: bytes, name: str, **form: Any) -> Any:
    """POST a dataset zip."""
    return client.post(
        "/v1/admin/datasets",
        headers=headers,
        files={"file": ("data.zip", data, "application/zip")},
        data={"name": name, **form},
    )


def tiny_run(dataset_id: str, **overrides: Any) -> dict[str, Any]:
    """A meta-training request small enough for a 2-core box."""
    body: dict[str, Any] = {
        "dataset_id": dataset_id,
        "start": "scratch",
        "model": {"width": 8},
        "algorithm": {
            "order": "first",
            "inner_steps": 1,
            "inner_step_size": 0.4,
            "meta_batch": 2,
            "iterations": 8,
            "ways": [5, 5],
            "shots": [1, 1],
            "queries": 1,
        },
        "validation_split": 0.25,
        "validation_episodes": 4,
        "validate_every": 4,
        "log_every": 2,
        "checkpoint_every_s": 0.01,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(body.get(key), dict):
            body[key] = {**body[key], **value}
        else:
            body[key] = value
    return body


def wait_run(
    client: TestClient,
    headers: dict[str, str],
    run_id: str,
    until: Any = None,
    timeout: float = 90,
) -> dict[str, Any]:
    """Poll a run until it ends (or `until(body)` holds); returns the last body."""
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(f"/v1/admin/meta-trainings/{run_id}", headers=headers)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        done = until(body) if until is not None else body["state"] not in ("queued", "running")
        if done:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"run {run_id} did not get there in {timeout}s: {body}")
        time.sleep(0.05)
