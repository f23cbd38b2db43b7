"""Reading a request's media type."""

from __future__ import annotations

from fastapi import Request


def request_media_type(request: Request) -> str:
    """The request's Content-Type without parameters, lower-cased ('' when absent)."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()
