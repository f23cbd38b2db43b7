"""Typed errors raised by the client: one class per kind of problem, each carrying its `code`."""

from __future__ import annotations

from typing import Any


class MamlServeError(Exception):
    """Base class of every error the client raises."""


class ApiError(MamlServeError):
    """The API answered with an error (RFC 9457 problem+json): status, machine code, detail."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        title: str | None = None,
        body: dict[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.title = title
        self.body: dict[str, Any] = body or {}
        self.retry_after = retry_after


class AuthenticationError(ApiError):
    """401: no key, or an unknown or revoked one."""


class PermissionDenied(ApiError):
    """403: the key lacks the scope (admin routes with a user key)."""


class NotFoundError(ApiError):
    """404: an unknown id (or one of another tenant)."""


class ConflictError(ApiError):
    """409: the resource is not in a state that allows the request."""


class NotAdaptedYet(ConflictError):
    """409 `not_adapted_yet`: the task is still adapting (raised once the retries are spent)."""


class AdaptationFailed(ConflictError):
    """The task's adaptation failed (409 `adaptation_failed`, or a task that ended `failed`)."""


class PayloadTooLarge(ApiError):
    """413: a body, image or dataset over its limit."""


class UnsupportedMediaType(ApiError):
    """415: a body of the wrong content type."""


class InvalidRequest(ApiError):
    """422: the request broke a rule (bad image, labels, parameters)."""


class RateLimited(ApiError):
    """429: too many requests for this key or tenant (raised once retries are spent)."""


class ServiceUnavailable(ApiError):
    """503: a dependency is down or no initialization is active (raised once retries are spent)."""


class ServerError(ApiError):
    """Any other 5xx."""


class WaitTimeout(MamlServeError, TimeoutError):
    """A wait (for a task, job or meta-training run) ran past its timeout."""


class TransportError(MamlServeError):
    """The server could not be reached (connection refused, reset, timed out)."""


_BY_STATUS: dict[int, type[ApiError]] = {
    401: AuthenticationError,
    403: PermissionDenied,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    422: InvalidRequest,
    429: RateLimited,
    503: ServiceUnavailable,
}
_BY_CODE: dict[str, type[ApiError]] = {
    "not_adapted_yet": NotAdaptedYet,
    "adaptation_failed": AdaptationFailed,
}


def error_class(status: int, code: str) -> type[ApiError]:
    """The most specific error class for a status and problem code."""
    if code in _BY_CODE:
        return _BY_CODE[code]
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    return ServerError if status >= 500 else ApiError
