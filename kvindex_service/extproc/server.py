"""The Envoy ``ExternalProcessor`` gRPC service (grpc.aio): one bidi stream per HTTP request.

What arrives, and what this server answers, per request body mode (read from the
``protocol_config`` of the stream's first message; a stream without one is
FULL_DUPLEX_STREAMED, GAIE's documented mode, unless ``assume_full_duplex`` is off):

========================  =====================================================================
mode                      answers
========================  =====================================================================
BUFFERED                  headers -> CONTINUE; the single body message -> the pick
                          (header mutation + ``clear_route_cache`` + dynamic metadata)
STREAMED                  headers -> CONTINUE; every body chunk -> CONTINUE (unchanged),
                          the ``end_of_stream`` chunk -> the pick
FULL_DUPLEX_STREAMED      nothing until the body's ``end_of_stream`` (possibly an empty last
                          chunk); then the headers answer with the pick, then the whole body
                          echoed unchanged as ``streamed_response`` chunks of <= 62,000 bytes,
                          the last one with ``end_of_stream``
========================  =====================================================================

Paths that carry no prompt (anything but ``/v1/completions`` and ``/v1/chat/completions``)
are picked at the headers, so their bodies are never buffered (in full-duplex mode each chunk
is echoed as it arrives). Response headers, bodies and trailers are passed through; the
request's in-flight lease is released at the response headers (or the response's end, see
``release_on``) and, in every case, when the stream closes or is cancelled.

A request without a body (headers with ``end_of_stream``, or an empty body) is routed on load
and affinity alone. Errors become immediate responses: 400 (bad body, missing model), 413 (body too large),
503 (no eligible endpoint), 429 (every eligible endpoint at its cap). A scorer failure never
fails a request: the pick is made by load and affinity (fail open) and counted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from kvindex_service.extproc.config import ExtprocConfig
from kvindex_service.extproc.hints import SUBSET_HINT_KEY, SUBSET_HINT_NAMESPACE, SubsetHintFilter
from kvindex_service.extproc.interceptors import ProtocolError
from kvindex_service.extproc.metrics import PickerMetrics
from kvindex_service.extproc.picker import Decision, Lease, Picker
from kvindex_service.extproc.prompt import BadRequest, PromptQuery, is_scored_path, parse_body
from kvindex_service.extproc.responses import DESTINATION_HEADER, LB_NAMESPACE, MAX_STREAMED_CHUNK, Responses
from kvindex_service.extproc.stats import StreamStats

if TYPE_CHECKING:
    pass

__all__ = [
    "DESTINATION_HEADER",
    "LB_NAMESPACE",
    "MAX_STREAMED_CHUNK",
    "SUBSET_HINT_KEY",
    "SUBSET_HINT_NAMESPACE",
    "ExternalProcessorServicer",
    "StreamStats",
]

log = logging.getLogger(__name__)

_Mode = processing_mode_pb2.ProcessingMode
_BUFFERED = _Mode.BUFFERED
_STREAMED = _Mode.STREAMED
_DUPLEX: int = _Mode.FULL_DUPLEX_STREAMED


def _header_value(h: base_pb2.HeaderValue) -> str:
    # Envoy puts header values in raw_value (bytes); older versions and other clients use
    # value. Accept both, prefer raw_value.
    raw: bytes = h.raw_value
    if raw:
        return raw.decode("utf-8", "replace")
    value: str = h.value
    return value


class _Stream:
    """The state of one ext_proc stream (one HTTP request)."""

    __slots__ = (
        "body",
        "body_done",
        "decided",
        "headers_seen",
        "last_immediate",
        "lease",
        "method",
        "observe",
        "path",
        "req_mode",
        "request_id",
        "resp_mode",
        "response_seen",
        "scored",
        "session",
        "srv",
        "subset",
    )  # fmt: skip

    def __init__(self, srv: ExternalProcessorServicer) -> None:
        self.srv = srv
        self.req_mode: int | None = None
        self.resp_mode: int = _Mode.NONE
        self.path = ""
        self.method = ""
        self.request_id = ""
        self.session: str | None = None
        self.subset: list[str] | None = None
        self.scored = False
        self.body = bytearray()
        self.body_done = False
        self.lease: Lease | None = None
        self.decided = False
        self.headers_seen = False
        self.observe = False
        #: The immediate response a failed decision produced (set with ``decision=None``).
        self.last_immediate: ep.ProcessingResponse | None = None
        self.response_seen = False

    def close(self) -> None:
        if self.lease is not None:
            self.lease.release()

    @property
    def duplex(self) -> bool:
        return self.req_mode == _DUPLEX

    async def handle(self, req: ep.ProcessingRequest) -> Iterable[ep.ProcessingResponse]:
        if req.HasField("protocol_config"):
            pc = req.protocol_config
            self.req_mode = pc.request_body_mode
            self.resp_mode = pc.response_body_mode
        if req.HasField("metadata_context"):
            hint = self.srv.hints.read(req.metadata_context)
            if hint is not None:
                self.subset = hint
        self.observe = req.observability_mode
        kind = req.WhichOneof("request")
        if kind == "request_headers":
            return await self._request_headers(req.request_headers)
        if kind == "request_body":
            return await self._request_body(req.request_body)
        if kind == "request_trailers":
            return await self._request_trailers()
        if kind == "response_headers":
            self.response_seen = True
            if self.srv.config.release_on == "response_headers" or req.response_headers.end_of_stream:
                self.close()
            return (self.srv.responses.resp_headers_continue,)
        if kind == "response_body":
            rb = req.response_body
            if rb.end_of_stream:
                self.close()
            if self.resp_mode == _DUPLEX:
                return self.srv.responses.streamed(rb.body, rb.end_of_stream, response=True)
            return (self.srv.responses.resp_body_continue,)
        if kind == "response_trailers":
            self.close()
            return (self.srv.responses.resp_trailers_continue,)
        # A message type this server does not know (a newer Envoy): nothing to answer.
        self.srv.stats.skipped_messages += 1
        log.warning("skipping ext_proc message without a known request field")
        return ()

    async def _request_headers(self, msg: ep.HttpHeaders) -> Iterable[ep.ProcessingResponse]:
        if self.headers_seen:
            raise ProtocolError("request_headers received twice on one stream")
        self.headers_seen = True
        if self.req_mode is None:
            self.req_mode = _DUPLEX if self.srv.config.assume_full_duplex else _BUFFERED
        session_header = self.srv.config.session_header
        for h in msg.headers.headers:
            key = h.key.lower()
            if key == ":path":
                self.path = _header_value(h)
            elif key == ":method":
                self.method = _header_value(h).upper()
            elif key == session_header:
                self.session = _header_value(h)
            elif key == "x-request-id":
                self.request_id = _header_value(h)
        self.scored = is_scored_path(self.path) and self.method == "POST"
        if not self.scored or msg.end_of_stream:
            decision = await self._decide(None)
            if decision.endpoint is None:
                return (self._immediate(decision),)
            return (self.srv.responses.pick_headers(decision.endpoint),)
        if self.duplex:
            return ()  # the headers are answered once the body is in
        return (self.srv.responses.headers_continue,)

    async def _request_body(self, msg: ep.HttpBody) -> Iterable[ep.ProcessingResponse]:
        if not self.headers_seen:
            raise ProtocolError("request_body before request_headers")
        if self.body_done:
            raise ProtocolError("request_body after the body's end_of_stream")
        r = self.srv.responses
        eos = msg.end_of_stream
        if self.decided:
            # Not a scored path: picked at the headers, the body only passes through.
            self.body_done = eos
            if self.duplex:
                return r.streamed(msg.body, eos)
            return (r.body_continue,)
        if len(self.body) + len(msg.body) > self.srv.config.max_body_bytes:
            return (self._bad(BadRequest(f"request body over {self.srv.config.max_body_bytes} bytes", status=413)),)
        self.body += msg.body
        if eos:
            self.body_done = True
        if self.duplex:
            if not eos:
                return ()
            return await self._finish_duplex(eos=True)
        if self.req_mode == _STREAMED and not eos:
            return (r.body_continue,)
        # BUFFERED (one message), BUFFERED_PARTIAL (one possibly partial message) or the last
        # STREAMED chunk: the pick rides on this body answer.
        decision = await self._decide_body(partial=not eos)
        if decision is None or decision.endpoint is None:
            return (self._failed(),)
        return (r.pick_body(decision.endpoint),)

    async def _request_trailers(self) -> Iterable[ep.ProcessingResponse]:
        r = self.srv.responses
        if not self.headers_seen:
            raise ProtocolError("request_trailers before request_headers")
        if self.decided or not self.scored:
            return (r.trailers_continue,)
        # The request ended with trailers before the body said end_of_stream.
        self.body_done = True
        if self.duplex:
            return [*await self._finish_duplex(eos=False), r.trailers_continue]
        decision = await self._decide_body(partial=False)
        if decision is None or decision.endpoint is None:
            return (self._failed(),)
        return (r.pick_trailers(decision.endpoint),)

    async def _finish_duplex(self, *, eos: bool) -> list[ep.ProcessingResponse]:
        decision = await self._decide_body(partial=False)
        if decision is None or decision.endpoint is None:
            return [self._failed()]
        out = [self.srv.responses.pick_headers(decision.endpoint)]
        out.extend(self.srv.responses.streamed(self.body, eos))
        self.body = bytearray()
        return out

    async def _decide_body(self, *, partial: bool) -> Decision | None:
        try:
            # No body at all: routed on load and affinity, as at the headers.
            query: PromptQuery | None = parse_body(self.path, bytes(self.body)) if self.body else None
        except BadRequest as exc:
            if not partial:
                self.last_immediate = self._bad(exc)
                return None
            query = None  # a truncated BUFFERED_PARTIAL body: route without a score
        decision = await self._decide(query)
        if decision.endpoint is None:
            self.last_immediate = self._immediate(decision)
        return decision

    async def _decide(self, query: PromptQuery | None) -> Decision:
        t0 = time.perf_counter()
        self.decided = True
        decision = await self.srv.picker.pick(query, subset=self.subset, session=self.session)
        self.srv.metrics.pick_seconds.observe(time.perf_counter() - t0)
        self.lease = decision.lease
        log.info(
            "pick",
            extra={
                "request_id": self.request_id,
                "path": self.path,
                "endpoint": decision.endpoint,
                "reason": decision.reason,
                "status": decision.status,
                "scorer": decision.scorer_outcome,
                "model": query.model if query else None,
            },
        )
        return decision

    def _immediate(self, decision: Decision) -> ep.ProcessingResponse:
        return self.srv.responses.immediate(decision.status or 503, decision.message)

    def _bad(self, exc: BadRequest) -> ep.ProcessingResponse:
        self.decided = True
        self.srv.stats.bad_requests[exc.status] += 1
        log.info("rejected request", extra={"request_id": self.request_id, "status": exc.status, "error": str(exc)})
        return self.srv.responses.immediate(exc.status, str(exc))

    def _failed(self) -> ep.ProcessingResponse:
        assert self.last_immediate is not None
        return self.last_immediate


# The generated base (xds-protos ships no stubs) only adds UNIMPLEMENTED defaults.
class ExternalProcessorServicer(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """``envoy.service.ext_proc.v3.ExternalProcessor/Process``: answers strictly in order."""

    def __init__(self, picker: Picker, config: ExtprocConfig, metrics: PickerMetrics, stats: StreamStats) -> None:
        self.picker = picker
        self.config = config
        self.metrics = metrics
        self.stats = stats
        self.responses = Responses()
        # Only checks the entries' form: which are known endpoints is the picker's call, at
        # pick time, against the live endpoint set.
        self.hints = SubsetHintFilter((), config.max_subset, stats.hint_dropped)
        picker.hint_dropped = stats.hint_dropped

    async def Process(
        self, request_iterator: AsyncIterator[ep.ProcessingRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[ep.ProcessingResponse]:
        stream = _Stream(self)
        self.stats.opened += 1
        self.stats.active += 1
        finished = False
        try:
            async for req in request_iterator:
                answers = await stream.handle(req)
                if stream.observe:
                    continue  # observability mode: Envoy expects no answer
                immediate = False
                for resp in answers:
                    yield resp
                    immediate = immediate or resp.HasField("immediate_response")
                if immediate:
                    break  # Envoy closes the stream after an immediate response
            finished = True
        finally:
            # A cancelled RPC may end the request iterator quietly, so "cancelled" means: the
            # stream ended (or failed) after a pick but before any response came back.
            if not finished or (stream.lease is not None and not stream.response_seen):
                self.stats.cancelled += 1
            self.stats.active -= 1
            stream.close()
