"""The error statuses a route documents, with the one error body schema.

Routes declare ``responses=errors(400, 404, 413, ...)`` so their OpenAPI lists every status
they can answer (schemathesis checks that in the test suite); the descriptions live here so
every route words them the same way.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

__all__ = ["ErrorBody", "ErrorResponse", "errors"]


class ErrorBody(BaseModel):
    type: str = Field(description="stable machine-readable code, e.g. validation_error")
    message: str = Field(description="what went wrong, for a person")
    details: Any = Field(default=None, description="structured details (e.g. the validation errors)")


class ErrorResponse(BaseModel):
    """Every error answer: ``{"error": {"type", "message"[, "details"]}}``."""

    error: ErrorBody


DESCRIPTIONS: dict[int, str] = {
    400: "malformed JSON, tokenization error or input the index rejects",
    401: "missing or wrong bearer token (when http.auth_token is set)",
    404: "unknown model (no tokenizer) or pod",
    409: "conflict with the current state",
    413: "body over http.max_body_bytes, or prompt over a tokenizers.* limit",
    422: "the body does not match the request schema",
    429: "a configured bound is reached",
    503: "the service is not started (or is stopping)",
    504: "the request did not complete within http.request_timeout",
}


def errors(*codes: int, **descriptions: str) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for the given statuses; ``s404="..."`` overrides a description."""
    return {
        code: {"model": ErrorResponse, "description": descriptions.get(f"s{code}", DESCRIPTIONS[code])}
        for code in codes
    }
