"""Private PostgreSQL, Redis and worker processes that the fault suite may stop, freeze and kill."""

from __future__ import annotations

import glob
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

# Short leases and timeouts so every fault resolves in seconds.
FAULT_SETTINGS: dict[str, Any] = {
    "job_lease_seconds": 3.0,
    "train_lease_seconds": 3.0,
    "job_max_attempts": 3,
    "database_connect_timeout_seconds": 2,
    "database_statement_timeout_seconds": 2.0,
    "database_pool_timeout_seconds": 2.0,
    "broker_timeout_seconds": 1.0,
    "readiness_timeout_seconds": 1.0,
    "worker_heartbeat_seconds": 1.0,
    "torch_threads": 1,
}

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = Path(__file__).with_name("fault_worker.py")
PG_VERSION = "15"


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _run(*command: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()[-2000:]}")


class Postgres:
    """A PostgreSQL cluster of its own (pg_createcluster), on its own port, trust auth."""

    def __init__(self) -> None:
        self.name = f"maml_faults_{os.getpid()}_{uuid.uuid4().hex[:4]}"
        self.port = free_port()
        self.data = Path(f"/var/lib/postgresql/{PG_VERSION}/{self.name}")

    def create(self) -> None:
        """Create and start the cluster."""
        _run("pg_createcluster", PG_VERSION, self.name, "--port", str(self.port), "--",
             "--auth=trust")  # fmt: skip
        self.start()

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL of one database."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        """Start the cluster and wait until it accepts connections."""
        _run("pg_ctlcluster", "--skip-systemctl-redirect", PG_VERSION, self.name, "start")
        deadline = time.monotonic() + 30
        while subprocess.run(
            ["pg_isready", "-q", "-h", "127.0.0.1", "-p", str(self.port)], check=False
        ).returncode:
            assert time.monotonic() < deadline, "the private PostgreSQL did not start"
            time.sleep(0.1)

    def stop(self) -> None:
        """Fast shutdown: clients are disconnected, new connections refused."""
        _run("pg_ctlcluster", "--skip-systemctl-redirect", PG_VERSION, self.name, "stop",
             "-m", "fast")  # fmt: skip

    def _pids(self) -> list[int]:
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        children = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(postmaster)], capture_output=True, text=True
        ).stdout.split()
        return [postmaster, *map(int, children)]

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """Every process of the cluster stopped (SIGSTOP): TCP is accepted, nothing answers."""
        pids = self._pids()
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)

    def drop(self) -> None:
        """Stop and delete the cluster."""
        subprocess.run(
            ["pg_dropcluster", "--stop", PG_VERSION, self.name], capture_output=True, timeout=60
        )


class Redis:
    """A redis-server of its own, without persistence (a restart loses every message)."""

    def __init__(self) -> None:
        self.port = free_port()
        # A password of its own: a worker left over from another run that retries this port
        # (freed and handed out again) can never consume this suite's messages.
        self.password = uuid.uuid4().hex
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The broker URL."""
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server and wait until it answers."""
        import redis

        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--requirepass", self.password],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port, password=self.password, socket_timeout=1)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "the private Redis did not start"
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        """Kill the server (its queues are lost)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """The server stopped with SIGSTOP: TCP is accepted, nothing answers."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.process.pid, signal.SIGCONT)

    def client(self) -> Any:
        """A redis-py client for assertions on the queues."""
        import redis

        return redis.Redis(port=self.port, password=self.password, socket_timeout=5)


class Worker:
    """A `maml-serve worker` subprocess (through fault_worker.py) that a test may kill.

    It runs in `cwd` (the repository by default; a host's own folder in the shared-nothing suite).
    """

    def __init__(
        self, env: Mapping[str, str], queues: str, log: Path, cwd: Path | None = None
    ) -> None:
        self.env = dict(env)
        self.queues = queues
        self.log = log
        self.cwd = cwd or ROOT
        self.process: subprocess.Popen[bytes] | None = None
        self._offset = 0

    def launch(self) -> None:
        """Start the process without waiting for it."""
        self._offset = self.log.stat().st_size if self.log.exists() else 0
        command = [sys.executable, str(LAUNCHER), "--queues", self.queues, "--log-level", "INFO"]
        with self.log.open("a") as out:
            self.process = subprocess.Popen(
                command, cwd=self.cwd, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )

    def wait_ready(self, timeout: float = 120) -> None:
        """Wait for Celery's `ready.` line of this start."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while "ready." not in self.log.read_text()[self._offset :]:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                pytest.fail(f"worker {self.queues} did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)

    def start(self) -> None:
        """Start and wait until ready."""
        self.launch()
        self.wait_ready()

    @property
    def pid(self) -> int:
        """The process id (a job's `claimed_by` names it)."""
        assert self.process is not None
        return self.process.pid

    @property
    def alive(self) -> bool:
        """True while the process runs."""
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no hand-back, no acknowledgement."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def terminate(self, timeout: float = 60) -> None:
        """SIGTERM (a deploy) and wait for the warm shutdown."""
        if self.alive:
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def text(self) -> str:
        """Everything this worker logged, over all its starts."""
        return self.log.read_text()


def computations(workers: list[Worker], job_id: str) -> int:
    """How many times a handler started on the job, over all workers' logs."""
    return sum(
        w.text().count(f"fault hook: running job {job_id}")
        for w in {id(w): w for w in workers}.values()
    )


def wait_for(condition, timeout: float, every: float = 0.05):  # type: ignore[no-untyped-def]
    """Poll `condition()` until it returns something truthy; returns it, or fails at `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout}s: {condition}")
        time.sleep(every)


def faketime_library() -> str | None:
    """libfaketime's multi-threaded library (Debian's `faketime` package), when installed."""
    for folder in ("/usr/lib/*/faketime", "/usr/lib/faketime", "/usr/local/lib/faketime"):
        found = sorted(glob.glob(f"{folder}/libfaketimeMT.so.1"))
        if found:
            return found[0]
    return None


def shifted_clock(offset: str) -> dict[str, str]:
    """Environment that runs a process with its wall clock off by `offset` ("-5m", "+300s").

    Through libfaketime (LD_PRELOAD); the monotonic clock is left as it is, as on a host whose
    clock is simply wrong.
    """
    library = faketime_library()
    if library is None:
        raise RuntimeError("libfaketime is not installed (apt-get install faketime)")
    return {
        "LD_PRELOAD": library,
        "FAKETIME": offset,
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        # The name libfaketime before 0.9.8 reads.
        "DONT_FAKE_MONOTONIC": "1",
    }


@contextmanager
def serve_processes(
    env: Mapping[str, str], port: int, log: Path, workers: int = 2, cwd: Path | None = None
) -> Iterator[str]:
    """`maml-serve serve --workers N` started (in `cwd`, else the repository), its base URL
    while it runs, stopped after."""
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--workers", str(workers), "--port", str(port)],
            cwd=cwd or ROOT, env=dict(env), stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while log.read_text().count("Application startup complete") < workers:
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
