"""A client that leaves while sending its body is not a server error: 499, no traceback, no row."""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.models import Prediction, Task
from tests.helpers import create_ready_task, query_files, runtime_of, support_files


def _send_half_and_leave(
    client: TestClient, path: str, headers: dict[str, str], files: Any, data: Any = None
) -> list[MutableMapping[str, Any]]:
    """Drive the app with the first half of a multipart body, then a disconnect."""
    request = httpx.Request("POST", f"http://testserver{path}", files=files, data=data)
    body = request.read()
    messages = [
        {"type": "http.request", "body": body[: len(body) // 2], "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if len(messages) > 1 else messages[0]

    sent: list[MutableMapping[str, Any]] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    all_headers = {**headers, **dict(request.headers)}
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in all_headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "state": {},
    }
    assert client.portal is not None
    client.portal.call(client.app, scope, receive, send)
    return sent


@pytest.mark.parametrize("route", ["tasks", "predictions"])
def test_a_client_that_leaves_mid_body_gets_499_and_no_error_is_logged(
    client: TestClient, auth: dict[str, str], caplog: pytest.LogCaptureFixture, route: str
) -> None:
    runtime = runtime_of(client)
    task = create_ready_task(client, auth)
    with runtime.sessions() as session:
        before = {
            m.__name__: session.scalar(select(func.count()).select_from(m))
            for m in (Task, Prediction)
        }
    caplog.set_level(logging.INFO)
    if route == "tasks":
        files, data = support_files(["a", "b", "c"], seed=5)
        sent = _send_half_and_leave(client, "/v1/tasks", auth, files, data)
    else:
        path = f"/v1/tasks/{task['id']}/predictions"
        sent = _send_half_and_leave(client, path, auth, query_files(8))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 499
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "client disconnected" in caplog.text
    with runtime.sessions() as session:
        after = {
            m.__name__: session.scalar(select(func.count()).select_from(m))
            for m in (Task, Prediction)
        }
    assert after == before
    # The service goes on answering.
    assert client.get(f"/v1/tasks/{task['id']}", headers=auth).status_code == 200
