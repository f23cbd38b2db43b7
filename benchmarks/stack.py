"""A private PostgreSQL + Redis + Celery stack (or the embedded service) for the benchmarks.

PostgreSQL: a fresh database in the server at MAML_SERVE_BENCH_POSTGRES_URL (default
postgresql+psycopg://postgres@127.0.0.1:5432/test), dropped at the end. Redis: a private
redis-server on a free port. API: `maml-serve serve`; workers: `maml-serve worker`. Settings
are passed as MAML_SERVE_* environment variables.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
POSTGRES_URL = os.environ.get(
    "MAML_SERVE_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
# Per-key limits high enough that the clients measure the service, not its rate limiter.
UNLIMITED_KEYS = {
    "MAML_SERVE_KEY_RATE_PER_SECOND": "100000",
    "MAML_SERVE_KEY_RATE_BURST": "100000",
    "MAML_SERVE_KEY_MAX_IN_FLIGHT": "1000",
}


def free_port() -> int:
    """An unused TCP port on localhost."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and its children (bytes), from /proc."""
    total = 0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    for one in pids:
        try:
            for line in Path(f"/proc/{one}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


@dataclass
class Stack:
    """Running processes of one configuration and how to reach them."""

    url: str
    key: str
    env: dict[str, str]
    api: subprocess.Popen[bytes]
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def rss(self) -> dict[str, int]:
        """Resident bytes of the API and of all workers."""
        return {
            "api": rss_bytes(self.api.pid),
            "workers": sum(rss_bytes(w.pid) for w in self.workers),
        }


def _wait_ready(url: str, process: subprocess.Popen[bytes], seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not become ready")


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh database; its URL."""
    from sqlalchemy import create_engine, make_url, text

    name = f"maml_serve_bench_{secrets.token_hex(4)}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def redis_server() -> Iterator[str]:
    """A private redis-server without persistence; its URL."""
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)


def _cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        check=True,
    )
    return done.stdout.decode()


@contextmanager
def running_stack(
    settings: dict[str, str],
    *,
    celery: bool,
    workers: int = 1,
    api_processes: int = 1,
    init: Path | None = None,
) -> Iterator[Stack]:
    """Start the service with `settings` (MAML_SERVE_* values): embedded, or PostgreSQL + Celery."""
    data_dir = Path(tempfile.mkdtemp(prefix="maml-serve-bench-"))
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MAML_SERVE_") or k == "MAML_SERVE_ALLOCATOR"
    }
    env.update(UNLIMITED_KEYS)
    env["MAML_SERVE_DATA_DIR"] = str(data_dir)
    env["PYTHONPATH"] = str(ROOT)
    # As the Docker image sets it (glibc arenas); a MALLOC_ARENA_MAX in the caller's environment
    # wins (e.g. 64 for about glibc's default on this machine).
    env.setdefault("MALLOC_ARENA_MAX", "2")
    if init is not None:
        env["MAML_SERVE_INITIALIZATION_PATH"] = str(init)
    env.update(settings)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        with _backing(celery) as backing:
            env.update(backing)
            if celery:
                _cli(env, "migrate")
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            api = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "serve", "--port", str(port),
                 "--log-level", "warning", "--workers", str(api_processes)],
                env=env, cwd=ROOT,
            )  # fmt: skip
            processes.append(api)
            _wait_ready(url, api)
            key = json.loads(_cli(env, "keys", "create", "--tenant", "bench", "--json"))["key"]
            started = []
            for index in range(workers if celery else 0):
                worker = start_worker(env, index)
                processes.append(worker)
                started.append(worker)
            if started:
                _wait_workers(url, key)
            stack = Stack(url=url, key=key, env=env, api=api, workers=started)
            try:
                yield stack
            finally:
                # A benchmark may have replaced the workers: stop the ones running now too.
                _stop([*processes, *stack.workers])
    finally:
        _stop(processes)
        shutil.rmtree(data_dir, ignore_errors=True)


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    """Terminate processes (workers before the API), then wait for them."""
    for process in reversed(processes):
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()


# Messages a worker reserves ahead (the service's default is 1). With 1, each message waits for
# a broker round trip after the previous one is acknowledged (~0.1 s measured here), which the
# messages of jobs already ended by a batch pay too; every configuration uses the same value.
PREFETCH = int(os.environ.get("MAML_SERVE_BENCH_PREFETCH", "16"))


def start_worker(env: dict[str, str], index: int) -> subprocess.Popen[bytes]:
    """A Celery worker process (solo pool) on the adapt queue."""
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
         "-Q", "adapt", "--pool", "solo", "--loglevel", "WARNING",
         "--without-gossip", "--without-mingle", "--without-heartbeat",
         "--prefetch-multiplier", str(PREFETCH), "-n", f"bench{index}-{secrets.token_hex(2)}@%h"],
        env=env, cwd=ROOT,
    )  # fmt: skip


def _wait_workers(url: str, key: str, seconds: float = 120) -> None:
    """Block until a worker has adapted one task (it is consuming and warmed up)."""
    from benchmarks.episodes import synthetic_support

    files, data = synthetic_support(2, seed=12345)
    deadline = time.monotonic() + seconds
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as client:
        body = client.post("/v1/tasks?wait=60", files=files, data=data, timeout=90).json()
        while time.monotonic() < deadline:
            if client.get(f"/v1/tasks/{body['id']}").json().get("status") == "ready":
                return
            time.sleep(0.2)
    raise SystemExit("no worker adapted a task in time")


@contextmanager
def _backing(celery: bool) -> Iterator[dict[str, str]]:
    if not celery:
        yield {}
        return
    with postgres_database() as database_url, redis_server() as broker_url:
        yield {"MAML_SERVE_DATABASE_URL": database_url, "MAML_SERVE_BROKER_URL": broker_url}
