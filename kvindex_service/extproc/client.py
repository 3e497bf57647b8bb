"""An Envoy-like ext_proc client: sends exactly what Envoy's ext_proc filter sends.

Used by the tests, the benchmark and the fleet simulator to drive a real picker over real
gRPC without an Envoy binary. Per request it opens one ``Process`` stream and sends:

* ``request_headers`` -- lower-case keys, the pseudo-headers (``:method``, ``:path``,
  ``:authority``, ``:scheme``), every value in ``raw_value``; the first message carries
  ``protocol_config`` (the body modes) and, when given, the subset hint in
  ``metadata_context.filter_metadata["envoy.lb.subset_hint"]``;
* the body per mode: BUFFERED one message; STREAMED ``chunk_size`` chunks, waiting for each
  answer; FULL_DUPLEX_STREAMED every chunk without waiting, then an empty chunk with
  ``end_of_stream`` (as Envoy does for a chunked upload), while reading answers concurrently;
* when ``complete``: ``response_headers`` (``:status: 200``), optionally a response body, then
  half-close -- which is what releases the picker's in-flight count.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from google.protobuf import json_format, struct_pb2

__all__ = ["BodyMode", "EnvoyClient", "PendingRoute", "RouteResult"]

BodyMode = Literal["BUFFERED", "STREAMED", "FULL_DUPLEX_STREAMED"]

_DEST = "x-gateway-destination-endpoint"
_MODES = {
    "BUFFERED": processing_mode_pb2.ProcessingMode.BUFFERED,
    "STREAMED": processing_mode_pb2.ProcessingMode.STREAMED,
    "FULL_DUPLEX_STREAMED": processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED,
}


def _headers(pairs: Sequence[tuple[str, str]], end_of_stream: bool) -> ep.HttpHeaders:
    return ep.HttpHeaders(
        headers=base_pb2.HeaderMap(
            headers=[base_pb2.HeaderValue(key=k.lower(), raw_value=v.encode()) for k, v in pairs]
        ),
        end_of_stream=end_of_stream,
    )


def _mutated_endpoint(resp: ep.ProcessingResponse) -> tuple[str | None, base_pb2.HeaderValue | None]:
    kind = resp.WhichOneof("response")
    if kind not in ("request_headers", "request_body"):
        return None, None
    common = getattr(resp, kind).response
    for opt in common.header_mutation.set_headers:
        if opt.header.key == _DEST:
            h = opt.header
            return (h.raw_value.decode() if h.raw_value else h.value), h
    return None, None


@dataclass
class PendingRoute:
    """A routed request whose response has not been sent yet (``complete=False``)."""

    call: Any
    timeout: float
    responses: list[ep.ProcessingResponse] = field(default_factory=list)
    """The result's response list; the response-phase answers are appended to it."""
    done: bool = False

    async def finish(self, *, status: int = 200, response_body: bytes | None = None) -> None:
        """Send the response (headers, optional body), half-close and wait for the end."""
        if self.done:
            return
        self.done = True
        try:
            has_body = bool(response_body)
            await self.call.write(
                ep.ProcessingRequest(
                    response_headers=_headers(
                        [(":status", str(status)), ("content-type", "application/json")], not has_body
                    )
                )
            )
            await self._read()
            if has_body:
                assert response_body is not None
                await self.call.write(
                    ep.ProcessingRequest(response_body=ep.HttpBody(body=response_body, end_of_stream=True))
                )
                await self._read()
            await self.call.done_writing()
            while await asyncio.wait_for(self.call.read(), self.timeout) is not grpc.aio.EOF:
                pass
        except BaseException:
            self.call.cancel()
            raise

    async def _read(self) -> None:
        resp = await asyncio.wait_for(self.call.read(), self.timeout)
        if resp is grpc.aio.EOF:
            raise ConnectionError("the picker closed the stream before answering the response")
        self.responses.append(resp)

    async def cancel(self) -> None:
        """Abort the stream, as Envoy does when the downstream client goes away."""
        if not self.done:
            self.done = True
            self.call.cancel()


@dataclass
class RouteResult:
    endpoint: str | None = None
    """The endpoint set in ``x-gateway-destination-endpoint`` (None if not routed)."""
    metadata_endpoint: str | None = None
    """The endpoint in dynamic metadata ``envoy.lb``."""
    status: int | None = None
    """HTTP status of an immediate response, None when the request was routed."""
    immediate_body: bytes | None = None
    responses: list[ep.ProcessingResponse] = field(default_factory=list)
    body: bytes | None = None
    """The body echoed back as streamed_response chunks (full-duplex mode)."""
    header_value: base_pb2.HeaderValue | None = None
    """The raw HeaderValue of the pick, to check how it was encoded."""
    pending: PendingRoute | None = None

    async def finish(self, **kwargs: Any) -> None:
        if self.pending is not None:
            await self.pending.finish(**kwargs)

    async def cancel(self) -> None:
        if self.pending is not None:
            await self.pending.cancel()


class EnvoyClient:
    """One gRPC channel to a picker; ``route`` per HTTP request."""

    def __init__(
        self,
        target: str,
        *,
        authority: str = "llm.example.com",
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        """``credentials`` (``grpc.ssl_channel_credentials(...)``): connect with TLS, as an
        Envoy configured with a TLS transport socket to a ``--tls-cert`` picker does."""
        self.target = target
        self.authority = authority
        options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=options)
        self._stub = ep_grpc.ExternalProcessorStub(self._channel)

    async def __aenter__(self) -> EnvoyClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def _first(
        self,
        path: str,
        body: bytes,
        headers: Mapping[str, str],
        mode: BodyMode,
        subset: Sequence[str] | None,
        response_body_mode: int,
        protocol_config: bool = True,
    ) -> ep.ProcessingRequest:
        method = "POST" if body else "GET"
        pairs: list[tuple[str, str]] = [
            (":authority", self.authority),
            (":path", path),
            (":method", method),
            (":scheme", "http"),
        ]
        if body:
            pairs += [("content-type", "application/json"), ("content-length", str(len(body)))]
        pairs += [("x-forwarded-proto", "http"), ("x-request-id", str(uuid.uuid4()))]
        pairs += [(k.lower(), v) for k, v in headers.items()]
        req = ep.ProcessingRequest(request_headers=_headers(pairs, end_of_stream=not body))
        if protocol_config:
            req.protocol_config.CopyFrom(
                ep.ProtocolConfiguration(request_body_mode=_MODES[mode], response_body_mode=response_body_mode)
            )
        if subset is not None:
            hint = struct_pb2.Struct()
            hint.update({"x-gateway-destination-endpoint-subset": list(subset)})
            req.metadata_context.filter_metadata["envoy.lb.subset_hint"].CopyFrom(hint)
        return req

    async def route(
        self,
        path: str,
        body: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        mode: BodyMode = "BUFFERED",
        chunk_size: int = 16_384,
        subset: list[str] | None = None,
        complete: bool = True,
        empty_last_chunk: bool = True,
        response_body: bytes | None = None,
        timeout: float = 60.0,
        protocol_config: bool = True,
    ) -> RouteResult:
        """Send one HTTP request's ext_proc messages; see the module docstring.
        ``protocol_config=False``: leave it out of the first message, as older Envoys do
        (``mode`` is then only how this client sends the body)."""
        if mode not in _MODES:
            raise ValueError(f"unknown body mode {mode!r}")
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        resp_mode = (
            processing_mode_pb2.ProcessingMode.STREAMED if response_body else processing_mode_pb2.ProcessingMode.NONE
        )
        call = self._stub.Process(timeout=timeout)
        result = RouteResult()
        try:
            await call.write(self._first(path, body, headers or {}, mode, subset, resp_mode, protocol_config))
            chunks = [body[i : i + chunk_size] for i in range(0, len(body), chunk_size)]
            if mode == "FULL_DUPLEX_STREAMED":
                await self._duplex(call, chunks, result, empty_last_chunk, timeout)
            else:
                await self._lockstep(call, body, chunks, mode, result, timeout)
            if result.status is not None:
                await call.done_writing()
                await self._drain(call, timeout)
                return result
            pending = PendingRoute(call, timeout, result.responses)
            if complete:
                await pending.finish(response_body=response_body)
            else:
                result.pending = pending
            return result
        except BaseException:
            call.cancel()
            raise

    async def _read(self, call: Any, result: RouteResult, timeout: float) -> ep.ProcessingResponse | None:
        resp = await asyncio.wait_for(call.read(), timeout)
        if resp is grpc.aio.EOF:
            return None
        result.responses.append(resp)
        endpoint, header = _mutated_endpoint(resp)
        if endpoint is not None:
            result.endpoint, result.header_value = endpoint, header
        if resp.HasField("dynamic_metadata"):
            meta = json_format.MessageToDict(resp.dynamic_metadata)
            value = meta.get("envoy.lb", {}).get(_DEST)
            if value is not None:
                result.metadata_endpoint = value
        if resp.HasField("immediate_response"):
            result.status = int(resp.immediate_response.status.code)
            result.immediate_body = resp.immediate_response.body
        return resp

    async def _lockstep(
        self, call: Any, body: bytes, chunks: list[bytes], mode: BodyMode, result: RouteResult, timeout: float
    ) -> None:
        if await self._read(call, result, timeout) is None or result.status is not None or not body:
            return
        if mode == "BUFFERED":
            chunks = [body]
        for i, chunk in enumerate(chunks):
            await call.write(
                ep.ProcessingRequest(request_body=ep.HttpBody(body=chunk, end_of_stream=i == len(chunks) - 1))
            )
            if await self._read(call, result, timeout) is None or result.status is not None:
                return

    async def _duplex(
        self, call: Any, chunks: list[bytes], result: RouteResult, empty_last_chunk: bool, timeout: float
    ) -> None:
        async def writer() -> None:
            if not chunks:
                return
            last = len(chunks) - 1
            for i, chunk in enumerate(chunks):
                eos = i == last and not empty_last_chunk
                await call.write(ep.ProcessingRequest(request_body=ep.HttpBody(body=chunk, end_of_stream=eos)))
            if empty_last_chunk:
                await call.write(ep.ProcessingRequest(request_body=ep.HttpBody(body=b"", end_of_stream=True)))

        # Write and read concurrently: the picker may echo while the upload is still going.
        task = asyncio.ensure_future(writer())
        try:
            echoed = bytearray()
            got_headers = False
            while True:
                resp = await self._read(call, result, timeout)
                if resp is None or result.status is not None:
                    break
                kind = resp.WhichOneof("response")
                if kind == "request_headers":
                    got_headers = True
                    if not chunks:
                        break
                elif kind == "request_body":
                    sr = resp.request_body.response.body_mutation.streamed_response
                    echoed += sr.body
                    if sr.end_of_stream:
                        break
            result.body = bytes(echoed) if got_headers else None
            if result.status is not None:
                task.cancel()
            else:
                await task
        finally:
            if not task.done():
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    @staticmethod
    async def _drain(call: Any, timeout: float) -> None:
        try:
            while await asyncio.wait_for(call.read(), timeout) is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError:
            pass
