"""Support-set diagnostics recorded by the adapt job and shown in the task resource."""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from app.main import create_app
from tests.helpers import create_key, make_settings, shipped_init_dir, support_files


def ring_png(radius: int, shift: int) -> bytes:
    """A circle of `radius` pixels, moved by `shift`."""
    image = Image.new("L", (105, 105), 255)
    c = 52 + shift
    ImageDraw.Draw(image).ellipse([c - radius, c - radius, c + radius, c + radius], 0, 0, 4)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def cross_png(shift: int) -> bytes:
    """Two crossing strokes, moved by `shift`."""
    image = Image.new("L", (105, 105), 255)
    draw = ImageDraw.Draw(image)
    a, b = 30 + shift, 75 + shift
    draw.line([(a, a), (b, b)], fill=0, width=4)
    draw.line([(b, a), (a, b)], fill=0, width=4)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def shipped_api(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str]]]:
    """An embedded app serving the shipped initialization, or a skip."""
    folder = shipped_init_dir()
    if folder is None:
        pytest.skip("the shipped initialization's weights are not in this checkout")
    with TestClient(create_app(make_settings(tmp_path / "data", folder))) as client:
        yield client, create_key(client, "acme")


def test_diagnostics_name_the_confusable_pair_and_leave_one_out_accuracy(
    shipped_api: tuple[TestClient, dict[str, str]],
) -> None:
    client, headers = shipped_api
    images = [ring_png(26, 0), ring_png(26, 3), ring_png(24, -2), ring_png(24, 2), cross_png(0)]
    labels = ["circle", "circle", "round", "round", "cross"]
    files = [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    response = client.post(
        "/v1/tasks?wait=60", headers=headers, files=files, data={"labels": labels}
    )
    assert response.status_code == 201, response.text
    task: dict[str, Any] = response.json()
    diagnostics = task["diagnostics"]
    # Only the two classes with two images are left out one at a time.
    assert diagnostics["evaluated_images"] == 4
    assert diagnostics["per_class"]["cross"] is None
    assert 0 <= diagnostics["leave_one_out_accuracy"] <= 1
    # Two near-identical circles are the most confusable pair, well above circle vs cross.
    pairs = diagnostics["confusable_pairs"]
    assert {pairs[0]["first"], pairs[0]["second"]} == {"circle", "round"}
    others = [p["similarity"] for p in pairs if "cross" in (p["first"], p["second"])]
    assert pairs[0]["similarity"] > max(others)
    assert len(pairs) == 3  # all pairs of 3 classes
    # The same figures in the job result and on a later GET.
    job = client.get(task["links"]["job"], headers=headers).json()
    assert job["result"]["diagnostics"] == diagnostics
    again = client.get(f"/v1/tasks/{task['id']}", headers=headers).json()
    assert again["diagnostics"] == diagnostics
    # support_accuracy stays for compatibility.
    assert "support_accuracy" in again["adapted_model"]
    # Computed from the adaptation's own first pass, they are diagnose_support's figures.
    import fewshot

    folder = shipped_init_dir()
    assert folder is not None
    init = fewshot.Initialization.load(folder)
    support = fewshot.preprocess_images([fewshot.decode_image(b) for b in images], init.config)
    direct = fewshot.diagnose_support(init, support, labels).to_dict()
    assert diagnostics["leave_one_out_accuracy"] == direct["leave_one_out_accuracy"]
    assert diagnostics["per_class"] == direct["per_class"]
    for got, want in zip(pairs, direct["confusable_pairs"], strict=True):
        assert (got["first"], got["second"]) == (want["first"], want["second"])
        assert got["similarity"] == pytest.approx(want["similarity"], abs=2e-4)


def test_single_shot_tasks_have_no_leave_one_out_accuracy(
    client: TestClient, auth: dict[str, str]
) -> None:
    files, data = support_files(["a", "b", "c"])
    response = client.post("/v1/tasks?wait=30", headers=auth, files=files, data=data)
    assert response.status_code == 201, response.text
    diagnostics = response.json()["diagnostics"]
    assert diagnostics["leave_one_out_accuracy"] is None
    assert diagnostics["evaluated_images"] == 0
    assert diagnostics["per_class"] == {"a": None, "b": None, "c": None}
    assert len(diagnostics["confusable_pairs"]) == 3
    for pair in diagnostics["confusable_pairs"]:
        assert -1 <= pair["similarity"] <= 1


def test_jobs_adapted_in_one_batch_record_their_own_diagnostics(
    client: TestClient, auth: dict[str, str]
) -> None:
    from app.jobs import runner
    from tests.helpers import runtime_of

    runtime = runtime_of(client)
    client.app.state.dispatcher.submit = lambda *args: None  # type: ignore[attr-defined]
    created = []
    for seed, labels in enumerate([["a", "a", "b"], ["x", "y", "y", "z"]]):
        files, data = support_files(labels, seed=seed)
        response = client.post("/v1/tasks", headers=auth, files=files, data=data)
        created.append(response.json())
    # One delivery adapts both queued jobs (app.adaptations.batch).
    assert runner.run_job(runtime, uuid.UUID(created[0]["job"]["id"])).status == "done"
    first, second = (client.get(f"/v1/tasks/{task['id']}", headers=auth).json() for task in created)
    assert first["diagnostics"]["per_class"].keys() == {"a", "b"}
    assert first["diagnostics"]["evaluated_images"] == 2
    assert second["diagnostics"]["per_class"].keys() == {"x", "y", "z"}
    assert second["diagnostics"]["evaluated_images"] == 2
    assert first["diagnostics"]["per_class"]["b"] is None
