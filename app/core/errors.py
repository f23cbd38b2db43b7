"""Errors a caller can act on, each with a status class and a machine code.

Plain exceptions, importable by the worker and the CLI; app.core.problems renders them (and the
framework's own errors) as RFC 9457 problem+json.
"""

from __future__ import annotations

from typing import Any


class ProblemError(Exception):
    """An error the client can act on: HTTP status, machine `code`, `detail` saying what to fix."""

    status: int = 400
    code: str = "bad_request"

    def __init__(
        self,
        detail: str,
        *,
        code: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers = headers or {}
        self.extra = extra or {}


class InvalidRequest(ProblemError):
    """A request that is well-formed HTTP but breaks a rule (422)."""

    status = 422
    code = "invalid_request"


class NotFound(ProblemError):
    """A missing id, or one that belongs to another tenant (the same answer for both)."""

    status = 404
    code = "not_found"


class Unauthorized(ProblemError):
    """No API key, or one that is unknown or revoked."""

    status = 401
    code = "invalid_api_key"

    def __init__(self, detail: str, *, code: str | None = None) -> None:
        super().__init__(detail, code=code, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(ProblemError):
    """A valid key without the scope the route needs."""

    status = 403
    code = "forbidden"


class Conflict(ProblemError):
    """The resource is not in a state that allows the request (409)."""

    status = 409
    code = "conflict"


class PayloadTooLarge(ProblemError):
    """A body or file over its byte limit (413)."""

    status = 413
    code = "payload_too_large"


class ServiceUnavailable(ProblemError):
    """A dependency (database, broker, initialization) is not available right now (503)."""

    status = 503
    code = "service_unavailable"

    def __init__(self, detail: str, *, retry_after: int = 2, **kwargs: Any) -> None:
        super().__init__(detail, **kwargs)
        self.headers.setdefault("Retry-After", str(retry_after))


class PredictionsBusy(ServiceUnavailable):
    """This process's prediction line holds more work than it clears in the allowed wait (503)."""

    code = "predictions_busy"


class StorageUnavailable(ServiceUnavailable):
    """The artifact store (S3) did not answer, or answered with a server error (503).

    The detail never names the bucket, endpoint or key; those go to the log.
    """

    code = "storage_unavailable"

    def __init__(
        self,
        detail: str = "the artifact storage is not reachable right now; try again shortly",
        *,
        retry_after: int = 5,
        **kwargs: Any,
    ) -> None:
        super().__init__(detail, retry_after=retry_after, **kwargs)
