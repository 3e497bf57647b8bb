"""The ext_proc wire protocol, message by message, against the real scoring service.

Covers: one answer per message (BUFFERED/STREAMED), full-duplex body echo byte for byte in
<= 62,000-byte chunks, immediate responses (400/413/503/429), Envoy's ``value`` vs
``raw_value`` header encodings, request trailers, response pass-through, protocol errors
mapped to gRPC statuses, and in-flight counts that always return to zero.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from kvindex_service.extproc import MAX_STREAMED_CHUNK, EnvoyClient, ExtprocConfig, start_picker
from tests.extproc.support import POD1, POD2, PODS, completion_body, run, wait_for

Mode = processing_mode_pb2.ProcessingMode


def _kinds(responses: list[ep.ProcessingResponse]) -> list[str]:
    return [str(r.WhichOneof("response")) for r in responses]


def _hdrs(pairs: dict[str, str], eos: bool = False, *, raw: bool = True) -> ep.HttpHeaders:
    values = [
        base_pb2.HeaderValue(key=k, raw_value=v.encode()) if raw else base_pb2.HeaderValue(key=k, value=v)
        for k, v in pairs.items()
    ]
    return ep.HttpHeaders(headers=base_pb2.HeaderMap(headers=values), end_of_stream=eos)


async def _read(call: Any) -> ep.ProcessingResponse:
    resp = await asyncio.wait_for(call.read(), 10)
    assert resp is not grpc.aio.EOF
    return resp


def test_one_answer_per_message_buffered(scorer_url: str, model: str, prompt_text: dict[str, str]) -> None:
    async def scenario() -> None:
        server = await start_picker(ExtprocConfig(endpoints=PODS, scorer_url=scorer_url, timeout_ms=5000))
        try:
            async with EnvoyClient(f"127.0.0.1:{server.port}") as client:
                r = await client.route("/v1/completions", completion_body(model, prompt_text["P2"]), mode="BUFFERED")
            assert _kinds(r.responses) == ["request_headers", "request_body", "response_headers"]
            headers_answer, body_answer = r.responses[0], r.responses[1]
            assert not headers_answer.request_headers.response.HasField("header_mutation")
            assert not headers_answer.HasField("dynamic_metadata")
            assert body_answer.request_body.response.header_mutation.set_headers[0].header.raw_value == POD2.encode()
            assert not body_answer.request_body.response.HasField("body_mutation")
        finally:
            await server.stop()

    run(scenario())


def test_one_answer_per_chunk_streamed(scorer_url: str, model: str, prompt_text: dict[str, str]) -> None:
    async def scenario() -> None:
        server = await start_picker(ExtprocConfig(endpoints=PODS, scorer_url=scorer_url, timeout_ms=5000))
        try:
            body = completion_body(model, prompt_text["P1"])
            chunks = -(-len(body) // 50)
            async with EnvoyClient(f"127.0.0.1:{server.port}") as client:
                r = await client.route("/v1/completions", body, mode="STREAMED", chunk_size=50)
            assert _kinds(r.responses) == ["request_headers"] + ["request_body"] * chunks + ["response_headers"]
            body_answers = r.responses[1 : 1 + chunks]
            for answer in body_answers[:-1]:
                # Pass-through: no header or body mutation on the intermediate chunks.
                assert answer.request_body.response == ep.CommonResponse()
                assert not answer.HasField("dynamic_metadata")
            last = body_answers[-1]
            assert last.request_body.response.clear_route_cache
            assert not last.request_body.response.HasField("body_mutation")
            assert r.endpoint == POD1
        finally:
            await server.stop()

    run(scenario())


@pytest.mark.parametrize("empty_last_chunk", [True, False])
def test_full_duplex_echoes_large_body(
    empty_last_chunk: bool, scorer_url: str, model: str, prompt_text: dict[str, str]
) -> None:
    async def scenario() -> None:
        server = await start_picker(ExtprocConfig(endpoints=PODS, scorer_url=scorer_url, timeout_ms=10_000))
        try:
            # P1 followed by ~150 kB of text: still routed by its prefix; bytes > 127 too.
            prompt = prompt_text["P1"] + " Lieferung nach Zürich." * 6000
            body = completion_body(model, prompt, user="ü" * 10)
            assert len(body) > 2 * MAX_STREAMED_CHUNK
            async with EnvoyClient(f"127.0.0.1:{server.port}") as client:
                r = await client.route(
                    "/v1/completions",
                    body,
                    mode="FULL_DUPLEX_STREAMED",
                    chunk_size=16_384,
                    empty_last_chunk=empty_last_chunk,
                )
            assert r.endpoint == POD1
            assert r.body == body
            kinds = _kinds(r.responses)
            assert kinds[0] == "request_headers" and kinds[-1] == "response_headers"
            streamed = [x.request_body.response.body_mutation.streamed_response for x in r.responses[1:-1]]
            assert all(k == "request_body" for k in kinds[1:-1])
            assert len(streamed) == -(-len(body) // MAX_STREAMED_CHUNK)
            assert all(0 < len(s.body) <= MAX_STREAMED_CHUNK for s in streamed)
            assert [s.end_of_stream for s in streamed] == [False] * (len(streamed) - 1) + [True]
            assert b"".join(s.body for s in streamed) == body
        finally:
            await server.stop()

    run(scenario())


@pytest.mark.parametrize("mode", ["BUFFERED", "STREAMED", "FULL_DUPLEX_STREAMED"])
def test_bad_requests_get_400(mode: str, scorer_url: str, model: str) -> None:
    cases = {
        b"{not json": "not valid JSON",
        b"[1, 2]": "JSON object",
        json.dumps({"prompt": "hi"}).encode(): "missing 'model'",
        json.dumps({"model": "", "prompt": "hi"}).encode(): "missing 'model'",
        json.dumps({"model": model}).encode(): "missing 'prompt'",
        json.dumps({"model": model, "prompt": {"a": 1}}).encode(): "'prompt' must be",
        b"\xff\xfe": "not valid JSON",
    }

    async def scenario() -> None:
        server = await start_picker(ExtprocConfig(endpoints=PODS, scorer_url=scorer_url))
        try:
            async with EnvoyClient(f"127.0.0.1:{server.port}") as client:
                for body, message in cases.items():
                    r = await client.route("/v1/completions", body, mode=mode, chunk_size=3)
                    assert r.status == 400, body
                    assert r.endpoint is None
                    err = json.loads(r.immediate_body or b"")["error"]
                    assert message in err["message"]
                    imm = r.responses[-1].immediate_response
                    assert imm.headers.set_headers[0].header.raw_value == b"application/json"
                chat = json.dumps({"model": model, "messages": "hello"}).encode()
                r = await client.route("/v1/chat/completions", chat, mode=mode)
                assert r.status == 400
                r = await client.route(
                    "/v1/chat/completions",
                    json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(),
                    mode=mode,
                )
                assert r.status == 400
            assert server.picker.inflight() == {}
            assert server.picker.stats()["scorer_outcomes"] == {}
        finally:
            await server.stop()

    run(scenario())


def test_post_without_body_is_routed_and_oversized_is_413(scorer_url: str, model: str) -> None:
    async def scenario() -> None:
        server = await start_picker(ExtprocConfig(endpoints=PODS, scorer_url=scorer_url, max_body_bytes=4096))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                call = ep_grpc.ExternalProcessorStub(channel).Process(timeout=10)
                await call.write(
                    ep.ProcessingRequest(
                        request_headers=_hdrs({":path": "/v1/completions", ":method": "POST"}, eos=True)
                    )
                )
                resp = await _read(call)
                # GAIE routes a request without a body (on load and affinity here).
                (mutation,) = resp.request_headers.response.header_mutation.set_headers
                assert mutation.header.raw_value.decode() in PODS
                await call.done_writing()
            async with EnvoyClient(f"127.0.0.1:{server.port}") as client:
                big = completion_body(model, "x" * 5000)
                for mode in ("BUFFERED", "STREAMED", "FULL_DUPLEX_STREAMED"):
                    r = await client.route("/v1/completions", big, mode=mode, chunk_size=1000)
                    assert r.status == 413
                # Paths that are not scored are never buffered, so no size limit applies.
                r = await client.route("/v1/embeddings", big, mode="FULL_DUPLEX_STREAMED", chunk_size=1000)
                assert r.endpoint in PODS and r.body == big
        finally:
            await server.stop()

    run(scenario())


def test_no_endpoint_is_503(scorer_url: str, model: str, prompt_text: dict[str, str]) -> None:
    async def scenario() -> None:
        server = await start_picker(ExtprocConfig(endpoints=[], scorer_url=scorer_url))
        try:
            async with EnvoyClient(f"127.0.0.1:{server.port}") as client:
                for mode in ("BUFFERED", "FULL_DUPLEX_STREAMED"):
                    r = await client.route("/v1/completions", completion_body(model, prompt_text["P1"]), mode=mode)
                    assert r.status == 503
                r = await client.route("/health", b"")
                assert r.status == 503
                # A subset hint makes endpoints eligible even without configured ones.
                r = await client.route("/v1/completions", completion_body(model, prompt_text["P1"]), subset=PODS)
                assert r.endpoint == POD1
            assert server.picker.stats()["rejections"] == {503: 3}
        finally:
            await server.stop()

    run(scenario())


def test_shedding_429_when_every_endpoint_is_at_its_cap(
    scorer_url: str, model: str, prompt_text: dict[str, str]
) -> None:
    async def scenario() -> None:
        server = await start_picker(
            ExtprocConfig(endpoints=PODS, scorer_url=scorer_url, max_inflight=1, timeout_ms=5000)
        )
        try:
            async with EnvoyClient(f"127.0.0.1:{server.port}") as client:
                p1 = completion_body(model, prompt_text["P1"])
                first = await client.route("/v1/completions", p1, complete=False)
                second = await client.route("/v1/completions", p1, complete=False)
                # POD1 holds more of P1, but it is at its cap: POD2 takes the second one.
                assert (first.endpoint, second.endpoint) == (POD1, POD2)
                third = await client.route("/v1/completions", p1, mode="FULL_DUPLEX_STREAMED")
                assert third.status == 429
                assert json.loads(third.immediate_body or b"")["error"]["code"] == 429
                await first.finish()
                assert server.picker.inflight() == {POD2: 1}
                fourth = await client.route("/v1/completions", p1)
                assert fourth.endpoint == POD1
                await second.finish()
            assert server.picker.inflight() == {}
            assert server.picker.stats()["rejections"] == {429: 1}
        finally:
            await server.stop()

    run(scenario())


def test_header_values_in_value_field_are_accepted(scorer_url: str, model: str, prompt_text: dict[str, str]) -> None:
    """Older Envoys put values in ``value``; keys may arrive in any case."""

    async def scenario() -> None:
        server = await start_picker(ExtprocConfig(endpoints=PODS, scorer_url=scorer_url, timeout_ms=5000))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                call = ep_grpc.ExternalProcessorStub(channel).Process(timeout=10)
                headers = {":path": "/v1/completions", ":method": "POST", "X-Session-Id": "sess-42"}
                await call.write(
                    ep.ProcessingRequest(
                        request_headers=_hdrs(headers, raw=False),
                        protocol_config=ep.ProtocolConfiguration(request_body_mode=Mode.BUFFERED),
                    )
                )
                assert (await _read(call)).WhichOneof("response") == "request_headers"
                body = completion_body(model, prompt_text["P2"])
                await call.write(ep.ProcessingRequest(request_body=ep.HttpBody(body=body, end_of_stream=True)))
                answer = await _read(call)
                assert answer.request_body.response.header_mutation.set_headers[0].header.raw_value == POD2.encode()
                await call.done_writing()
                assert await call.read() is grpc.aio.EOF
            assert server.picker.session_endpoint("sess-42") == POD2
            assert server.picker.inflight() == {}
        finally:
            await server.stop()

    run(scenario())


def test_duplex_request_trailers_and_response_passthrough(
    scorer_url: str, model: str, prompt_text: dict[str, str]
) -> None:
    """A duplex request ending with trailers (body without end_of_stream), then a response
    whose body Envoy streams full-duplex too: both pass through unchanged, in order."""

    async def scenario() -> None:
        server = await start_picker(
            ExtprocConfig(endpoints=PODS, scorer_url=scorer_url, timeout_ms=5000, release_on="response_end")
        )
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                call = ep_grpc.ExternalProcessorStub(channel).Process(timeout=10)
                body = completion_body(model, prompt_text["P1"])
                await call.write(
                    ep.ProcessingRequest(
                        request_headers=_hdrs({":path": "/v1/completions", ":method": "POST"}),
                        protocol_config=ep.ProtocolConfiguration(
                            request_body_mode=Mode.FULL_DUPLEX_STREAMED, response_body_mode=Mode.FULL_DUPLEX_STREAMED
                        ),
                    )
                )
                half = len(body) // 2
                await call.write(ep.ProcessingRequest(request_body=ep.HttpBody(body=body[:half])))
                await call.write(ep.ProcessingRequest(request_body=ep.HttpBody(body=body[half:])))
                await call.write(ep.ProcessingRequest(request_trailers=ep.HttpTrailers()))
                answers = [await _read(call) for _ in range(3)]
                assert _kinds(answers) == ["request_headers", "request_body", "request_trailers"]
                assert (
                    answers[0].request_headers.response.header_mutation.set_headers[0].header.raw_value == POD1.encode()
                )
                sr = answers[1].request_body.response.body_mutation.streamed_response
                assert sr.body == body and not sr.end_of_stream
                assert server.picker.inflight() == {POD1: 1}

                await call.write(ep.ProcessingRequest(response_headers=_hdrs({":status": "200"})))
                assert (await _read(call)).WhichOneof("response") == "response_headers"
                # release_on=response_end: the request still counts while its body streams.
                assert server.picker.inflight() == {POD1: 1}
                await call.write(ep.ProcessingRequest(response_body=ep.HttpBody(body=b"data: 1\n\n")))
                echo = await _read(call)
                assert echo.response_body.response.body_mutation.streamed_response.body == b"data: 1\n\n"
                await call.write(ep.ProcessingRequest(response_body=ep.HttpBody(body=b"", end_of_stream=True)))
                last = await _read(call)
                assert last.response_body.response.body_mutation.streamed_response.end_of_stream
                assert server.picker.inflight() == {}
                await call.write(ep.ProcessingRequest(response_trailers=ep.HttpTrailers()))
                assert (await _read(call)).WhichOneof("response") == "response_trailers"
                await call.done_writing()
                assert await call.read() is grpc.aio.EOF
        finally:
            await server.stop()

    run(scenario())


def test_protocol_errors_map_to_invalid_argument(scorer_url: str) -> None:
    async def scenario() -> None:
        server = await start_picker(ExtprocConfig(endpoints=PODS, scorer_url=scorer_url))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = ep_grpc.ExternalProcessorStub(channel)
                call = stub.Process(timeout=10)
                await call.write(ep.ProcessingRequest(request_body=ep.HttpBody(body=b"{}", end_of_stream=True)))
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call.read()
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "before request_headers" in (err.value.details() or "")

                call = stub.Process(timeout=10)
                await call.write(
                    ep.ProcessingRequest(request_headers=_hdrs({":path": "/x", ":method": "GET"}, eos=True))
                )
                await _read(call)
                await call.write(
                    ep.ProcessingRequest(request_headers=_hdrs({":path": "/x", ":method": "GET"}, eos=True))
                )
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call.read()
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

                # A message with no request field (a newer Envoy's) is skipped, not fatal.
                call = stub.Process(timeout=10)
                await call.write(ep.ProcessingRequest())
                await call.write(
                    ep.ProcessingRequest(request_headers=_hdrs({":path": "/x", ":method": "GET"}, eos=True))
                )
                assert (await _read(call)).request_headers.response.clear_route_cache
                await call.done_writing()
                assert await call.read() is grpc.aio.EOF
            # The failed streams released what they held; the server still routes.
            assert server.picker.inflight() == {}
            assert server.stats.protocol_errors == 2
            assert server.stats.skipped_messages == 1
            async with EnvoyClient(f"127.0.0.1:{server.port}") as client:
                assert (await client.route("/v1/models", b"")).endpoint in PODS
        finally:
            await server.stop()

    run(scenario())


def test_inflight_returns_to_zero(scorer_url: str, model: str, prompt_text: dict[str, str]) -> None:
    async def scenario() -> None:
        server = await start_picker(ExtprocConfig(endpoints=PODS, scorer_url=scorer_url, timeout_ms=5000))
        picker = server.picker
        try:
            target = f"127.0.0.1:{server.port}"
            async with EnvoyClient(target) as client:
                body = completion_body(model, prompt_text["P1"])
                held = [
                    await client.route("/v1/completions", body, mode=m, complete=False)
                    for m in ("BUFFERED", "STREAMED", "FULL_DUPLEX_STREAMED")
                ]
                assert picker.total_inflight() == 3
                await held[0].finish()
                assert picker.total_inflight() == 2
                await held[1].cancel()  # Envoy aborts the stream (client went away)
                assert await wait_for(lambda: picker.total_inflight() == 1)
                await held[2].finish(response_body=b'{"choices": []}')
                assert picker.total_inflight() == 0

            # Streams still open when the whole channel goes away (Envoy restarts).
            other = EnvoyClient(target)
            for _ in range(4):
                await other.route("/v1/completions", body, mode="FULL_DUPLEX_STREAMED", complete=False)
            assert picker.total_inflight() == 4
            await other.close()
            assert await wait_for(lambda: picker.total_inflight() == 0)
            assert await wait_for(lambda: server.stats.active == 0)
            assert server.stats.cancelled >= 5
            assert picker.inflight() == {}
        finally:
            await server.stop()

    run(scenario())
