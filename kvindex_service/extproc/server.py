"""The Envoy ``ExternalProcessor`` gRPC service (grpc.aio): one bidi stream per HTTP request.

What arrives, and what this server answers, per request body mode (read from the
``protocol_config`` of the stream's first message):

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

Errors become immediate responses: 400 (bad body, missing model), 413 (body too large),
503 (no eligible endpoint), 429 (every eligible endpoint at its cap). A scorer failure never
fails a request: the pick is made by load and affinity (fail open) and counted.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from kvindex_service.extproc.config import ExtprocConfig
from kvindex_service.extproc.interceptors import ErrorMappingInterceptor, ProtocolError
from kvindex_service.extproc.metrics import PickerMetrics
from kvindex_service.extproc.picker import Decision, Lease, Picker
from kvindex_service.extproc.prompt import BadRequest, PromptQuery, is_scored_path, parse_body, route_path
from kvindex_service.extproc.scorer_client import HttpScorer, Scorer
from kvindex_service.extproc.stats import StreamStats

__all__ = [
    "DESTINATION_HEADER",
    "LB_NAMESPACE",
    "MAX_STREAMED_CHUNK",
    "SUBSET_HINT_KEY",
    "SUBSET_HINT_NAMESPACE",
    "ExternalProcessorServicer",
    "PickerServer",
    "StreamStats",
    "start_picker",
]

log = logging.getLogger(__name__)

DESTINATION_HEADER = "x-gateway-destination-endpoint"
LB_NAMESPACE = "envoy.lb"
SUBSET_HINT_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_HINT_KEY = "x-gateway-destination-endpoint-subset"
#: Envoy's limit for one streamed_response body chunk (the GAIE EPP uses the same bound).
MAX_STREAMED_CHUNK = 62_000

_Mode = processing_mode_pb2.ProcessingMode
_BUFFERED = _Mode.BUFFERED
_STREAMED = _Mode.STREAMED
_DUPLEX: int = _Mode.FULL_DUPLEX_STREAMED
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def _header_value(h: base_pb2.HeaderValue) -> str:
    # Envoy puts header values in raw_value (bytes); older versions and other clients use
    # value. Accept both, prefer raw_value.
    raw: bytes = h.raw_value
    if raw:
        return raw.decode("utf-8", "replace")
    value: str = h.value
    return value


def _subset_hint(metadata: base_pb2.Metadata, limit: int) -> list[str] | None:
    ns = metadata.filter_metadata.get(SUBSET_HINT_NAMESPACE)
    if ns is None or SUBSET_HINT_KEY not in ns.fields:
        return None
    value = ns.fields[SUBSET_HINT_KEY]
    kind = value.WhichOneof("kind")
    if kind == "list_value":
        items = [v.string_value for v in value.list_value.values[:limit] if v.WhichOneof("kind") == "string_value"]
    elif kind == "string_value":
        # Tolerate a comma-separated string (some control planes flatten lists).
        items = [s for s in value.string_value.split(",")[:limit]]
    else:
        return []
    return [s.strip() for s in items if s.strip() and len(s) <= 256]


class _Responses:
    """Builders for every answer this server sends."""

    def __init__(self) -> None:
        self.headers_continue = ep.ProcessingResponse(request_headers=ep.HeadersResponse())
        self.body_continue = ep.ProcessingResponse(request_body=ep.BodyResponse())
        self.trailers_continue = ep.ProcessingResponse(request_trailers=ep.TrailersResponse())
        self.resp_headers_continue = ep.ProcessingResponse(response_headers=ep.HeadersResponse())
        self.resp_body_continue = ep.ProcessingResponse(response_body=ep.BodyResponse())
        self.resp_trailers_continue = ep.ProcessingResponse(response_trailers=ep.TrailersResponse())

    @staticmethod
    def _common(endpoint: str) -> ep.CommonResponse:
        return ep.CommonResponse(
            header_mutation=ep.HeaderMutation(
                set_headers=[
                    base_pb2.HeaderValueOption(
                        header=base_pb2.HeaderValue(key=DESTINATION_HEADER, raw_value=endpoint.encode()),
                        append_action=_OVERWRITE,
                    )
                ]
            ),
            clear_route_cache=True,
        )

    @staticmethod
    def _metadata(endpoint: str) -> struct_pb2.Struct:
        meta = struct_pb2.Struct()
        meta.update({LB_NAMESPACE: {DESTINATION_HEADER: endpoint}})
        return meta

    def pick_headers(self, endpoint: str) -> ep.ProcessingResponse:
        return ep.ProcessingResponse(
            request_headers=ep.HeadersResponse(response=self._common(endpoint)),
            dynamic_metadata=self._metadata(endpoint),
        )

    def pick_body(self, endpoint: str) -> ep.ProcessingResponse:
        return ep.ProcessingResponse(
            request_body=ep.BodyResponse(response=self._common(endpoint)),
            dynamic_metadata=self._metadata(endpoint),
        )

    def pick_trailers(self, endpoint: str) -> ep.ProcessingResponse:
        # Trailers cannot carry request-header mutations: only the metadata route remains.
        return ep.ProcessingResponse(request_trailers=ep.TrailersResponse(), dynamic_metadata=self._metadata(endpoint))

    @staticmethod
    def immediate(status: int, message: str) -> ep.ProcessingResponse:
        body = json.dumps({"error": {"message": message, "type": "routing_error", "code": status}})
        return ep.ProcessingResponse(
            immediate_response=ep.ImmediateResponse(
                status=http_status_pb2.HttpStatus(code=status),
                headers=ep.HeaderMutation(
                    set_headers=[
                        base_pb2.HeaderValueOption(
                            header=base_pb2.HeaderValue(key="content-type", raw_value=b"application/json"),
                            append_action=_OVERWRITE,
                        )
                    ]
                ),
                body=body.encode(),
                details=f"kvindex_extproc_{status}",
            )
        )

    @staticmethod
    def streamed(
        body: bytes | bytearray, end_of_stream: bool, *, response: bool = False
    ) -> list[ep.ProcessingResponse]:
        """``body`` as streamed_response body mutations of at most MAX_STREAMED_CHUNK bytes."""
        view = memoryview(body)
        pieces = [bytes(view[i : i + MAX_STREAMED_CHUNK]) for i in range(0, len(view), MAX_STREAMED_CHUNK)] or [b""]
        out = []
        for i, piece in enumerate(pieces):
            mutation = ep.BodyMutation(
                streamed_response=ep.StreamedBodyResponse(
                    body=piece, end_of_stream=end_of_stream and i == len(pieces) - 1
                )
            )
            br = ep.BodyResponse(response=ep.CommonResponse(body_mutation=mutation))
            out.append(ep.ProcessingResponse(response_body=br) if response else ep.ProcessingResponse(request_body=br))
        return out


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
            hint = _subset_hint(req.metadata_context, self.srv.config.max_subset)
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
        if self.scored and msg.end_of_stream:
            return (self._bad(BadRequest(f"{route_path(self.path)}: empty request body")),)
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
            query: PromptQuery | None = parse_body(self.path, bytes(self.body))
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
        self.responses = _Responses()

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


class PickerServer:
    """A running picker: the gRPC server, its :class:`Picker` and its metrics."""

    def __init__(
        self,
        server: grpc.aio.Server,
        port: int,
        picker: Picker,
        metrics: PickerMetrics,
        stats: StreamStats,
        owned_scorer: Scorer | None,
    ) -> None:
        self.server = server
        self.port = port
        self.picker = picker
        self.metrics = metrics
        self.stats = stats
        self._owned_scorer = owned_scorer
        self._stopped = False

    @property
    def metrics_port(self) -> int | None:
        return self.metrics.port

    async def stop(self, grace: float | None = 1.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        await self.server.stop(grace)
        self.metrics.close()
        if self._owned_scorer is not None:
            await self._owned_scorer.close()


def _add_health(server: grpc.aio.Server) -> Any:
    try:
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    except ImportError:  # grpcio-health-checking is optional
        log.info("grpcio-health-checking not installed: no grpc.health.v1 service")
        return None
    servicer = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return servicer, health_pb2


async def start_picker(
    config: ExtprocConfig,
    *,
    scorer: Scorer | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
) -> PickerServer:
    """Start the ext_proc server on ``host:port`` (0 = a free port) and, if configured, the
    metrics exporter. Without ``scorer``, an :class:`HttpScorer` on ``config.scorer_url`` is
    created (and closed by :meth:`PickerServer.stop`); with neither, picks use load only."""
    owned: Scorer | None = None
    if scorer is None and config.scorer_url:
        scorer = owned = HttpScorer(config.scorer_url, timeout_ms=config.timeout_ms)
    picker = Picker(config, scorer)
    stats = StreamStats()
    metrics = PickerMetrics(picker, stats)
    picker.on_scorer_latency = metrics.scorer_seconds.observe
    limit = config.max_body_bytes + (1 << 20)
    server = grpc.aio.server(
        interceptors=[ErrorMappingInterceptor(stats)],
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ],
    )
    ep_grpc.add_ExternalProcessorServicer_to_server(ExternalProcessorServicer(picker, config, metrics, stats), server)
    health = _add_health(server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind the ext_proc server on {host}:{port}")
    await server.start()
    if health is not None:
        servicer, health_pb2 = health
        for name in ("", "envoy.service.ext_proc.v3.ExternalProcessor"):
            await _maybe_await(servicer.set(name, health_pb2.HealthCheckResponse.SERVING))
    if config.metrics_port:
        try:
            metrics.serve(config.metrics_port, config.metrics_host)
        except OSError:
            await server.stop(None)
            if owned is not None:
                await owned.close()
            raise
    log.info("ext_proc picker listening", extra={"port": bound, "endpoints": len(config.endpoints)})
    return PickerServer(server, bound, picker, metrics, stats, owned)


async def _maybe_await(value: Any) -> None:
    if hasattr(value, "__await__"):
        await value
