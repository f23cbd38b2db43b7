"""Fixtures for the tests that talk to a real server process over HTTP."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.live.server import LiveServer, start_server


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """`maml-serve serve` with the shipped initialization, one per test module."""
    server = start_server(tmp_path_factory.mktemp("live"))
    yield server
    server.stop()
