"""Every error the API can answer, mapped to a status and the one JSON error shape in a
single place: ``{"error": {"type": ..., "message": ...[, "details": ...]}}``.

| error                                   | status | type                 |
|-----------------------------------------|--------|----------------------|
| body not JSON                           | 400    | malformed_json       |
| validation (pydantic / FastAPI)         | 422    | validation_error     |
| TokenizationError (template, encode...) | 400    | tokenization_error   |
| InputTooLargeError (tokenizer limits)   | 413    | input_too_large      |
| UnknownModelError                       | 404    | unknown_model        |
| native InvalidInputError                | 400    | invalid_input        |
| ServiceError subclasses                 | own    | own                  |
| Starlette HTTPException (404 route...)  | same   | http_error           |
| anything else                           | 500    | internal_error       |

A 500 never carries a traceback; it is logged with the request id instead.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvindex_service._native import InvalidInputError
from kvindex_service.api.body import MalformedJSONError
from kvindex_service.errors import ServiceError, error_body
from kvindex_service.tokenization import InputTooLargeError, TokenizationError, UnknownModelError

__all__ = ["install_exception_handlers"]

logger = logging.getLogger(__name__)


def _rid(request: Request) -> str | None:
    rid = request.scope.get("state", {}).get("request_id")
    return rid if isinstance(rid, str) else None


def _reply(status: int, type_: str, message: str, details: Any = None) -> JSONResponse:
    return JSONResponse(error_body(type_, message, details), status_code=status)


def _clean_errors(errors: list[Any]) -> list[dict[str, Any]]:
    out = []
    for err in errors:
        item = {"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type", "")}
        out.append(item)
    return out


def _summary(errors: list[dict[str, Any]]) -> str:
    parts = []
    for err in errors[:5]:
        loc = ".".join(str(p) for p in err["loc"] if p != "body") or "body"
        parts.append(f"{loc}: {err['msg']}")
    more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
    return "invalid request: " + "; ".join(parts) + more


async def _validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError | ValidationError)
    raw = exc.errors(include_url=False) if isinstance(exc, ValidationError) else exc.errors()
    errors = _clean_errors(list(raw))
    if any(e["type"] == "json_invalid" for e in errors):
        return _reply(400, "malformed_json", "request body is not valid JSON", errors)
    return _reply(422, "validation_error", _summary(errors), errors)


async def _malformed(request: Request, exc: Exception) -> JSONResponse:
    return _reply(400, "malformed_json", str(exc))


async def _unknown_model(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, UnknownModelError)
    return _reply(404, "unknown_model", str(exc))


async def _tokenization(request: Request, exc: Exception) -> JSONResponse:
    return _reply(400, "tokenization_error", str(exc))


async def _too_large(request: Request, exc: Exception) -> JSONResponse:
    return _reply(413, "input_too_large", str(exc))


async def _invalid_input(request: Request, exc: Exception) -> JSONResponse:
    return _reply(400, "invalid_input", str(exc))


async def _service(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return _reply(exc.status, exc.type, str(exc))


async def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    type_ = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    resp = _reply(exc.status_code, type_, str(exc.detail))
    if exc.headers:
        resp.headers.update(exc.headers)
    return resp


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.error(
        "unhandled error",
        exc_info=(type(exc), exc, exc.__traceback__),
        extra={"request_id": _rid(request), "path": request.url.path},
    )
    return _reply(500, "internal_error", "internal server error")


def install_exception_handlers(app: FastAPI) -> None:
    """Register the mapping above on ``app``. Order does not matter: Starlette picks the
    handler of the nearest class in the exception's MRO."""
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(ValidationError, _validation)
    app.add_exception_handler(MalformedJSONError, _malformed)
    app.add_exception_handler(UnknownModelError, _unknown_model)
    app.add_exception_handler(TokenizationError, _tokenization)
    app.add_exception_handler(InputTooLargeError, _too_large)
    app.add_exception_handler(InvalidInputError, _invalid_input)
    app.add_exception_handler(ServiceError, _service)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _unexpected)
