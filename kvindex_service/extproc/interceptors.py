"""The one place where exceptions of the ext_proc transport become gRPC statuses.

Inside a stream, bad HTTP input is answered as an HTTP immediate response (400/413) by the
servicer; what reaches this interceptor is a broken *protocol* (a body before the headers,
headers twice) or a bug. Envoy treats a failed stream per its ``failure_mode_allow``; the
picker process itself must never die of it, and the status says what happened:

* :class:`ProtocolError` and any other ``ValueError`` -> ``INVALID_ARGUMENT``
* ``LookupError`` -> ``NOT_FOUND``
* anything else -> ``INTERNAL`` (logged with its traceback, counted)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import grpc

from kvindex_service.extproc.stats import StreamStats

__all__ = ["ErrorMappingInterceptor", "ProtocolError"]

log = logging.getLogger(__name__)


class ProtocolError(ValueError):
    """Envoy (or a client) sent ext_proc messages in an order the protocol does not allow."""


def _status_for(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, LookupError):
        return grpc.StatusCode.NOT_FOUND
    return grpc.StatusCode.INTERNAL


#: A grpc.aio stream-stream behaviour: an async generator over the request stream. (The grpc
#: stubs describe ``RpcMethodHandler.stream_stream`` with the sync API's types.)
_StreamBehavior = Callable[[AsyncIterator[Any], "grpc.aio.ServicerContext[Any, Any]"], AsyncIterator[Any]]


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Wraps stream-stream handlers (ext_proc) so every exception maps to one status."""

    def __init__(self, stats: StreamStats) -> None:
        self._stats = stats

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.stream_stream is None:
            return handler
        behavior = cast(_StreamBehavior, handler.stream_stream)
        stats = self._stats
        method = handler_call_details.method

        async def wrapped(
            request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            try:
                async for response in behavior(request_iterator, context):
                    yield response
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:
                code = _status_for(exc)
                if code is grpc.StatusCode.INTERNAL:
                    stats.internal_errors += 1
                    log.exception("ext_proc stream failed", extra={"method": method})
                    detail = f"internal error: {type(exc).__name__}"
                else:
                    stats.protocol_errors += 1
                    log.warning("ext_proc stream rejected", extra={"method": method, "error": str(exc)})
                    detail = str(exc)
                await context.abort(code, detail)

        return grpc.stream_stream_rpc_method_handler(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
