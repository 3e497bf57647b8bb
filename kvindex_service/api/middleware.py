"""One pure-ASGI middleware for what every request needs before and after the routes.

* request id: ``x-request-id`` echoed when the client sent a sane one, else generated;
* authentication: with a token configured, every path but the probes needs
  ``Authorization: Bearer <token>`` (compared in constant time); else 401 with
  ``WWW-Authenticate: Bearer``, before the body is read;
* body limit: a declared ``Content-Length`` over the limit is refused before reading; a
  streamed (chunked) body is read up to the limit and refused as soon as it passes it.
  Either way the answer is 413 and the route never sees the body;
* request timeout: a request still running after ``request_timeout`` gets 504;
* one access-log line and the HTTP metrics per request, labelled by route template (never
  by raw path, so a scan of random URLs cannot grow the label set).

Pure ASGI rather than ``BaseHTTPMiddleware``: it adds no task or memory stream per request,
which matters at sub-millisecond latencies.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvindex_service.errors import error_body
from kvindex_service.metrics import ServiceMetrics

__all__ = ["ServiceMiddleware"]

access_log = logging.getLogger("kvindex_service.access")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

#: Paths answered without a token: orchestrators probe them unauthenticated.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})


def _json_response(
    status: int, body: dict[str, Any], request_id: str, extra: tuple[tuple[bytes, bytes], ...] = ()
) -> tuple[Message, Message]:
    payload = json.dumps(body).encode()
    start: Message = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            (b"x-request-id", request_id.encode()),
            *extra,
        ],
    }
    return start, {"type": "http.response.body", "body": payload}


def _auth_problem(scope: Scope, expected: bytes) -> tuple[str, str] | None:
    """None when the request carries the token, else (error code, message)."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = bytes(value).partition(b" ")
            if scheme.lower() != b"bearer" or not token.strip():
                return "invalid_request", "the Authorization header must be 'Bearer <token>'"
            if not hmac.compare_digest(token.strip(), expected):
                return "invalid_token", "the bearer token is not valid"
            return None
    return "missing_token", "authentication required: send 'Authorization: Bearer <token>'"


class ServiceMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: ServiceMetrics | None,
        max_body_bytes: int,
        request_timeout: float,
        auth_token: str | None = None,
    ) -> None:
        self.app = app
        self.auth_token = auth_token.encode() if auth_token else None
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.request_timeout = request_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        request_id = self._request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        method: str = scope["method"]
        status = 500
        started = False
        rid = request_id.encode()

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid)]
            await send(message)

        try:
            if self.auth_token is not None and scope.get("path") not in OPEN_PATHS:
                problem = _auth_problem(scope, self.auth_token)
                if problem is not None:
                    status = 401
                    code, msg = problem
                    challenge = b'Bearer realm="kvindex"'
                    if code != "missing_token":
                        challenge += f', error="{code}"'.encode()
                    err = error_body("unauthorized", msg, {"reason": code})
                    for m in _json_response(401, err, request_id, ((b"www-authenticate", challenge),)):
                        await send(m)
                    started = True
                    return
            if method in _BODY_METHODS:
                body = await self._read_body(scope, receive)
                if body is None:
                    status = 413
                    msg = f"request body exceeds the limit of {self.max_body_bytes} bytes"
                    for m in _json_response(413, error_body("body_too_large", msg), request_id):
                        await send(m)
                    started = True
                    return
                receive = _replay(body, receive)
            deadline = asyncio.timeout(self.request_timeout)
            try:
                async with deadline:
                    await self.app(scope, receive, send_wrapper)
            except TimeoutError:
                # Only our own deadline becomes a 504; a TimeoutError raised by a route is
                # an ordinary error (the exception handlers have answered it already).
                if started or not deadline.expired():
                    raise
                status = 504
                msg = f"request did not complete within {self.request_timeout:g} s"
                for m in _json_response(504, error_body("timeout", msg), request_id):
                    await send(m)
                started = True
        finally:
            self._record(scope, method, status, time.perf_counter() - t0, request_id)

    @staticmethod
    def _request_id(scope: Scope) -> str:
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                candidate: str = bytes(value).decode("latin-1")
                if _REQUEST_ID.match(candidate):
                    return candidate
                break
        return uuid.uuid4().hex

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole body, or None once it is known to exceed the limit."""
        limit = self.max_body_bytes
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    if int(value) > limit:
                        return None
                except ValueError:
                    pass  # the server rejects malformed lengths before we get here
                break
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    def _record(self, scope: Scope, method: str, status: int, seconds: float, request_id: str) -> None:
        route = scope.get("route")
        template = getattr(route, "path", None) or "<unmatched>"
        if self.metrics is not None:
            self.metrics.http_requests.labels(template, method, str(status)).inc()
            self.metrics.http_seconds.labels(template, method).observe(seconds)
        if access_log.isEnabledFor(logging.INFO):
            client = scope.get("client")
            access_log.info(
                "%s %s %d",
                method,
                scope.get("path", ""),
                status,
                extra={
                    "request_id": request_id,
                    "route": template,
                    "status": status,
                    "duration_ms": round(seconds * 1000, 3),
                    "client": f"{client[0]}:{client[1]}" if client else None,
                },
            )


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the buffered body out once, then defers to the real one (so a
    client disconnect is still seen)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
