"""The service middleware on its own (ASGI calls, no server): request timeout and the body
limit are enforced before any route runs, and only the middleware's own deadline is a 504."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from kvindex_service.api.middleware import ServiceMiddleware
from kvindex_service.metrics import ServiceMetrics


def _scope(method: str = "POST", headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
    return {"type": "http", "method": method, "path": "/x", "headers": headers or [], "client": ("127.0.0.1", 1)}


async def _call(app: Any, scope: dict[str, Any], chunks: list[bytes]) -> list[dict[str, Any]]:
    pending = list(chunks)

    async def receive() -> dict[str, Any]:
        if pending:
            body = pending.pop(0)
            return {"type": "http.request", "body": body, "more_body": bool(pending)}
        await asyncio.Event().wait()  # never: no disconnect in these tests
        raise AssertionError

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


async def _slow_app(scope: Any, receive: Any, send: Any) -> None:
    await asyncio.sleep(60)


async def _echo_length(scope: Any, receive: Any, send: Any) -> None:
    message = await receive()
    body = json.dumps({"length": len(message["body"])}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def test_request_over_its_deadline_gets_504() -> None:
    metrics = ServiceMetrics()
    app = ServiceMiddleware(_slow_app, metrics=metrics, max_body_bytes=1024, request_timeout=0.05)
    sent = asyncio.run(_call(app, _scope("GET"), []))
    assert sent[0]["status"] == 504
    assert json.loads(sent[1]["body"])["error"]["type"] == "timeout"
    assert b'status="504"' in metrics.render()


def test_a_routes_own_timeout_error_is_not_a_504() -> None:
    async def raises(scope: Any, receive: Any, send: Any) -> None:
        raise TimeoutError("the subscriber thread did not answer")

    app = ServiceMiddleware(raises, metrics=None, max_body_bytes=1024, request_timeout=30)
    with pytest.raises(TimeoutError, match="subscriber"):
        asyncio.run(_call(app, _scope("GET"), []))


def test_body_limit_declared_and_streamed() -> None:
    app = ServiceMiddleware(_echo_length, metrics=None, max_body_bytes=100, request_timeout=30)
    declared = asyncio.run(_call(app, _scope(headers=[(b"content-length", b"101")]), [b"x" * 101]))
    assert declared[0]["status"] == 413
    streamed = asyncio.run(_call(app, _scope(), [b"x" * 60, b"x" * 60]))
    assert streamed[0]["status"] == 413
    assert json.loads(streamed[1]["body"])["error"]["type"] == "body_too_large"
    fits = asyncio.run(_call(app, _scope(), [b"x" * 50, b"x" * 50]))
    assert fits[0]["status"] == 200 and json.loads(fits[1]["body"]) == {"length": 100}
    # The request id travels on every answer, generated when absent.
    assert any(k == b"x-request-id" for k, _ in fits[0]["headers"])
