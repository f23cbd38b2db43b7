"""'None of these' through the HTTP API: calibrated scores, 'unknown' labels and thresholds."""

from __future__ import annotations

import base64
import io
import random
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from app.main import create_app
from tests.helpers import Omniglot, create_key, make_settings, shipped_init_dir

SHAPES = ("circle", "cross", "triangle", "square", "zigzag")
Files = list[tuple[str, tuple[str, bytes, str]]]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def shape_png(kind: str, seed: int, size: int = 105) -> bytes:
    """A hand-drawn-looking shape (black strokes on white, as Omniglot), jittered per seed."""
    rng = np.random.default_rng(seed)
    image = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(image)
    dx, dy = (int(v) for v in rng.integers(-4, 5, 2))
    width = int(rng.integers(3, 6))

    def at(points: list[tuple[int, int]]) -> list[tuple[int, int]]:
        return [(x + dx, y + dy) for x, y in points]

    if kind == "circle":
        draw.ellipse([25 + dx, 25 + dy, 80 + dx, 80 + dy], outline=0, width=width)
    elif kind == "cross":
        draw.line(at([(30, 30), (75, 75)]), fill=0, width=width)
        draw.line(at([(75, 30), (30, 75)]), fill=0, width=width)
    elif kind == "triangle":
        draw.line(at([(52, 25), (80, 78), (25, 78), (52, 25)]), fill=0, width=width)
    elif kind == "square":
        draw.rectangle([28 + dx, 28 + dy, 77 + dx, 77 + dy], outline=0, width=width)
    else:
        draw.line(at([(20, 60), (35, 40), (50, 60), (65, 40), (80, 60)]), fill=0, width=width)
    return _png(image)


def blank_png() -> bytes:
    """An empty white page."""
    return _png(Image.new("L", (105, 105), 255))


def noise_png(seed: int = 0) -> bytes:
    """Uniform grey-level noise."""
    values = np.random.default_rng(seed).random((105, 105)) * 255
    return _png(Image.fromarray(values.astype(np.uint8), "L"))


def files_of(images: list[bytes]) -> Files:
    """Multipart `images` parts."""
    return [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]


@pytest.fixture(scope="module")
def shipped() -> Path:
    """The shipped (calibrated) initialization, or a skip."""
    folder = shipped_init_dir()
    if folder is None:
        pytest.skip("the shipped initialization's weights are not in this checkout")
    return folder


@pytest.fixture
def api(tmp_path: Path, shipped: Path) -> Iterator[tuple[TestClient, dict[str, str]]]:
    """An embedded app serving the shipped initialization, and a user's headers."""
    with TestClient(create_app(make_settings(tmp_path / "data", shipped))) as client:
        yield client, create_key(client, "acme")


def shapes_task(client: TestClient, headers: dict[str, str], **fields: Any) -> dict[str, Any]:
    """A ready 5-way 2-shot task of generated shapes."""
    images = [shape_png(kind, seed) for kind in SHAPES for seed in range(2)]
    labels = [kind for kind in SHAPES for _ in range(2)]
    response = client.post(
        "/v1/tasks?wait=60",
        headers=headers,
        files=files_of(images),
        data={"labels": labels, **fields},
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def predict(
    client: TestClient, headers: dict[str, str], task_id: str, images: list[bytes], **params: Any
) -> dict[str, Any]:
    """POST query images; the response body."""
    response = client.post(
        f"/v1/tasks/{task_id}/predictions",
        headers=headers,
        files=files_of(images),
        params=params,
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_blank_and_noise_are_unknown_and_in_task_shapes_are_not(
    api: tuple[TestClient, dict[str, str]],
) -> None:
    client, headers = api
    task = shapes_task(client, headers)
    queries = [shape_png(kind, seed) for kind in SHAPES for seed in range(10, 14)]
    body = predict(client, headers, task["id"], [*queries, blank_png(), noise_png()])
    assert body["unknown_threshold_source"] == "initialization"
    threshold = body["unknown_threshold"]
    assert 0 < threshold < 1
    predictions = body["predictions"]
    for p in predictions:
        assert 0 <= p["score"] <= 1
        assert (p["label"] == "unknown") == (p["score"] < threshold)
        # The class columns never include "unknown".
        assert list(p["probabilities"]) == list(SHAPES)
        assert {entry["label"] for entry in p["top_k"]} <= set(SHAPES)
    blank, noise = predictions[-2:]
    assert blank["label"] == "unknown" and noise["label"] == "unknown"
    expected = [kind for kind in SHAPES for _ in range(4)]
    right = sum(p["label"] == want for p, want in zip(predictions, expected, strict=False))
    assert right >= 0.8 * len(queries), [p["label"] for p in predictions]
    # The recorded rows keep "unknown".
    recorded = client.get(f"/v1/tasks/{task['id']}/predictions", headers=headers).json()["items"]
    by_id = {row["id"]: row["label"] for row in recorded}
    assert by_id[blank["id"]] == "unknown" and by_id[noise["id"]] == "unknown"


def test_threshold_from_request_then_task_then_initialization(
    api: tuple[TestClient, dict[str, str]],
) -> None:
    client, headers = api
    plain = shapes_task(client, headers)
    assert plain["unknown_threshold"] is None
    # 0 disables "unknown": the blank image gets a task label.
    off = predict(client, headers, plain["id"], [blank_png()], unknown_threshold=0)
    assert off["unknown_threshold_source"] == "request" and off["unknown_threshold"] == 0
    assert off["predictions"][0]["label"] in SHAPES
    # A task created with its own threshold uses it unless the request gives one.
    strict = shapes_task(client, headers, unknown_threshold="1")
    assert strict["unknown_threshold"] == 1.0
    body = predict(client, headers, strict["id"], [shape_png("circle", 20)])
    assert body["unknown_threshold_source"] == "task" and body["unknown_threshold"] == 1.0
    assert body["predictions"][0]["label"] == "unknown"
    # The query parameter wins over the form field.
    response = client.post(
        f"/v1/tasks/{strict['id']}/predictions?unknown_threshold=0",
        headers=headers,
        files=files_of([shape_png("circle", 20)]),
        data={"unknown_threshold": "1"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["label"] == "circle"
    # JSON bodies take the field too.
    encoded = base64.b64encode(shape_png("circle", 20)).decode()
    response = client.post(
        f"/v1/tasks/{strict['id']}/predictions",
        headers=headers,
        json={"images": [encoded], "unknown_threshold": 0},
    )
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["label"] == "circle"
    assert response.json()["unknown_threshold_source"] == "request"


@pytest.mark.parametrize("value", ["1.5", "-0.1", "abc", "nan"])
def test_threshold_outside_zero_to_one_is_refused(
    api: tuple[TestClient, dict[str, str]], value: str
) -> None:
    client, headers = api
    task = shapes_task(client, headers)
    response = client.post(
        f"/v1/tasks/{task['id']}/predictions",
        headers=headers,
        files=files_of([blank_png()]),
        data={"unknown_threshold": value},
    )
    assert response.status_code == 422
    assert response.json()["code"] == "invalid_unknown_threshold"
    images = [shape_png(kind, 0) for kind in SHAPES]
    response = client.post(
        "/v1/tasks",
        headers=headers,
        files=files_of(images),
        data={"labels": list(SHAPES), "unknown_threshold": value},
    )
    assert response.status_code == 422
    assert response.json()["code"] == "invalid_unknown_threshold"


def test_a_prediction_does_not_depend_on_the_other_images(
    api: tuple[TestClient, dict[str, str]],
) -> None:
    client, headers = api
    task = shapes_task(client, headers)
    images = [shape_png("square", 30), blank_png(), noise_png(3), shape_png("cross", 31)]
    together = predict(client, headers, task["id"], images)["predictions"]
    for image, joint in zip(images, together, strict=True):
        alone = predict(client, headers, task["id"], [image])["predictions"][0]
        assert alone["label"] == joint["label"]
        assert alone["score"] == pytest.approx(joint["score"], abs=1e-6)
        for label, probability in alone["probabilities"].items():
            assert probability == pytest.approx(joint["probabilities"][label], abs=1e-5)


def test_in_task_omniglot_queries_are_mostly_known(
    api: tuple[TestClient, dict[str, str]], omniglot: Omniglot
) -> None:
    client, headers = api
    rng = random.Random(7)
    kept = total = 0
    for _ in range(3):
        support, query = omniglot.episode(rng, ways=5, shots=1, queries=4)
        response = client.post(
            "/v1/tasks?wait=60",
            headers=headers,
            files=files_of([data for data, _ in support]),
            data={"labels": [label for _, label in support]},
        )
        assert response.status_code == 201, response.text
        body = predict(client, headers, response.json()["id"], [data for data, _ in query])
        labels = [p["label"] for p in body["predictions"]]
        kept += sum(label != "unknown" for label in labels)
        total += len(labels)
    # The default threshold (p 0.01) keeps ~99% of genuine queries.
    assert kept >= 0.8 * total, f"only {kept} of {total} in-task queries were kept"


def test_the_python_client_sends_thresholds_and_reads_scores(tmp_path: Path, shipped: Path) -> None:
    from maml_serve import Client

    with TestClient(create_app(make_settings(tmp_path / "data", shipped))) as app:
        key = create_key(app, "acme")["Authorization"].removeprefix("Bearer ")
        with Client("http://testserver", key, transport=app._transport) as client:
            support = {kind: [shape_png(kind, 0), shape_png(kind, 1)] for kind in SHAPES}
            task = client.create_task(support, wait=60, unknown_threshold=0.2)
            assert task.unknown_threshold == 0.2
            assert task.diagnostics is not None
            assert task.diagnostics["leave_one_out_accuracy"] is not None
            default = client.predict(task.id, [blank_png()])
            assert default.unknown_threshold == 0.2
            assert default.unknown_threshold_source == "task"
            assert default.predictions[0].unknown
            score = default.predictions[0].score
            assert score is not None and score < 0.2
            off = client.predict(task.id, [blank_png()], unknown_threshold=0.0)
            assert off.unknown_threshold_source == "request"
            assert off.labels[0] in SHAPES and not off.predictions[0].unknown


def test_scores_survive_reloading_the_adapted_model_from_its_file(
    api: tuple[TestClient, dict[str, str]],
) -> None:
    from tests.helpers import runtime_of

    client, headers = api
    task = shapes_task(client, headers)
    images = [shape_png("triangle", 40), blank_png()]
    cached = predict(client, headers, task["id"], images)["predictions"]
    # Forgotten by the cache: the next request reads the weights file (prototypes, class counts
    # and calibration included) again.
    runtime_of(client).models.forget([uuid.UUID(task["adapted_model"]["id"])])
    reloaded = predict(client, headers, task["id"], images)["predictions"]
    for a, b in zip(cached, reloaded, strict=True):
        assert a["label"] == b["label"]
        assert a["score"] == pytest.approx(b["score"], abs=1e-6)
    assert reloaded[1]["label"] == "unknown"
