"""Every error as an RFC 9457 problem+json answer: the service's errors and the framework's."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from app.core.errors import ProblemError

PROBLEM_JSON = "application/problem+json"
log = logging.getLogger(__name__)


def problem_response(
    status: int,
    code: str,
    detail: str,
    *,
    instance: str | None = None,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    """A problem+json response body with type, title, status, code and detail."""
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    body: dict[str, Any] = {
        "type": f"https://maml-serve.dev/problems/{code.replace('_', '-')}",
        "title": title,
        "status": status,
        "code": code,
        "detail": detail,
    }
    if instance is not None:
        body["instance"] = instance
    body.update(extra or {})
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


# The detail of the 400 FastAPI raises when a JSON body cannot be read at all.
_BODY_PARSE_ERROR = "There was an error parsing the body"
# Recorded for a request whose client left before its body was read (no one gets it).
CLIENT_CLOSED_REQUEST = 499

_HTTP_CODES = {
    401: "invalid_api_key",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


async def _on_problem(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, ProblemError):
        raise exc
    return problem_response(
        exc.status,
        exc.code,
        exc.detail,
        instance=request.url.path,
        headers=exc.headers,
        extra=exc.extra,
    )


async def _on_validation(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, RequestValidationError):
        raise exc
    errors = [
        {
            "loc": list(e.get("loc", ())),
            "msg": str(e.get("msg", "")),
            "type": str(e.get("type", "")),
        }
        for e in exc.errors()
    ]
    if any(e["loc"][:1] == ["path"] for e in errors):
        # A malformed id names nothing that exists: the same 404 as an unknown id, whatever
        # else is wrong with the request.
        return problem_response(
            404, "not_found", f"nothing at {request.url.path}", instance=request.url.path
        )
    invalid_json = [e for e in errors if e["type"] == "json_invalid"]
    if invalid_json:
        where = ".".join(str(part) for part in invalid_json[0]["loc"][1:])
        return problem_response(
            422,
            "invalid_json",
            f"the body is not valid JSON (near position {where or '?'}); send one JSON object",
            instance=request.url.path,
        )
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(part) for part in first["loc"])
    detail = f"{where}: {first['msg']}" if where else str(first["msg"])
    return problem_response(
        422, "validation_error", detail, instance=request.url.path, extra={"errors": errors}
    )


async def _on_http(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, StarletteHTTPException):
        raise exc
    if exc.status_code == 400 and exc.detail == _BODY_PARSE_ERROR:
        # FastAPI's answer to a JSON body that is not UTF-8 text: the same 422 as bad JSON.
        return problem_response(
            422,
            "invalid_json",
            "the body is not valid JSON (it is not UTF-8 text); send one JSON object",
            instance=request.url.path,
        )
    media = request.headers.get("content-type", "").lower()
    if exc.status_code == 400 and media.startswith("multipart/form-data"):
        # FastAPI's answer to a form it cannot parse: the same 422 as the routes that read
        # their multipart bodies themselves.
        return problem_response(
            422,
            "invalid_multipart",
            f"the multipart body could not be parsed: {exc.detail}",
            instance=request.url.path,
        )
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return problem_response(
        exc.status_code,
        code,
        str(exc.detail),
        instance=request.url.path,
        headers=dict(exc.headers or {}),
    )


async def _on_database_down(request: Request, exc: Exception) -> JSONResponse:
    # Connection refused, timed out or cut, or no pooled connection free in time.
    log.warning("database unavailable on %s %s: %s", request.method, request.url.path,
                type(exc).__name__)  # fmt: skip
    return problem_response(
        503,
        "database_unavailable",
        "the database is not reachable right now; try again shortly",
        instance=request.url.path,
        headers={"Retry-After": "2"},
    )


async def _on_disconnect(request: Request, exc: Exception) -> Response:
    # The client went away while sending its body: nothing to answer and nothing wrong here.
    # 499 (nginx's "client closed request") keeps it out of the 5xx counts; nobody reads it.
    log.info("client disconnected during %s %s", request.method, request.url.path)
    return Response(status_code=CLIENT_CLOSED_REQUEST)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem_response(
        500,
        "internal_error",
        "an unexpected error occurred; it has been logged",
        instance=request.url.path,
    )


def install_error_handlers(app: FastAPI) -> None:
    """Route every error, ours and the framework's, through one problem+json shape."""
    app.add_exception_handler(ProblemError, _on_problem)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(OperationalError, _on_database_down)
    app.add_exception_handler(InterfaceError, _on_database_down)
    app.add_exception_handler(SQLAlchemyTimeoutError, _on_database_down)
    app.add_exception_handler(ClientDisconnect, _on_disconnect)
    app.add_exception_handler(Exception, _on_unexpected)
