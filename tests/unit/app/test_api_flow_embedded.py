"""The Omniglot flow on the embedded default: SQLite, in-process executor, no Redis."""

from __future__ import annotations

import random
import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.main import create_app
from app.models import AdaptedModel, Job, Prediction, SupportExample, Task
from tests.helpers import Omniglot, create_key, make_settings, runtime_of, shipped_init_dir


def _files(pairs: list[tuple[bytes, str]]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (f"{i}.png", data, "image/png")) for i, (data, _) in enumerate(pairs)]


@pytest.fixture
def embedded(tmp_path: Path, tiny_init_dir: Path) -> Any:
    """An embedded app on the shipped initialization when present, else the tiny random one."""
    settings = make_settings(tmp_path / "data", shipped_init_dir() or tiny_init_dir)
    with TestClient(create_app(settings)) as client:
        yield client


def test_five_way_one_shot_on_the_embedded_default(
    embedded: TestClient, omniglot: Omniglot
) -> None:
    headers = create_key(embedded, "acme")
    support, queries = omniglot.episode(random.Random(1), ways=5, shots=1, queries=1)
    response = embedded.post(
        "/v1/tasks?wait=30",
        headers=headers,
        files=_files(support),
        data={"labels": [label for _, label in support]},
    )
    assert response.status_code == 201, response.text
    task = response.json()
    response = embedded.post(
        f"/v1/tasks/{task['id']}/predictions", headers=headers, files=_files(queries)
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == 5

    task_id = uuid.UUID(task["id"])
    with runtime_of(embedded).sessions() as session:
        assert session.get(Task, task_id) is not None
        for model, expected in ((SupportExample, 5), (Job, 1), (AdaptedModel, 1), (Prediction, 5)):
            count = session.scalar(
                select(func.count()).select_from(model).where(model.task_id == task_id)
            )
            assert count == expected, model.__name__
    assert runtime_of(embedded).settings.sqlalchemy_url.startswith("sqlite")
