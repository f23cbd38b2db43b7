"""Admin meta-retraining on PostgreSQL + Redis with real Celery workers (one on the train queue)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.core.config import Settings
from app.models import Dataset
from tests.admin_data import omniglot_alphabets_zip, tiny_run, upload, wait_run
from tests.data_paths import OMNIGLOT_ZIP
from tests.helpers import create_key, runtime_of, support_files
from tests.integration.conftest import ROOT, _environment

pytestmark = pytest.mark.integration


class TrainWorker:
    """A `celery worker -Q train` subprocess that a test can kill and start again."""

    def __init__(self, settings: Settings, log: Path) -> None:
        self.env = {
            **_environment(settings),
            # A short lease, so a killed worker's run is picked up again within seconds.
            "MAML_SERVE_TRAIN_LEASE_SECONDS": "2",
            "MAML_SERVE_TORCH_THREADS": "1",
        }
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the worker and wait until it is ready."""
        offset = self.log.stat().st_size if self.log.exists() else 0
        command = [
            sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", "train",
            "--pool", "solo", "--loglevel", "INFO", "--without-gossip", "--without-mingle",
            "-n", f"train-{uuid.uuid4().hex[:6]}@%h",
        ]  # fmt: skip
        with self.log.open("a") as out:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 90
        while "ready." not in self.log.read_text()[offset:]:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                pytest.fail(f"the train worker did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL: no checkpoint, no acknowledgement, no goodbye."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        """Warm shutdown."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def train_worker(
    production_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TrainWorker]:
    """A running train-queue worker."""
    worker = TrainWorker(production_settings, tmp_path_factory.mktemp("train") / "worker.log")
    worker.start()
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def omniglot_zip() -> bytes:
    """Three Omniglot background alphabets as a dataset zip."""
    data = omniglot_alphabets_zip(3)
    if data is None:
        pytest.skip(f"Omniglot zip not found at {OMNIGLOT_ZIP} (set MAML_SERVE_OMNIGLOT_ZIP)")
    return data


@pytest.fixture(scope="module")
def dataset(
    production_client: TestClient, omniglot_zip: bytes, train_worker: TrainWorker
) -> dict[str, Any]:
    """The three alphabets, uploaded by an admin."""
    admin = create_key(production_client, "admin-tenant", admin=True)
    response = upload(production_client, admin, omniglot_zip, f"omniglot-3-{uuid.uuid4().hex[:6]}")
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    assert body["details"]["groups"] == 3 and body["image_count"] == body["class_count"] * 20
    return {**body, "headers": admin}


def _wait_task(client: TestClient, headers: dict[str, str], task_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        task: dict[str, Any] = client.get(f"/v1/tasks/{task_id}", headers=headers).json()
        if task["status"] != "adapting":
            assert task["status"] == "ready", task
            return task
        time.sleep(0.05)
    raise AssertionError(f"task {task_id} not ready")


def test_meta_train_promote_adapt_rollback(
    production_client: TestClient, dataset: dict[str, Any]
) -> None:
    client, admin = production_client, dataset["headers"]
    # A user of the admin's tenant: a trained version and its promotion serve that tenant only.
    user = create_key(client, "admin-tenant")
    active_before = client.get("/v1/initializations", headers=user).json()["active_version"]
    body = tiny_run(
        dataset["id"],
        model={"width": 16},
        algorithm={"iterations": 40, "meta_batch": 4},
        validation_split=0.34,
        validation_episodes=10,
        validate_every=20,
    )
    run = client.post("/v1/admin/meta-trainings", headers=admin, json=body).json()
    seen: set[tuple[str, int]] = set()

    def record(b: dict[str, Any]) -> bool:
        seen.add((b["state"], b["progress"]["iteration"] or 0))
        return b["state"] not in ("queued", "running")

    # A hang guard: evaluating against the global baseline takes ~2 minutes on a slow 2-core CPU.
    run = wait_run(client, admin, run["id"], until=record, timeout=300)
    assert run["state"] == "succeeded", run
    moving = {i for state, i in seen if state == "running" and 0 < i < 40}
    assert moving, f"no progress seen between 0 and 40: {sorted(seen)}"
    assert run["progress"]["iteration"] == 40 and run["attempts"] == 1
    assert [p["iteration"] for p in run["curve"]] == list(range(2, 41, 2))
    metrics = run["result"]["metrics"]
    assert metrics["validation"]["5w1s"]["episodes"] == 10
    assert metrics["baseline"]["version"] == active_before
    assert client.get(run["links"]["curve"], headers=admin).content.startswith(b"\x89PNG")
    version = run["result"]["initialization_version"]

    promoted = client.post(f"/v1/admin/initializations/{version}/promote", headers=admin).json()
    assert promoted == {"active_version": version, "previous_version": active_before}
    # The adapt worker has been running all along: it picks up the new version by itself.
    files, data = support_files(["a", "b", "c"])
    task = client.post("/v1/tasks", headers=user, files=files, data=data).json()
    task = _wait_task(client, user, task["id"])
    assert task["initialization_version"] == version
    assert task["adapted_model"]["initialization_version"] == version

    back = client.post("/v1/admin/initializations/rollback", headers=admin).json()
    assert back == {"active_version": active_before, "previous_version": version}
    readapt = client.post(f"/v1/tasks/{task['id']}/adaptations", headers=user)
    assert readapt.status_code == 202, readapt.text
    deadline = time.monotonic() + 60
    while client.get(f"/v1/jobs/{readapt.json()['id']}", headers=user).json()["state"] != (
        "succeeded"
    ):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    task = client.get(f"/v1/tasks/{task['id']}", headers=user).json()
    assert task["adapted_model"]["initialization_version"] == active_before
    models = client.get(f"/v1/tasks/{task['id']}/adaptations", headers=user).json()["items"]
    assert [m["initialization_version"] for m in models] == [active_before, version]


def test_killed_worker_resumes_from_checkpoint_and_cancel_stops_it(
    production_client: TestClient,
    production_settings: Settings,
    dataset: dict[str, Any],
    train_worker: TrainWorker,
) -> None:
    client, admin = production_client, dataset["headers"]
    body = tiny_run(
        dataset["id"],
        algorithm={"iterations": 100_000},
        validation_split=0.34,
        validate_every=0,
        checkpoint_every_s=0.2,
    )
    run = client.post("/v1/admin/meta-trainings", headers=admin, json=body).json()
    wait_run(
        client,
        admin,
        run["id"],
        until=lambda b: (b["progress"]["checkpoint_iteration"] or 0) >= 6,
        timeout=300,
    )
    train_worker.kill()
    # The run folder is the worker's working folder (the same data dir as the API here).
    state_file = runtime_of(client).settings.work_dir / f"jobs/{run['id']}/run/state.json"
    checkpointed = json.loads(state_file.read_text())["iteration"]
    assert checkpointed >= 6
    train_worker.start()
    resumed = wait_run(
        client, admin, run["id"], until=lambda b: bool(b["progress"]["resumes"]), timeout=60
    )
    resume = resumed["progress"]["resumes"][0]
    assert resume["attempt"] == 2 and resume["iteration"] >= checkpointed > 0
    moving = wait_run(
        client,
        admin,
        run["id"],
        until=lambda b: (b["progress"]["iteration"] or 0) > resume["iteration"],
        timeout=60,
    )
    assert moving["state"] == "running"
    assert client.post(run["links"]["cancel"], headers=admin).status_code == 202
    run = wait_run(client, admin, run["id"], timeout=60)
    assert run["state"] == "cancelled" and run["result"] is None
    assert run["progress"]["iteration"] < 100_000


def test_bad_zips_leave_nothing_on_postgres(
    production_client: TestClient, dataset: dict[str, Any]
) -> None:
    client, admin = production_client, dataset["headers"]
    runtime = runtime_of(client)
    with runtime.sessions() as session:
        before = session.scalar(select(func.count()).select_from(Dataset))
    folders = set((runtime.store.root / "datasets").iterdir())
    slip = upload(client, admin, _zip({"c/0.png": b"x", "../../escape.png": b"x"}), "slip")
    assert slip.status_code == 422 and slip.json()["code"] == "unsafe_dataset_path"
    user = create_key(client, "plain-user")
    assert upload(client, user, _zip({"c/0.png": b"x"}), "forbidden").status_code == 403
    with runtime.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Dataset)) == before
    assert set((runtime.store.root / "datasets").iterdir()) == folders


def _zip(members: dict[str, bytes]) -> bytes:
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_a_run_whose_message_the_broker_lost_still_runs(
    production_client: TestClient,
    production_settings: Settings,
    dataset: dict[str, Any],
    train_worker: TrainWorker,
) -> None:
    client, admin = production_client, dataset["headers"]
    train_worker.stop()
    body = tiny_run(
        dataset["id"],
        algorithm={"iterations": 4, "meta_batch": 2},
        validation_split=0.34,
        validation_episodes=4,
        validate_every=0,
    )
    run = client.post("/v1/admin/meta-trainings", headers=admin, json=body).json()
    # The broker forgets the message, as a Redis restarted without persistence would.
    assert production_settings.broker_url is not None
    broker = redis.Redis.from_url(production_settings.broker_url.get_secret_value())
    assert broker.delete("train") == 1
    train_worker.start()
    run = wait_run(client, admin, run["id"], timeout=300)
    assert run["state"] == "succeeded" and run["attempts"] == 1, run
    assert "re-sent meta_train job " + run["id"] in train_worker.log.read_text()
