"""Service-level exceptions, independent of any transport.

Each class subclasses the builtin a caller would already catch (``LookupError`` for
something absent, ``ValueError`` for bad input), and carries the HTTP-ish ``status`` and a
stable ``type`` string so every transport (FastAPI handler, gRPC interceptor) maps it the
same way without a table of its own.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BadEndpointError",
    "BodyTooLargeError",
    "InvalidRequestError",
    "NotReadyError",
    "PodConflictError",
    "PodNotFoundError",
    "ServiceError",
    "error_body",
]


class ServiceError(Exception):
    """Base class of the service's own errors (the core's derive from ``KvIndexError``);
    ``status`` is the HTTP status a transport should answer with."""

    status: int = 500
    type: str = "internal_error"


class PodNotFoundError(ServiceError, LookupError):
    status = 404
    type = "pod_not_found"

    def __init__(self, pod: str) -> None:
        self.pod = pod
        super().__init__(f"unknown pod {pod!r}")


class PodConflictError(ServiceError, ValueError):
    status = 409
    type = "pod_conflict"


class BadEndpointError(ServiceError, ValueError):
    status = 400
    type = "bad_endpoint"


class BodyTooLargeError(ServiceError, ValueError):
    status = 413
    type = "body_too_large"

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"request body exceeds the limit of {limit} bytes")


class NotReadyError(ServiceError, RuntimeError):
    status = 503
    type = "not_ready"


def error_body(type_: str, message: str, details: Any = None) -> dict[str, Any]:
    """The one error shape every HTTP answer uses: ``{"error": {"type", "message"[, "details"]}}``."""
    err: dict[str, Any] = {"type": type_, "message": message}
    if details is not None:
        err["details"] = details
    return {"error": err}


class InvalidRequestError(ServiceError, ValueError):
    """A well-formed request the service cannot honour (e.g. a block size it does not use)."""

    status = 400
    type = "invalid_request"
