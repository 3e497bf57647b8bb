"""JSON request bodies parsed by pydantic-core straight from bytes.

FastAPI's own body handling goes bytes -> ``json.loads`` -> Python objects -> validation;
for a body of thousands of token ids ``Model.model_validate_json`` is several times faster
and tells a malformed document (400) apart from a well-formed but invalid one (422). The
routes declare their schema through :func:`json_body` so ``/docs`` still shows it.

Bodies over :data:`INLINE_PARSE_MAX_BYTES` are parsed in a worker thread: validating a
megabyte of chat messages takes tens of milliseconds, which on the event loop would stall
every other request (``/healthz`` included).
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

__all__ = ["INLINE_PARSE_MAX_BYTES", "MalformedJSONError", "json_body", "parse_body"]

M = TypeVar("M", bound=BaseModel)

#: Bodies up to this size are validated on the event loop (well under a millisecond).
INLINE_PARSE_MAX_BYTES = 64 * 1024


class MalformedJSONError(ValueError):
    """The body is not a JSON document (or not UTF-8)."""


async def parse_body(request: Request, model: type[M]) -> M:
    """Validate the request body as ``model``; MalformedJSONError or ValidationError."""
    body = await request.body()
    if not body.strip():
        raise MalformedJSONError("request body is empty; a JSON object is required")
    try:
        if len(body) <= INLINE_PARSE_MAX_BYTES:
            return _validate(model, body)
        return await asyncio.to_thread(_validate, model, body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if errors and errors[0]["type"] in ("json_invalid", "json_type"):
            raise MalformedJSONError(f"request body is not valid JSON: {errors[0]['msg']}") from None
        raise


def _validate(model: type[M], body: bytes) -> M:
    return model.model_validate_json(body)


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` declaring ``model`` as the JSON request body of a route."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs", {})
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": schema}},
        },
        "x-kvindex-schemas": defs,  # merged into components by create_app
    }
