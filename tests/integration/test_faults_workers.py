"""Worker faults on a private stack: slow jobs, killed and stopped workers, a backlog, no broker.

Every accepted job must reach one terminal state, once, within a lease plus a reaper period.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import func, select

from app.jobs.reaper import interval as reaper_interval
from app.models import AdaptedModel, Job
from tests.admin_data import dataset_zip, tiny_run, upload, wait_run
from tests.helpers import create_key, runtime_of, support_files
from tests.integration.conftest import ROOT, FaultStack
from tests.integration.faults import Worker, computations, wait_for

# A hang (a missing timeout) fails the test instead of blocking the run.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TERMINAL = ("succeeded", "failed", "cancelled")
# Enough meta-training iterations to outlive three SIGTERMs, few enough to finish soon after.
ITERATIONS = 60
# Celery's line for each message a worker takes from the broker.
RECEIVED = re.compile(r"Task maml_serve\.adapt\[[0-9a-f-]+\] received")


@pytest.fixture
def train_workers(fault_stack: FaultStack) -> Iterator[list[Worker]]:
    """Two train-queue workers (one takes over while the other restarts after a SIGTERM)."""
    pair = [fault_stack.worker("train", f"train-{i}") for i in range(2)]
    for worker in pair:
        worker.launch()
    for worker in pair:
        worker.wait_ready()
    yield pair
    for worker in pair:
        if worker.alive:
            worker.kill()


def test_sigterm_three_times_during_meta_training_spends_no_attempt(
    fault_stack: FaultStack, train_workers: list[Worker]
) -> None:
    stack = fault_stack
    client = stack.client
    admin = create_key(client, "trainer", admin=True)
    dataset = upload(client, admin, dataset_zip(), f"faults-{uuid.uuid4().hex[:6]}")
    assert dataset.status_code == 201, dataset.text
    body = tiny_run(
        dataset.json()["id"],
        algorithm={"iterations": ITERATIONS},
        validate_every=0,
        checkpoint_every_s=0.1,
    )
    run = client.post("/v1/admin/meta-trainings", headers=admin, json=body).json()
    reached = 0
    handovers: list[float] = []
    exits: list[float] = []
    for sigterms in (1, 2, 3):
        running: dict[str, Any] = wait_run(
            client,
            admin,
            run["id"],
            until=lambda b, r=reached: (
                b["state"] == "running" and (b["progress"]["checkpoint_iteration"] or 0) > r + 2
            ),
            timeout=90,
        )
        reached = running["progress"]["checkpoint_iteration"]
        job = _job(stack, run["id"])
        holder = next(w for w in train_workers if job.claimed_by and f":{w.pid}:" in job.claimed_by)
        stopped = time.monotonic()
        holder.terminate()
        exits.append(time.monotonic() - stopped)
        gone = time.monotonic()
        assert (
            sum(w.text().count(f"job {run['id']} handed back at shutdown") for w in train_workers)
            == sigterms
        )
        holder.launch()
        # Queued again, then taken by the other worker: no attempt spent, none lost.
        taken = wait_for(
            lambda h=holder: (
                (j := _job(stack, run["id"])).state != "queued"
                and not (j.claimed_by or "").count(f":{h.pid}:")
                and j
            ),
            timeout=60,
        )
        handovers.append(time.monotonic() - gone)
        assert taken.state in ("running", "succeeded") and taken.attempts == 1, taken.state
    final = wait_run(client, admin, run["id"], timeout=180)
    print("\nSIGTERM x3 during meta-training: warm shutdowns "
          + ", ".join(f"{e:.1f}" for e in exits) + " s; running again "
          + ", ".join(f"{h:.1f}" for h in handovers) + " s after each worker exited")  # fmt: skip
    # The first SIGTERM finds the other worker up (later ones may wait for a restart to boot):
    # the run is re-sent and resumed within a lease and a reaper period of the hand-back.
    lease = stack.settings.train_lease_seconds
    assert handovers[0] < lease + reaper_interval(runtime_of(client)) + 2, handovers
    assert final["state"] == "succeeded", final
    assert final["attempts"] == 1 and final["progress"]["iteration"] == ITERATIONS
    assert len(final["progress"]["resumes"]) == 3


@pytest.fixture(scope="module")
def workers(fault_stack: FaultStack) -> Iterator[dict[str, Worker]]:
    """Two adapt workers, and one on the train queue whose reaper outlives every kill."""
    started = {
        "reaper": fault_stack.worker("train", "reaper"),
        "a": fault_stack.worker("adapt", "adapt-a"),
        "b": fault_stack.worker("adapt", "adapt-b"),
    }
    for worker in started.values():
        worker.launch()
    for worker in started.values():
        worker.wait_ready()
    yield started
    fault_stack.slow_adapt(0)
    for worker in started.values():
        if worker.alive:
            worker.kill()


def _job(stack: FaultStack, job_id: str) -> Job:
    with runtime_of(stack.client).sessions() as session:
        job = session.get(Job, uuid.UUID(job_id))
        assert job is not None
        return job


def _post_task(stack: FaultStack, headers: dict[str, str], seed: int) -> str:
    files, data = support_files(["a", "b"], seed=seed)
    response = stack.client.post("/v1/tasks", headers=headers, files=files, data=data)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["job"]["id"]
    return job_id


def _wait_terminal(stack: FaultStack, job_id: str, timeout: float) -> Job:
    return wait_for(lambda: (job := _job(stack, job_id)).state in TERMINAL and job, timeout)  # type: ignore[no-any-return]


def _models(stack: FaultStack, job_id: str) -> int:
    with runtime_of(stack.client).sessions() as session:
        return int(
            session.scalar(select(func.count()).where(AdaptedModel.job_id == uuid.UUID(job_id)))
            or 0
        )


def test_a_job_slower_than_its_lease_runs_once(
    fault_stack: FaultStack, workers: dict[str, Worker]
) -> None:
    stack = fault_stack
    lease = stack.settings.job_lease_seconds
    stack.slow_adapt(2.5 * lease)
    headers = create_key(stack.client, "slow")
    job_id = _post_task(stack, headers, seed=1)
    job = _wait_terminal(stack, job_id, timeout=2.5 * lease + 60)
    stack.slow_adapt(0)
    assert job.state == "succeeded" and job.attempts == 1, (job.state, job.error_code)
    assert job.started_at is not None and job.finished_at is not None
    assert (job.finished_at - job.started_at).total_seconds() > 2 * lease
    # Both adapt workers were idle all along: neither reaper re-sent the job it saw renewed.
    assert computations(list(workers.values()), job_id) == 1
    assert _models(stack, job_id) == 1


def test_a_worker_killed_on_every_attempt_leaves_the_job_failed_within_a_lease(
    fault_stack: FaultStack, workers: dict[str, Worker]
) -> None:
    stack = fault_stack
    lease = stack.settings.job_lease_seconds
    stack.slow_adapt(600)  # no attempt can finish: each one is killed while it computes
    headers = create_key(stack.client, "killed")
    job_id = _post_task(stack, headers, seed=2)
    adapt = [workers["a"], workers["b"]]
    killed_at = 0.0
    for attempt in (1, 2, 3):
        job = wait_for(
            lambda a=attempt: (
                (j := _job(stack, job_id)).state == "running" and j.attempts == a and j
            ),
            timeout=4 * lease + 90,
        )
        victim = next(w for w in adapt if job.claimed_by and f":{w.pid}:" in job.claimed_by)
        # Killed while it computes: after the hook has said so.
        wait_for(lambda v=victim, a=attempt: f"job {job_id} attempt {a}" in v.text(), 30)
        victim.kill()
        killed_at = time.monotonic()
        victim.launch()  # a deploy's restart; it may pick the next attempt up
    job = _wait_terminal(
        stack, job_id, timeout=lease + reaper_interval(runtime_of(stack.client)) + 10
    )
    recovery = time.monotonic() - killed_at
    stack.slow_adapt(0)
    print(
        f"\nkilled on every attempt: failed {recovery:.1f} s after the last kill (lease {lease} s)"
    )
    assert job.state == "failed" and job.error_code == "attempts_exhausted"
    assert job.attempts == 3 and _models(stack, job_id) == 0
    assert recovery <= lease + reaper_interval(runtime_of(stack.client)) + 2
    assert computations(list(workers.values()), job_id) == 3
    for worker in adapt:
        worker.wait_ready()
    assert stack.client.get(f"/v1/jobs/{job_id}", headers=headers).json()["error"]["code"] == (
        "attempts_exhausted"
    )


def test_a_backlog_of_forty_jobs_holds_about_one_message_per_job(
    fault_stack: FaultStack, workers: dict[str, Worker]
) -> None:
    stack = fault_stack
    workers["b"].terminate()  # one adapt worker, so the backlog waits several leases
    only = workers["a"]
    before = len(RECEIVED.findall(only.text()))
    stack.slow_adapt(0.2)
    broker = stack.redis.client()
    samples: list[tuple[int, int]] = []
    jobs: list[str] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            posted = len(jobs)
            samples.append((int(broker.llen("adapt")), posted))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    headers = create_key(stack.client, "backlog")
    resent_before = sum(w.text().count("re-sent adapt job") for w in workers.values())
    try:
        for i in range(40):
            jobs.append(_post_task(stack, headers, seed=100 + i))
        ended = [_wait_terminal(stack, job_id, timeout=180) for job_id in jobs]
    finally:
        done.set()
        sampler.join()
        stack.slow_adapt(0)
    drained = time.monotonic() - started
    most = max(messages for messages, _ in samples)
    print(f"\nbacklog of 40: drained in {drained:.1f} s, at most {most} messages queued")
    assert drained > 2 * stack.settings.job_lease_seconds, "the backlog must outlive a few leases"
    assert all(j.state == "succeeded" and j.attempts == 1 for j in ended)
    # Never much more than one message per job accepted so far (lost ones excepted: none here).
    assert max(messages - posted for messages, posted in samples) <= 2, samples
    resent = sum(w.text().count("re-sent adapt job") for w in workers.values()) - resent_before
    assert resent <= 2
    # Messages of jobs that a batch already ran are consumed later, as no-ops: wait for them.
    wait_for(lambda: broker.llen("adapt") == 0, timeout=60)
    received = wait_for(
        lambda: (n := len(RECEIVED.findall(only.text())) - before) >= 40 + resent and n, 30
    )
    assert received == 40 + resent
    assert sum(computations([only], j) for j in jobs) == 40
    workers["b"].start()


def test_a_worker_without_a_broker_refuses_to_start_with_one_line() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAML_SERVE_")}
    env["PYTHONPATH"] = str(ROOT)
    commands = {
        "maml-serve worker": [sys.executable, "-m", "app.cli", "worker"],
        "celery worker": [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
                          "--pool", "solo", "--without-gossip", "--without-mingle"],
    }  # fmt: skip
    for name, command in commands.items():
        started = time.monotonic()
        done = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode != 0, f"{name} started without a broker"
        reason = [line for line in done.stderr.splitlines() if "no broker configured" in line]
        assert len(reason) == 1 and "MAML_SERVE_BROKER_URL" in reason[0], (name, done.stderr)
        assert "ready." not in done.stdout + done.stderr
        assert time.monotonic() - started < 30
