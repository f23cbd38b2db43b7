"""A real uvicorn server under hostile load: bounded memory, no starvation, nothing answers 5xx.

Each test starts `uvicorn app.main:create_app --factory` on a free port against the embedded
SQLite default, as an operator would run it, and measures it from outside.
"""

from __future__ import annotations

import http.client
import io
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from app.core.db import make_engine, make_session_factory
from app.keys import service as keys
from tests.helpers import make_settings, png, support_files

REPO = Path(__file__).resolve().parents[4]
MIB = 1024 * 1024


@dataclass(frozen=True)
class Server:
    """A running API process."""

    url: str
    pid: int
    port: int

    def status_kib(self, field: str) -> int:
        """A line of /proc/PID/status in KiB, e.g. VmRSS or VmHWM."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise AssertionError(f"no {field} for {self.pid}")

    def reset_peak(self) -> None:
        """Make VmHWM start again from the current RSS (Linux clear_refs)."""
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def serve(data_dir: Path, init_dir: Path, **settings: str) -> Iterator[Server]:
    """A uvicorn server subprocess with these MAML_SERVE_ settings, stopped afterwards."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAML_SERVE_")}
    env.update(
        MAML_SERVE_DATA_DIR=str(data_dir),
        MAML_SERVE_INITIALIZATION_PATH=str(init_dir),
        MAML_SERVE_LOG_LEVEL="WARNING",
        **{f"MAML_SERVE_{k.upper()}": v for k, v in settings.items()},
    )
    command = [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    process = subprocess.Popen(command, cwd=REPO, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, "the server exited while starting"
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start within 90 s"
            time.sleep(0.2)
        yield Server(url, process.pid, port)
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def make_key(data_dir: Path, init_dir: Path, tenant: str) -> dict[str, str]:
    """Headers with a new user key of `tenant`, written straight into the server's database."""
    settings = make_settings(data_dir, init_dir)
    engine = make_engine(settings)
    try:
        with make_session_factory(engine)() as session:
            row = keys.get_or_create_tenant(session=session, name=tenant)
            _, key = keys.create_api_key(
                session=session,
                tenant=row,
                admin=False,
                pepper=settings.api_key_pepper.get_secret_value(),
            )
            session.commit()
    finally:
        engine.dispose()
    return {"Authorization": f"Bearer {key}"}


def ready_task(client: httpx.Client, headers: dict[str, str]) -> str:
    """The id of a new task, adapted (tiny initialization) within ?wait."""
    files, data = support_files(["a", "b", "c"])
    response = client.post("/v1/tasks?wait=60", headers=headers, files=files, data=data)
    assert response.status_code == 201, response.text
    task_id: str = response.json()["id"]
    return task_id


def adversarial_png(side: int = 4096) -> bytes:
    """A side x side RGBA PNG of one colour: ~74 KB on the wire, side^2 x 4 bytes decoded."""
    buffer = io.BytesIO()
    Image.new("RGBA", (side, side), (200, 30, 60, 255)).save(buffer, "PNG")
    return buffer.getvalue()


# --- memory -----------------------------------------------------------------------------------

# 12 x 64 MiB decoded: 768 MiB if the images were held together (16 of them grew the API by
# 1234 MiB before this work). The default maximum of 256 images is measured for the README; it
# takes ~4 minutes of decoding on two cores, so the test keeps the shape with fewer. Then 4
# requests at once: concurrent uploads must not multiply the full-size decodes either.
ADVERSARIAL_IMAGES = 12
CONCURRENT_REQUESTS = 4
MAX_GROWTH_MIB = 300


def test_adversarial_pngs_keep_the_api_within_its_memory_bound(
    tmp_path: Path, tiny_init_dir: Path
) -> None:
    data_dir = tmp_path / "data"
    with (
        serve(data_dir, tiny_init_dir) as server,
        httpx.Client(base_url=server.url, timeout=300) as client,
    ):
        headers = make_key(data_dir, tiny_init_dir, "acme")
        task_id = ready_task(client, headers)
        predictions = f"/v1/tasks/{task_id}/predictions"
        warm = [("images", (f"{i}.png", png(i), "image/png")) for i in range(2)]
        assert client.post(predictions, headers=headers, files=warm).is_success
        image = adversarial_png()
        assert len(image) < 100_000

        def files(count: int) -> list[tuple[str, tuple[str, bytes, str]]]:
            return [("images", (f"{i}.png", image, "image/png")) for i in range(count)]

        before = server.status_kib("VmRSS")
        server.reset_peak()
        response = client.post(predictions, headers=headers, files=files(ADVERSARIAL_IMAGES))
        assert response.status_code == 200, response.text
        assert len(response.json()["predictions"]) == ADVERSARIAL_IMAGES
        one = (server.status_kib("VmHWM") - before) / 1024

        statuses: list[int] = []

        def post() -> None:
            with httpx.Client(base_url=server.url, timeout=300) as own:
                statuses.append(own.post(predictions, headers=headers, files=files(3)).status_code)

        threads = [threading.Thread(target=post) for _ in range(CONCURRENT_REQUESTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert statuses == [200] * CONCURRENT_REQUESTS
        both = (server.status_kib("VmHWM") - before) / 1024
    print(
        f"peak RSS growth: {one:.0f} MiB for one request, {both:.0f} MiB with the concurrent ones"
    )
    assert one < MAX_GROWTH_MIB and both < MAX_GROWTH_MIB


# --- starvation -------------------------------------------------------------------------------

STALLED_UPLOADS = 15
CONCURRENT_CLIENTS = 64
WAITERS = 40
BODY_TIMEOUT_SECONDS = 3.0
# p95 under the burst reached 0.34 s on a slower 2-core CPU (AVX2 EPYC); starvation is seconds.
BURST_SLACK_SECONDS = 0.5


def _stall(port: int, headers: dict[str, str], answers: list[bytes]) -> None:
    """Send the headers and a few bytes of a large multipart body, then nothing."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        head = (
            "POST /v1/tasks HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: {headers['Authorization']}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 1000000\r\n\r\n"
        )
        sock.sendall(head.encode() + b"--b\r\nContent-Disposition: form-data; name=")
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError:
            pass
        answers.append(answer)


def _p95(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=20)[-1]


def _timed_gets(
    client: httpx.Client, path: str, headers: dict[str, str], count: int
) -> list[float]:
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        response = client.get(path, headers=headers)
        latencies.append(time.perf_counter() - started)
        assert response.status_code == 200, response.text
        time.sleep(0.05)
    return latencies


def _multipart(
    files: list[tuple[str, tuple[str, bytes, str]]], data: dict[str, list[str]]
) -> bytes:
    parts = [
        f'--b\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, values in data.items()
        for value in values
    ]
    for name, (filename, content, media) in files:
        head = (
            f'--b\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            f"Content-Type: {media}\r\n\r\n"
        )
        parts.append(head.encode() + content + b"\r\n")
    return b"".join(parts) + b"--b--\r\n"


def _request(port: int, method: str, path: str, headers: dict[str, str], body: bytes) -> int:
    # http.client, not httpx: a hundred httpx clients cost a CPU-second of TLS set-up on the
    # two cores the server needs.
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request(method, path, body=body or None, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def _load(
    port: int, noisy: dict[str, str], staller: dict[str, str], started: Any, results: Any
) -> None:
    """The noisy tenant, in a process of its own so its threads do not slow the measuring one."""
    statuses: list[int] = []
    answers: list[bytes] = []
    lock = threading.Lock()
    upload = {**noisy, "Content-Type": "multipart/form-data; boundary=b"}
    bodies = [_multipart(*support_files(["x", "y"], seed=100 + i)) for i in range(WAITERS)]

    def call(method: str, path: str, headers: dict[str, str], body: bytes = b"") -> None:
        status = _request(port, method, path, headers, body)
        with lock:
            statuses.append(status)

    threads = [
        threading.Thread(target=_stall, args=(port, staller, answers))
        for _ in range(STALLED_UPLOADS)
    ]
    threads += [
        threading.Thread(target=call, args=("POST", "/v1/tasks?wait=20", upload, body))
        for body in bodies
    ]
    threads += [
        threading.Thread(target=call, args=("GET", "/v1/tasks", noisy))
        for _ in range(CONCURRENT_CLIENTS)
    ]
    for thread in threads:
        thread.start()
    started.set()
    for thread in threads:
        thread.join(60)
    results.put((statuses, answers))


def test_one_tenants_stalls_crowds_and_waits_do_not_starve_another(
    tmp_path: Path, tiny_init_dir: Path
) -> None:
    data_dir = tmp_path / "data"
    spawn = multiprocessing.get_context("spawn")
    with (
        serve(
            data_dir, tiny_init_dir, body_read_timeout_seconds=str(BODY_TIMEOUT_SECONDS)
        ) as server,
        httpx.Client(base_url=server.url, timeout=60) as client,
    ):
        noisy = make_key(data_dir, tiny_init_dir, "noisy")
        # The stalls come from a second key of the same tenant, so they are admitted (not 429)
        # and show the time-out.
        staller = make_key(data_dir, tiny_init_dir, "noisy")
        quiet = make_key(data_dir, tiny_init_dir, "quiet")
        quiet_task = ready_task(client, quiet)
        path = f"/v1/tasks/{quiet_task}"
        # Warm, as a server in service is: adaptations batched together import and compile
        # their code paths on first use, holding the GIL for a second or more.
        warmers = [threading.Thread(target=ready_task, args=(client, quiet)) for _ in range(4)]
        for thread in warmers:
            thread.start()
        for thread in warmers:
            thread.join()
        _timed_gets(client, path, quiet, 5)
        normal = _timed_gets(client, path, quiet, 30)

        started, results = spawn.Event(), spawn.Queue()
        load = spawn.Process(target=_load, args=(server.port, noisy, staller, started, results))
        load.start()
        assert started.wait(60)
        began = time.monotonic()
        loaded = _timed_gets(client, path, quiet, 30)
        health = _timed_gets(client, "/healthz", {}, 5)
        statuses, answers = results.get(timeout=90)
        load.join(10)
        elapsed = time.monotonic() - began

    print(
        f"quiet tenant p95 (median): normal {_p95(normal) * 1000:.0f} "
        f"({statistics.median(normal) * 1000:.0f}) ms, under load {_p95(loaded) * 1000:.0f} "
        f"({statistics.median(loaded) * 1000:.0f}) ms; /healthz max {max(health) * 1000:.0f} ms; "
        f"noisy statuses {sorted(set(statuses))}; load lasted {elapsed:.1f} s"
    )
    assert len(statuses) == CONCURRENT_CLIENTS + WAITERS
    assert all(s < 500 for s in statuses), statuses
    # Over its limits the noisy tenant is told to slow down; within them it is served.
    assert set(statuses) <= {200, 201, 202, 429}, statuses
    assert 429 in statuses and {200, 201, 202} & set(statuses)
    # Every stalled upload was answered 408 (and its connection closed) after the time-out.
    assert len(answers) == STALLED_UPLOADS
    assert all(a.startswith(b"HTTP/1.1 408") for a in answers), answers[:1]
    # Within 2x the normal p95 and median. The slack is what the first half second of the burst
    # costs on two shared cores (accepting and refusing ~120 connections); before this work the
    # same load took the quiet tenant's requests to 30 s and 500.
    assert _p95(loaded) <= 2 * _p95(normal) + BURST_SLACK_SECONDS
    assert statistics.median(loaded) <= 2 * statistics.median(normal) + 0.02
    assert max(health) < 1.0
