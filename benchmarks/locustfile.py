"""Mixed load for Locust: 70% reads of a job or task, 20% predictions (16 images), 10% new tasks.

Users ramp linearly from 1 to MAML_SERVE_BENCH_USERS (default 64) over MAML_SERVE_BENCH_RAMP
seconds (default: 60% of MAML_SERVE_BENCH_SECONDS, default 150), then hold. With
MAML_SERVE_BENCH_WARMUP > 0, the statistics are reset that many seconds in and the file named by
MAML_SERVE_BENCH_MARK is created, so the run's tables cover the soak only and the caller can read
memory at that moment. With MAML_SERVE_BENCH_GO, the warm-up ends instead when the caller creates
that file, and the soak lasts MAML_SERVE_BENCH_SOAK seconds from then. Each user first creates one task and waits for it (so it has something to
read and predict on). Run through benchmarks/run_locust.py, which starts the PostgreSQL + Redis +
Celery stack and passes MAML_SERVE_BENCH_KEY.
"""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path
from typing import Any

from locust import HttpUser, LoadTestShape, between, task

from benchmarks.episodes import Episodes

EPISODES = Episodes(seed=int(os.environ.get("MAML_SERVE_BENCH_SEED", "0")))
SUPPORTS = [EPISODES.support("full") for _ in range(32)]
QUERIES = [EPISODES.queries(16) for _ in range(8)]
_lock = threading.Lock()
READY: list[tuple[str, str]] = []  # (task id, job id) of tasks known to be ready


class ServiceUser(HttpUser):  # type: ignore[misc]
    """One client of the API with its own key's tasks."""

    wait_time = between(0.05, 0.2)

    def on_start(self) -> None:
        """Authenticate and make one ready task."""
        self.client.headers["Authorization"] = f"Bearer {os.environ['MAML_SERVE_BENCH_KEY']}"
        self.own: list[tuple[str, str]] = []
        self._create(wait=True)

    def _create(self, wait: bool) -> None:
        files, data = random.choice(SUPPORTS)
        url = "/v1/tasks?wait=30" if wait else "/v1/tasks"
        with self.client.post(
            url, files=files, data=data, name="POST /v1/tasks", catch_response=True
        ) as response:
            if response.status_code not in (201, 202):
                response.failure(f"status {response.status_code}")
                return
            body: dict[str, Any] = response.json()
            pair = (body["id"], body["job"]["id"] if body.get("job") else "")
            self.own.append(pair)
            if response.status_code == 201 or body.get("status") == "ready":
                with _lock:
                    READY.append(pair)

    @task(35)  # type: ignore[untyped-decorator]
    def get_task(self) -> None:
        """GET /v1/tasks/{id}."""
        task_id, _ = random.choice(self.own or READY)
        self._get(f"/v1/tasks/{task_id}", "GET /v1/tasks/{id}")

    @task(35)  # type: ignore[untyped-decorator]
    def get_job(self) -> None:
        """GET /v1/jobs/{id}."""
        _, job_id = random.choice(self.own or READY)
        if job_id:
            self._get(f"/v1/jobs/{job_id}", "GET /v1/jobs/{id}")

    @task(20)  # type: ignore[untyped-decorator]
    def predict(self) -> None:
        """POST 16 query images to a ready task."""
        with _lock:
            task_id, _ = random.choice(READY) if READY else (None, None)
        if task_id is None:
            return
        with self.client.post(
            f"/v1/tasks/{task_id}/predictions",
            files=random.choice(QUERIES),
            name="POST /v1/tasks/{id}/predictions",
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"status {response.status_code}")

    @task(10)  # type: ignore[untyped-decorator]
    def create(self) -> None:
        """POST a new 5-way 1-shot task (no wait)."""
        self._create(wait=False)

    def _get(self, url: str, name: str) -> None:
        with self.client.get(url, name=name, catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"status {response.status_code}")


class Ramp(LoadTestShape):  # type: ignore[misc]
    """1 -> N users over the ramp, then N until the end; statistics reset after the warm-up."""

    users = int(os.environ.get("MAML_SERVE_BENCH_USERS", "64"))
    seconds = float(os.environ.get("MAML_SERVE_BENCH_SECONDS", "150"))
    ramp = float(os.environ.get("MAML_SERVE_BENCH_RAMP", str(0.6 * seconds)))
    warmup = float(os.environ.get("MAML_SERVE_BENCH_WARMUP", "0"))
    mark = os.environ.get("MAML_SERVE_BENCH_MARK", "")
    # With a "go" file the warm-up ends when the caller creates it, and the soak then runs for
    # MAML_SERVE_BENCH_SOAK seconds (run_locust --until-caches-full).
    go = os.environ.get("MAML_SERVE_BENCH_GO", "")
    soak = float(os.environ.get("MAML_SERVE_BENCH_SOAK", "0"))
    warmed_at: float | None = None

    def tick(self) -> tuple[int, float] | None:
        """The user count and spawn rate now, or None to stop."""
        elapsed = float(self.get_run_time())
        if self.warmed_at is None and self._warm_up_over(elapsed):
            self.warmed_at = elapsed
            if self.runner is not None:
                self.runner.stats.reset_all()
            if self.mark:
                Path(self.mark).touch()
        if self.go:
            if self.warmed_at is not None and elapsed > self.warmed_at + self.soak:
                return None
        elif elapsed > self.seconds:
            return None
        count = max(
            1, min(self.users, round(1 + (self.users - 1) * elapsed / max(self.ramp, 1e-9)))
        )
        return count, 10.0

    def _warm_up_over(self, elapsed: float) -> bool:
        if self.go:
            return Path(self.go).exists()
        return self.warmup > 0 and elapsed >= self.warmup
