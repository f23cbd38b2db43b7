"""Key rates and failed attempts counted in Redis: shared by API processes, degraded when it is down."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.core.limits import Limits, TooManyRequests
from tests.helpers import make_settings
from tests.integration.conftest import ROOT
from tests.integration.faults import Redis, free_port, serve_processes

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

RATE, BURST = 5.0, 10
# Slow enough that a second process's own burst would show: 10 per 10 s in one window.
SERVE_RATE = 1.0


@pytest.fixture
def redis_server() -> Iterator[Redis]:
    """A redis-server of this test's own, to stop at will."""
    server = Redis()
    server.start()
    yield server
    server.stop()


def _limits(tmp_path: Path, url: str, **overrides: object) -> Limits:
    settings = make_settings(
        tmp_path, tmp_path, broker_url=url, key_rate_per_second=RATE, key_rate_burst=BURST,
        max_failed_auth_per_minute=3, **overrides,
    )  # fmt: skip
    return Limits.from_settings(settings)


async def _admitted(limits: Limits, token: str, n: int) -> int:
    ok = 0
    for _ in range(n):
        try:
            await limits.admit_key(token)
        except TooManyRequests:
            continue
        limits.release_key(token)
        ok += 1
    return ok


def test_two_processes_share_one_key_rate_and_one_failure_count(
    tmp_path: Path, redis_server: Redis
) -> None:
    first, second = _limits(tmp_path, redis_server.url), _limits(tmp_path, redis_server.url)
    assert first.shared is not None

    async def scenario() -> tuple[int, int, bool]:
        a = await _admitted(first, "k1", BURST)
        b = await _admitted(second, "k1", BURST)
        for _ in range(3):
            await first.record_failure("10.0.0.9")
        try:
            await second.check_address("10.0.0.9")
        except TooManyRequests as refusal:
            return a, b, "Retry-After" in refusal.headers
        return a, b, False

    a, b, refused = asyncio.run(scenario())
    # One window for both: the second "process" finds the key's burst spent by the first.
    assert a == BURST and b <= 1, (a, b)
    assert refused, "the second process did not see the first one's failed attempts"
    # Per process (the setting off), the second would have had a burst of its own.
    alone = _limits(tmp_path, redis_server.url, shared_rate_limits=False)
    assert alone.shared is None
    assert asyncio.run(_admitted(alone, "k2", BURST)) == BURST


def test_redis_down_degrades_to_per_process_limits_without_failing(
    tmp_path: Path, redis_server: Redis
) -> None:
    limits = _limits(tmp_path, redis_server.url, rate_limit_retry_seconds=1.0)
    redis_server.stop()

    async def scenario() -> tuple[int, float]:
        started = time.monotonic()
        admitted = await _admitted(limits, "k", 3 * BURST)
        return admitted, time.monotonic() - started

    admitted, took = asyncio.run(scenario())
    # The process's own bucket (burst 10, refilling at 5/s) counts while Redis is away; the
    # first call waits one short timeout, the rest skip Redis for the retry period.
    assert BURST <= admitted <= BURST + 3, admitted
    assert took < 2.0, took
    redis_server.start()
    time.sleep(1.1)
    # Redis back after the retry period: counted there again (its window starts empty).
    assert asyncio.run(_admitted(limits, "k-new", BURST + 5)) == BURST


def test_serve_with_two_processes_gives_a_key_one_rate(tmp_path: Path, init_dir: Path) -> None:
    redis_server = Redis()
    redis_server.start()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAML_SERVE_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update(
        {
            "MAML_SERVE_DATA_DIR": str(tmp_path / "data"),
            "MAML_SERVE_INITIALIZATION_PATH": str(init_dir),
            "MAML_SERVE_BROKER_URL": redis_server.url,
            "MAML_SERVE_KEY_RATE_PER_SECOND": str(SERVE_RATE),
            "MAML_SERVE_KEY_RATE_BURST": str(BURST),
            "PYTHONPATH": str(ROOT),
        }
    )
    cli = [sys.executable, "-m", "app.cli"]
    key = subprocess.run(
        [*cli, "keys", "create", "--tenant", "acme"], cwd=ROOT, env=env, check=True,
        capture_output=True, text=True, timeout=120,
    ).stdout.strip()  # fmt: skip
    try:
        with serve_processes(env, port, tmp_path / "serve.log") as base:
            statuses: list[int] = []
            started = time.monotonic()
            for _ in range(4 * BURST):
                # A new connection each time, so both processes take requests.
                with httpx.Client(base_url=base, timeout=10) as client:
                    response = client.get("/v1/tasks", headers={"Authorization": f"Bearer {key}"})
                statuses.append(response.status_code)
                if response.status_code == 429:
                    assert int(response.headers["Retry-After"]) >= 1
            elapsed = time.monotonic() - started
            assert set(statuses) <= {200, 429}, statuses
            # One window of BURST per 10 s for the key, whichever process answered (per process it
            # would be twice that); what refilled while the requests ran is allowed on top.
            allowed = BURST + SERVE_RATE * elapsed + 2
            assert statuses.count(200) <= allowed, (statuses.count(200), elapsed)
            assert statuses.count(429) > 0
            assert redis_server.client().keys("maml_serve:limits*"), "nothing was counted in Redis"
    finally:
        redis_server.stop()
