"""ASGI middleware: the request body cap (413), the body read time-out (408) and metrics."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core import metrics
from app.core.problems import PROBLEM_JSON


class _BodyTooLarge(Exception):
    pass


class _BodyTimedOut(Exception):
    pass


def _problem_413(limit: int, path: str) -> bytes:
    return json.dumps(
        {
            "type": "https://maml-serve.dev/problems/payload-too-large",
            "title": "Content Too Large",
            "status": 413,
            "code": "payload_too_large",
            "detail": f"the request body is over the {limit}-byte limit; "
            "send fewer or smaller images",
            "instance": path,
        }
    ).encode()


def _problem_408(seconds: float, path: str) -> bytes:
    return json.dumps(
        {
            "type": "https://maml-serve.dev/problems/request-timeout",
            "title": "Request Timeout",
            "status": 408,
            "code": "body_timeout",
            "detail": f"no part of the request body arrived for {seconds:g} s; "
            "send the whole body without pausing",
            "instance": path,
        }
    ).encode()


class BodyLimitMiddleware:
    """Answers 413 as soon as a body is known to exceed the limit (header or streamed bytes), and
    408 when the body stalls for `read_timeout` seconds, so a slow upload holds nothing for long."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        path_limits: dict[str, int] | None = None,
        read_timeout: float | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        # Exact paths with a limit of their own (dataset uploads are larger than support sets).
        self.path_limits = path_limits or {}
        self.read_timeout = read_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.path_limits.get(str(scope.get("path", "")), self.max_bytes)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await self._reject(send, 413, _problem_413(limit, str(scope.get("path", ""))))
            return
        received = 0
        exceeded = False
        timed_out = False
        started = False
        more_body = True

        async def limited_receive() -> Message:
            nonlocal received, exceeded, timed_out, more_body
            if not more_body or self.read_timeout is None:
                # After the body only a disconnect can come: waiting for it is not a stall.
                message = await receive()
            else:
                try:
                    message = await asyncio.wait_for(receive(), self.read_timeout)
                except TimeoutError:
                    timed_out = True
                    raise _BodyTimedOut from None
            if message["type"] == "http.request":
                more_body = bool(message.get("more_body", False))
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            # Once the body overflowed or stalled, whatever the app says is replaced.
            if exceeded or timed_out:
                return
            started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except (_BodyTooLarge, _BodyTimedOut):
            pass
        except Exception:
            if not (exceeded or timed_out):
                raise
        if started:
            return
        path = str(scope.get("path", ""))
        if exceeded:
            await self._reject(send, 413, _problem_413(limit, path))
        elif timed_out:
            await self._reject(send, 408, _problem_408(self.read_timeout or 0.0, path))

    async def _reject(self, send: Send, status: int, body: bytes) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", PROBLEM_JSON.encode()),
                    (b"content-length", str(len(body)).encode()),
                    # The rest of the body is never read: the connection cannot be reused.
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class MetricsMiddleware:
    """Counts requests and observes latency per method, route template and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route: Any = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = str(scope.get("method", ""))
            metrics.HTTP_REQUESTS.labels(method, template, str(status)).inc()
            metrics.HTTP_LATENCY.labels(method, template).observe(time.perf_counter() - started)
