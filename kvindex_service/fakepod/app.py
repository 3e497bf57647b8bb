"""The fake pod's OpenAI-compatible HTTP API (the subset a router and its users touch).

``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``
and ``POST /reset_prefix_cache``. Errors have vLLM's shape:
``{"object": "error", "message": ..., "type": ..., "param": null, "code": status}``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from kvindex_service.fakepod.engine import Completion, FakePod, PromptTooLongError
from kvindex_service.tokenization import InputTooLargeError, TokenizationError, UnknownModelError

__all__ = ["DEFAULT_MAX_TOKENS", "create_app"]

DEFAULT_MAX_TOKENS = 16
MAX_OUTPUT_TOKENS = 4096
_TYPES = {400: "BadRequestError", 404: "NotFoundError", 413: "RequestEntityTooLarge", 503: "ServiceUnavailable"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    body = {"object": "error", "message": message, "type": _TYPES.get(status, "Error"), "param": param, "code": status}
    return JSONResponse(body, status_code=status)


async def _read_json(request: Request, limit: int) -> dict[str, Any]:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def _max_tokens(body: dict[str, Any]) -> int:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    if value is None:
        return DEFAULT_MAX_TOKENS
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_OUTPUT_TOKENS:
        raise ApiError(400, f"max_tokens must be an integer in 1..{MAX_OUTPUT_TOKENS}, got {value!r}", "max_tokens")
    return value


def _check_common(pod: FakePod, body: dict[str, Any]) -> None:
    model = body.get("model")
    if model != pod.config.model:
        raise ApiError(404, f"The model `{model}` does not exist.", "model")
    if body.get("stream"):
        raise ApiError(400, "stream=true is not supported by the fake pod", "stream")


def _prompt(body: dict[str, Any]) -> str | list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [int(t) for t in prompt]
    raise ApiError(400, "prompt must be a string, a list of token ids, or a batch of one of those", "prompt")


def _usage(done: Completion) -> dict[str, Any]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": done.cached_tokens},
    }


def create_app(pod: FakePod, *, max_body_bytes: int = 4 * 1024 * 1024) -> FastAPI:
    """The app for a started :class:`FakePod`; the pod is closed when the app shuts down."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await asyncio.to_thread(pod.close)

    app = FastAPI(title="kvindex fake vLLM pod", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.param)

    async def run(token_ids: list[int], max_tokens: int) -> Completion:
        try:
            return await asyncio.to_thread(pod.generate, token_ids, max_tokens)
        except PromptTooLongError as exc:
            raise ApiError(400, str(exc)) from None

    async def tokens(fn: Any, *args: Any, **kwargs: Any) -> list[int]:
        try:
            result: list[int] = await asyncio.to_thread(fn, *args, **kwargs)
        except InputTooLargeError as exc:
            raise ApiError(413, str(exc)) from None
        except UnknownModelError as exc:
            raise ApiError(404, str(exc), "model") from None
        except TokenizationError as exc:
            raise ApiError(400, str(exc)) from None
        return result

    def headers() -> dict[str, str]:
        return {"x-kvindex-pod": pod.config.pod_id}

    @app.post("/v1/completions")
    async def completions(request: Request) -> JSONResponse:
        body = await _read_json(request, max_body_bytes)
        _check_common(pod, body)
        max_tokens = _max_tokens(body)
        ids = await tokens(pod.tokenize_prompt, _prompt(body))
        done = await run(ids, max_tokens)
        choice = {"index": 0, "text": done.text, "logprobs": None, "finish_reason": "length", "stop_reason": None}
        return JSONResponse(
            {
                "id": f"cmpl-{uuid.uuid4().hex}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": pod.config.model,
                "choices": [choice],
                "usage": _usage(done),
            },
            headers=headers(),
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> JSONResponse:
        body = await _read_json(request, max_body_bytes)
        _check_common(pod, body)
        max_tokens = _max_tokens(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise ApiError(400, "messages must be a non-empty list of objects", "messages")
        render: dict[str, Any] = {"add_generation_prompt": bool(body.get("add_generation_prompt", True))}
        for name in ("chat_template_kwargs", "tools", "documents"):
            if body.get(name) is not None:
                render[name] = body[name]
        if body.get("continue_final_message"):
            render["continue_final_message"] = True
        ids = await tokens(pod.tokenize_chat, messages, **render)
        done = await run(ids, max_tokens)
        message = {"role": "assistant", "content": done.text.strip(), "tool_calls": []}
        return JSONResponse(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": pod.config.model,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "length"}],
                "usage": _usage(done),
            },
            headers=headers(),
        )

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        card = {
            "id": pod.config.model,
            "object": "model",
            "created": int(pod.started_at),
            "owned_by": "kvindex-fake-pod",
            "root": pod.config.model,
            "parent": None,
            "max_model_len": pod.config.max_prompt_tokens,
        }
        return JSONResponse({"object": "list", "data": [card]})

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse(await asyncio.to_thread(pod.status), headers=headers())

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache() -> JSONResponse:
        await asyncio.to_thread(pod.reset_prefix_cache)
        return JSONResponse({"status": "ok"}, headers=headers())

    return app
