"""A real `maml-serve serve` process on a free port, with its own data folder and keys."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.data_paths import OMNIGLOT_ZIP

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def service_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """The caller's environment without MAML_SERVE_* settings, plus an embedded data folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAML_SERVE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["MAML_SERVE_DATA_DIR"] = str(data_dir)
    if OMNIGLOT_ZIP.is_file():
        env["MAML_SERVE_OMNIGLOT_PATH"] = str(OMNIGLOT_ZIP)
    env.update(extra)
    return env


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run `maml-serve ARGS` (as `python -m app.cli`) and check it succeeded."""
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


@dataclass
class LiveServer:
    """A running server: its URL, a user key, an admin key (another tenant) and its process."""

    url: str
    user_key: str
    admin_key: str
    process: subprocess.Popen[bytes]
    log: Path
    # The link `serve --console-key` printed, when it was asked for.
    console_url: str | None = None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)


def start_server(workdir: Path, *serve_args: str, **settings: str) -> LiveServer:
    """Create two keys, start `maml-serve serve SERVE_ARGS` and wait until /readyz says ready."""
    env = service_env(workdir / "data", **settings)
    user = json.loads(cli(env, "keys", "create", "--tenant", "live", "--json").stdout)["key"]
    admin = json.loads(cli(env, "keys", "create", "--tenant", "ops", "--admin", "--json").stdout)[
        "key"
    ]
    port = free_port()
    log = workdir / "server.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "app.cli",
                "serve",
                "--port",
                str(port),
                "--log-level",
                "warning",
                *serve_args,
            ],
            env=env,
            cwd=REPO,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    server = LiveServer(f"http://127.0.0.1:{port}", user, admin, process, log)
    deadline = time.monotonic() + 90
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode}):\n{log.read_text()}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                link = re.search(r"console \(.*\): (\S+)", log.read_text())
                server.console_url = link.group(1) if link else None
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"the server was not ready in 90 s:\n{log.read_text()}")
        time.sleep(0.2)
