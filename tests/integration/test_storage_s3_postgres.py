"""The production stack on S3: PostgreSQL, Redis, a real Celery worker and a SeaweedFS bucket.

The API and the worker have data folders of their own: a task's images, its adapted weights and
the initialization reach the other process only through the bucket.
"""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select

from app.core.migrate import upgrade
from app.main import create_app
from app.models import AdaptedModel
from tests.helpers import create_key, make_settings, runtime_of
from tests.integration.conftest import _environment, create_database, drop_database, unavailable
from tests.integration.faults import Worker
from tests.seaweedfs import SeaweedFS

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@dataclass
class S3Stack:
    """The API (a TestClient) and one worker process, both on the bucket under `prefix`."""

    client: TestClient
    server: SeaweedFS
    prefix: str
    api_dir: Path
    worker_dir: Path
    worker: Worker

    def keys(self, under: str) -> list[str]:
        """The bucket's keys under `<prefix>/<under>`, without the prefix."""
        listed = self.server.client().list_objects_v2(
            Bucket=self.server.bucket, Prefix=f"{self.prefix}/{under}"
        )
        return sorted(o["Key"].removeprefix(f"{self.prefix}/") for o in listed.get("Contents", []))


def _own_database(redis_url: str) -> str:
    # A Redis database of its own: the session's other worker consumes the same queue names.
    return redis_url.rsplit("/", 1)[0] + "/12"


@pytest.fixture(scope="module")
def s3_stack(
    s3_server: SeaweedFS,
    redis_url: str,
    init_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[S3Stack]:
    """A fresh database, a private Redis database, the bucket; the API and a worker on them."""
    import redis

    try:
        database = create_database("maml_serve_s3")
    except Exception as exc:
        unavailable(f"PostgreSQL not reachable: {exc}")
    broker = _own_database(redis_url)
    redis.Redis.from_url(broker).flushdb()
    folder = tmp_path_factory.mktemp("s3stack")
    prefix = f"stack-{uuid.uuid4().hex[:8]}"
    settings = make_settings(
        folder / "api", init_dir, database_url=database, broker_url=broker,
        artifact_backend="s3", s3_bucket=s3_server.bucket, s3_prefix=prefix,
        s3_endpoint_url=s3_server.endpoint, s3_region="us-east-1",
    )  # fmt: skip
    upgrade(settings)
    env = {
        **_environment(settings),
        **s3_server.settings_env(prefix),
        "MAML_SERVE_DATA_DIR": str(folder / "worker"),
    }
    worker = Worker(env, "adapt", folder / "worker.log")
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name, value in s3_server.settings_env(prefix).items():
                if name.startswith("AWS_"):
                    patch.setenv(name, value)
            worker.start()
            with TestClient(create_app(settings)) as client:
                yield S3Stack(client, s3_server, prefix, folder / "api", folder / "worker", worker)
    finally:
        worker.terminate()
        redis.Redis.from_url(broker).flushdb()
        drop_database(database)


def noise_png(seed: int, side: int = 160) -> bytes:
    """A grey PNG of random pixels: incompressible, over the 16 KiB kept in a row."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "L").save(out, "PNG")
    return out.getvalue()


def _wait_ready(client: TestClient, headers: dict[str, str], task: dict[str, Any]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = client.get(task["links"]["job"], headers=headers).json()
        if job["state"] not in ("queued", "running"):
            assert job["state"] == "succeeded", job
            return
        time.sleep(0.1)
    raise AssertionError(f"task {task['id']} not ready")


def test_a_task_lives_in_the_bucket_from_creation_to_deletion(s3_stack: S3Stack) -> None:
    client = s3_stack.client
    headers = create_key(client, f"tenant-{uuid.uuid4().hex[:6]}")
    images = [noise_png(seed) for seed in range(3)]
    assert min(len(image) for image in images) > 16 * 1024
    files = [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    response = client.post("/v1/tasks", headers=headers, files=files,
                           data={"labels": ["a", "b", "c"]})  # fmt: skip
    assert response.status_code == 202, response.text
    task = response.json()
    _wait_ready(client, headers, task)
    queries = [("images", ("q.png", noise_png(7), "image/png"))]
    predicted = client.post(f"/v1/tasks/{task['id']}/predictions", headers=headers, files=queries)
    assert predicted.status_code == 200, predicted.text
    assert len(predicted.json()["predictions"]) == 1

    stored = s3_stack.keys(f"tasks/{task['id']}/")
    support = [k for k in stored if "/support/" in k]
    models = [k for k in stored if "/models/" in k]
    assert len(support) == 3 and len(models) == 1, stored
    assert s3_stack.keys("initializations/")
    # Nothing went through a local artifact folder: the worker fetched the images and the
    # initialization from the bucket, the API the weights it never saw written.
    for data_dir in (s3_stack.api_dir, s3_stack.worker_dir):
        artifacts = data_dir / "artifacts"
        assert not artifacts.exists() or not any(artifacts.rglob("*")), data_dir
    with runtime_of(client).sessions() as session:
        weights = session.scalars(
            select(AdaptedModel.sha256).where(AdaptedModel.task_id == uuid.UUID(task["id"]))
        ).one()
    # The API's verified local copy of the weights the worker wrote.
    assert (s3_stack.api_dir / "artifact-cache" / "files" / weights[:2] / weights).is_file()
    log = s3_stack.worker.text()
    assert f"fault hook: running job {task['job']['id']}" in log

    assert client.delete(f"/v1/tasks/{task['id']}", headers=headers).status_code == 204
    assert s3_stack.keys(f"tasks/{task['id']}/") == []
    assert s3_stack.keys("initializations/")
