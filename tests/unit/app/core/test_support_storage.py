"""Where support images are kept: small ones in their database rows, larger ones in files."""

from __future__ import annotations

import uuid

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from app.models import AdaptedModel, SupportExample
from tests.helpers import png, runtime_of


def _examples(client: TestClient, task_id: str) -> list[SupportExample]:
    with runtime_of(client).sessions() as session:
        return list(
            session.scalars(
                select(SupportExample)
                .where(SupportExample.task_id == uuid.UUID(task_id))
                .order_by(SupportExample.position)
            )
        )


def _weights(client: TestClient, task_id: str) -> dict[str, torch.Tensor]:
    runtime = runtime_of(client)
    with runtime.sessions() as session:
        row = session.scalars(
            select(AdaptedModel).where(AdaptedModel.task_id == uuid.UUID(task_id))
        ).one()
        return load_file(str(runtime.store.path(row.weights_key)))


def _post(client: TestClient, auth: dict[str, str], images: list[bytes]) -> str:
    files = [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    labels = [f"c{i}" for i in range(len(images))]
    response = client.post("/v1/tasks?wait=30", headers=auth, files=files, data={"labels": labels})
    assert response.status_code == 201, response.text
    task_id: str = response.json()["id"]
    return task_id


def test_small_images_live_in_their_rows_and_large_ones_in_files(
    client: TestClient, auth: dict[str, str]
) -> None:
    runtime = runtime_of(client)
    small, large, other = png(1), png(2, size=(160, 160)), png(3)
    runtime.settings.support_inline_max_bytes = max(len(small), len(other))
    assert len(large) > runtime.settings.support_inline_max_bytes
    task_id = _post(client, auth, [small, large, other])

    examples = _examples(client, task_id)
    inline = [e.position for e in examples if e.data is not None]
    in_files = [e.position for e in examples if e.image_key is not None]
    assert all((e.data is None) != (e.image_key is None) for e in examples)
    assert inline == [0, 2] and in_files == [1]
    assert examples[0].data == small
    stored = examples[1]
    assert stored.image_key is not None
    assert runtime.store.read_bytes(stored.image_key, stored.sha256) == large
    # Only the large image has a file: no support file was written for the inline ones.
    support = runtime.store.path(f"tasks/{task_id}/support")
    assert [p.name for p in support.iterdir()] == [f"{stored.sha256}.png"]

    # The same support set kept all in files adapts to the same weights.
    runtime.settings.support_inline_max_bytes = 0
    again = _post(client, auth, [small, large, other])
    assert all(e.data is None for e in _examples(client, again))
    ours, theirs = _weights(client, task_id), _weights(client, again)
    assert ours.keys() == theirs.keys()
    for name, value in ours.items():
        torch.testing.assert_close(value, theirs[name], rtol=0, atol=0)


def test_a_task_of_small_images_writes_only_its_weights(
    client: TestClient, auth: dict[str, str]
) -> None:
    task_id = _post(client, auth, [png(1), png(2)])
    folder = runtime_of(client).store.path(f"tasks/{task_id}")
    assert [p.suffix for p in folder.rglob("*") if p.is_file()] == [".safetensors"]


def test_a_row_holds_its_image_exactly_once(client: TestClient, auth: dict[str, str]) -> None:
    task_id = _post(client, auth, [png(1), png(2)])
    with runtime_of(client).sessions() as session:
        example = session.scalars(
            select(SupportExample).where(SupportExample.task_id == uuid.UUID(task_id))
        ).first()
        assert example is not None
        example.image_key = "tasks/x/support/y.png"
        with pytest.raises(IntegrityError):
            session.commit()
        session.rollback()
        example.image_key = None
        example.data = None
        with pytest.raises(IntegrityError):
            session.commit()
