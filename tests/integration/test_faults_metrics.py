"""`serve --workers 2`: /metrics adds up the requests every process answered."""

from __future__ import annotations

import os
import re
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import ROOT
from tests.integration.faults import free_port, serve_processes

# A hang (a missing timeout) fails the test instead of blocking the run.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def _healthz_count(text: str) -> float:
    pattern = re.compile(
        r'^maml_serve_http_requests_total\{[^}]*route="/healthz"[^}]*status="200"[^}]*\} (\S+)$',
        re.MULTILINE,
    )
    return sum(float(value) for value in pattern.findall(text))


def test_metrics_of_two_api_processes_add_up(tmp_path: Path, init_dir: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAML_SERVE_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # serve sets one up itself
    env.update(
        {
            "MAML_SERVE_DATA_DIR": str(tmp_path / "data"),
            "MAML_SERVE_INITIALIZATION_PATH": str(init_dir),
            "PYTHONPATH": str(ROOT),
        }
    )
    with serve_processes(env, port, tmp_path / "serve.log") as base:
        for _ in range(20):
            # A new connection each time, so both processes take requests.
            with httpx.Client(base_url=base, timeout=10) as client:
                assert client.get("/healthz").status_code == 200
        for _ in range(6):
            with httpx.Client(base_url=base, timeout=10) as client:
                response = client.get("/metrics")
            assert response.status_code == 200
            assert _healthz_count(response.text) == 20, response.text[:2000]
            assert 'maml_serve_jobs{kind="adapt",state="queued"} 0.0' in response.text
            assert "maml_serve_active_initialization{" in response.text
