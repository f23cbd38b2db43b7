"""PostgreSQL and Redis stopped or frozen under the API: 503 problem+json in bounded time, then recovery.

The services are the fault stack's own (a private cluster and redis-server), so stopping and
freezing them touches nothing else. Every job accepted around a fault ends once; nothing a
rejected request sent is left behind.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import delete, func, select

from app.jobs import state
from app.models import AdaptedModel, Job, SupportExample, Task
from tests.helpers import create_key, runtime_of, support_files
from tests.integration.conftest import FaultStack
from tests.integration.faults import Worker, wait_for

# A hang (a missing timeout) fails the test instead of blocking the run.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def adapt_worker(fault_stack: FaultStack) -> Iterator[Worker]:
    """One worker on the adapt queue."""
    worker = fault_stack.worker("adapt", "services")
    worker.start()
    yield worker
    # The stack outlives this module: a worker left on the adapt queue would take the next
    # module's jobs.
    if worker.alive:
        worker.kill()


def _post(stack: FaultStack, headers: dict[str, str], seed: int, **extra: str) -> httpx.Response:
    files, data = support_files(["a", "b"], seed=seed)
    response: httpx.Response = stack.client.post(
        "/v1/tasks", headers={**headers, **extra}, files=files, data=data
    )
    return response


def _timed(call: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


def _assert_503(response: httpx.Response, codes: tuple[str, ...]) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["code"] in codes, body
    if body["code"] != "not_ready":
        assert int(response.headers["retry-after"]) >= 1
    # No internal address leaks into an answer.
    assert "127.0.0.1" not in response.text and "postgresql" not in response.text.lower()


def _succeeded_once(stack: FaultStack, job_id: str, timeout: float = 60) -> None:
    def ended() -> Job | None:
        with runtime_of(stack.client).sessions() as session:
            job = session.get(Job, uuid.UUID(job_id))
            return job if job is not None and job.state not in ("queued", "running") else None

    job: Job = wait_for(ended, timeout)
    assert job.state == "succeeded", (job.state, job.error_code)
    with runtime_of(stack.client).sessions() as session:
        models = session.scalar(select(func.count()).where(AdaptedModel.job_id == job.id))
    assert models == 1


def _rows(stack: FaultStack) -> tuple[int, int, int]:
    with runtime_of(stack.client).sessions() as session:
        return tuple(  # type: ignore[return-value]
            int(session.scalar(select(func.count()).select_from(table)) or 0)
            for table in (Task, SupportExample, Job)
        )


def _files(stack: FaultStack) -> set[str]:
    root = runtime_of(stack.client).store.root
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _recover(stack: FaultStack, headers: dict[str, str], timeout: float = 30) -> float:
    started = time.monotonic()
    wait_for(lambda: stack.client.get("/v1/tasks", headers=headers).status_code == 200, timeout)
    return time.monotonic() - started


def test_postgresql_stopped_for_fifteen_seconds(
    fault_stack: FaultStack, adapt_worker: Worker
) -> None:
    stack = fault_stack
    headers = create_key(stack.client, "pg-stopped")
    before = _post(stack, headers, seed=1)
    assert before.status_code == 202, before.text
    stack.postgres.stop()
    stopped = time.monotonic()
    worst = 0.0
    try:
        while time.monotonic() - stopped < 15:
            for call in (
                lambda: stack.client.get("/v1/tasks", headers=headers),
                lambda: _post(stack, headers, seed=2),
                lambda: stack.client.get(f"/v1/jobs/{before.json()['job']['id']}", headers=headers),
            ):
                response, took = _timed(call)
                _assert_503(response, ("database_unavailable",))
                worst = max(worst, took)
            response, took = _timed(lambda: stack.client.get("/readyz"))
            _assert_503(response, ("not_ready",))
            assert response.json()["checks"]["database"] is False
            worst = max(worst, took)
            time.sleep(0.5)
    finally:
        stack.postgres.start()
    recovery = _recover(stack, headers)
    print(f"\nPostgreSQL stopped 15 s: slowest 503 {worst:.2f} s; answers again {recovery:.2f} s "
          "after it is back")  # fmt: skip
    assert worst < 2
    after = _post(stack, headers, seed=3)
    assert after.status_code == 202, after.text
    for response in (before, after):
        _succeeded_once(stack, response.json()["job"]["id"])


def test_postgresql_frozen(fault_stack: FaultStack, adapt_worker: Worker) -> None:
    stack = fault_stack
    settings = stack.settings
    headers = create_key(stack.client, "pg-frozen")
    # A silent server is given up on after statement_timeout + 1 s; a new connection after
    # connect_timeout.
    bound = (
        settings.database_statement_timeout_seconds + 1 + settings.database_connect_timeout_seconds
    )
    with stack.postgres.frozen():
        response, took = _timed(lambda: stack.client.get("/v1/tasks", headers=headers))
        _assert_503(response, ("database_unavailable",))
        ready, ready_took = _timed(lambda: stack.client.get("/readyz"))
        _assert_503(ready, ("not_ready",))
        scraped, scrape_took = _timed(lambda: stack.client.get("/metrics"))
        assert scraped.status_code == 200 and "maml_serve_http_requests_total" in scraped.text
    recovery = _recover(stack, headers)
    print(f"\nPostgreSQL frozen: 503 after {took:.2f} s (bound {bound:g} s), /readyz after "
          f"{ready_took:.2f} s; answers {recovery:.2f} s after SIGCONT")  # fmt: skip
    assert took < bound + 1
    assert ready_took < settings.readiness_timeout_seconds + 1
    assert scrape_took < bound + 1, scrape_took
    created = _post(stack, headers, seed=4)
    assert created.status_code == 202, created.text
    _succeeded_once(stack, created.json()["job"]["id"])


def test_redis_frozen(fault_stack: FaultStack, adapt_worker: Worker) -> None:
    stack = fault_stack
    settings = stack.settings
    headers = create_key(stack.client, "redis-frozen")
    rows = _rows(stack)
    # A publish and its one retry, whose reconnect also waits: three broker timeouts at most.
    bound = 3 * settings.broker_timeout_seconds + 0.5
    with stack.redis.frozen():
        response, took = _timed(lambda: _post(stack, headers, seed=5))
        _assert_503(response, ("broker_unavailable",))
        ready, ready_took = _timed(lambda: stack.client.get("/readyz"))
        _assert_503(ready, ("not_ready",))
        assert ready.json()["checks"]["broker"] is False
        scraped, scrape_took = _timed(lambda: stack.client.get("/metrics"))
        # Process metrics and job gauges still come; the broker's gauges are left out.
        assert scraped.status_code == 200 and "maml_serve_jobs{" in scraped.text
        assert "maml_serve_queue_depth{" not in scraped.text
    thawed = time.monotonic()
    assert _rows(stack) == rows
    created = _post(stack, headers, seed=6)
    assert created.status_code == 202, created.text
    _succeeded_once(stack, created.json()["job"]["id"])
    recovery = time.monotonic() - thawed
    print(f"\nRedis frozen: 503 after {took:.2f} s (bound {bound:g} s), /readyz after "
          f"{ready_took:.2f} s; a job accepted and done {recovery:.2f} s after SIGCONT")  # fmt: skip
    assert took < bound + 1
    assert ready_took < settings.readiness_timeout_seconds + 1
    assert scrape_took < bound + 1, scrape_took


def test_redis_down_then_a_retry_with_the_same_idempotency_key(
    fault_stack: FaultStack, adapt_worker: Worker
) -> None:
    stack = fault_stack
    headers = create_key(stack.client, "redis-down")
    key = {"Idempotency-Key": f"faults-{uuid.uuid4().hex}"}
    rows, files = _rows(stack), _files(stack)
    stack.redis.stop()
    try:
        refused, took = _timed(lambda: _post(stack, headers, seed=7, **key))
        _assert_503(refused, ("broker_unavailable",))
        assert _rows(stack) == rows and _files(stack) == files, (
            "the rejected request left rows or files"
        )
    finally:
        stack.redis.start()
    restarted = time.monotonic()
    retried = _post(stack, headers, seed=7, **key)
    assert retried.status_code == 202, retried.text
    _succeeded_once(stack, retried.json()["job"]["id"])
    recovery = time.monotonic() - restarted
    again = _post(stack, headers, seed=7, **key)
    assert again.status_code in (200, 201, 202) and again.json()["id"] == retried.json()["id"]
    print(f"\nRedis down: 503 after {took:.2f} s; the retried job done {recovery:.2f} s after "
          "Redis is back")  # fmt: skip
    assert took < 2


def test_readyz_is_false_while_a_queue_with_work_has_no_worker(
    fault_stack: FaultStack, adapt_worker: Worker
) -> None:
    stack = fault_stack
    started = time.monotonic()
    ready = stack.client.get("/readyz")
    assert time.monotonic() - started < stack.settings.readiness_timeout_seconds + 1
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["workers"] is True
    # A meta-training job waits, and no worker consumes the train queue in this module.
    with runtime_of(stack.client).sessions() as session:
        job = state.new_job(kind="meta_train", settings=stack.settings)
        session.add(job)
        session.commit()
        job_id = job.id
    try:
        started = time.monotonic()
        unserved = stack.client.get("/readyz")
        assert time.monotonic() - started < stack.settings.readiness_timeout_seconds + 1
        _assert_503(unserved, ("not_ready",))
        checks = unserved.json()["checks"]
        assert checks["workers"] is False and checks["queues_without_workers"] == ["train"]
        assert checks["database"] is True and checks["broker"] is True
    finally:
        with runtime_of(stack.client).sessions() as session:
            session.execute(delete(Job).where(Job.id == job_id))
            session.commit()
        stack.redis.client().delete("train")
    assert stack.client.get("/readyz").status_code == 200
