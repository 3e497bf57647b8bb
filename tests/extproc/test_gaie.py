"""What a gateway that deploys kvindex like GAIE's endpoint picker relies on (issue 17), through
the real gRPC server: candidates are the hint's known endpoints only; an endpoint that leaves
the set is never picked again; a stream without ``protocol_config`` is FULL_DUPLEX_STREAMED; a
request without a body is routed; gRPC health answers GAIE's service names on its own port.
The same, against a real kube-apiserver and an InferencePool, is in tests/k8s/test_gaie_picker.py."""

from __future__ import annotations

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvindex_service.extproc import EnvoyClient, ExtprocConfig, start_picker
from kvindex_service.extproc.health import HealthServer
from kvindex_service.extproc.responses import MAX_STREAMED_CHUNK
from tests.extproc.support import POD1, POD2, PODS, completion_body, run

STRANGER = "10.9.9.9:8000"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def health_of(port: int, service: str) -> int | str:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        except grpc.aio.AioRpcError as exc:
            return str(exc.code().name)
        return int(resp.status)


def test_subset_is_hint_and_known_endpoints() -> None:
    async def scenario() -> None:
        server = await start_picker(ExtprocConfig(endpoints=PODS))
        try:
            async with EnvoyClient(f"127.0.0.1:{server.port}") as client:
                # Only a stranger: 503, as GAIE answers (not routed to the stranger).
                r = await client.route("/v1/models", b"", subset=[STRANGER])
                assert r.status == 503 and r.endpoint is None
                # A known address on the wrong port is another endpoint.
                r = await client.route("/v1/models", b"", subset=["10.0.0.1:9999"])
                assert r.status == 503
                # Not IP:port: dropped, nothing eligible.
                r = await client.route("/v1/models", b"", subset=["pod-a:8000", "10.0.0.2"])
                assert r.status == 503
                # Mixed: only the member, every time.
                picks = {(await client.route("/v1/models", b"", subset=[STRANGER, POD2])).endpoint for _ in range(6)}
                assert picks == {POD2}
                assert server.stats.hint_dropped["not_configured"] == 2 + 6
        finally:
            await server.stop()

    run(scenario())


def test_an_endpoint_that_leaves_is_never_picked_again() -> None:
    async def scenario() -> None:
        server = await start_picker(ExtprocConfig(endpoints=PODS))
        try:
            async with EnvoyClient(f"127.0.0.1:{server.port}") as client:
                before = {(await client.route("/v1/models", b"")).endpoint for _ in range(4)}
                assert before == set(PODS)  # round-robin over ties reaches both
                # What the Kubernetes watch does when a pod is deleted: the set is replaced.
                server.endpoints.replace([POD1])
                after = {(await client.route("/v1/models", b"")).endpoint for _ in range(8)}
                assert after == {POD1}
                assert (await client.route("/v1/models", b"", subset=[POD2])).status == 503
                server.endpoints.replace([])
                assert (await client.route("/v1/models", b"")).status == 503
        finally:
            await server.stop()

    run(scenario())


def test_stream_without_protocol_config_is_full_duplex(model: str) -> None:
    body = completion_body(model, "word " * 30_000)  # several 62,000-byte echo chunks
    assert len(body) > 2 * MAX_STREAMED_CHUNK

    async def scenario() -> None:
        server = await start_picker(ExtprocConfig(endpoints=PODS))
        try:
            async with EnvoyClient(f"127.0.0.1:{server.port}") as client:
                r = await client.route(
                    "/v1/completions", body, mode="FULL_DUPLEX_STREAMED", protocol_config=False, chunk_size=50_000
                )
                assert r.status is None and r.endpoint in PODS
                kinds = [x.WhichOneof("response") for x in r.responses]
                assert kinds[0] == "request_headers"  # the pick rides on the headers answer
                assert r.body == body  # echoed byte for byte
                sizes = [
                    len(x.request_body.response.body_mutation.streamed_response.body)
                    for x in r.responses
                    if x.WhichOneof("response") == "request_body"
                ]
                assert max(sizes) <= MAX_STREAMED_CHUNK
        finally:
            await server.stop()
        # The old reading stays available: BUFFERED when configured so.
        server = await start_picker(ExtprocConfig(endpoints=PODS, assume_full_duplex=False))
        try:
            async with EnvoyClient(f"127.0.0.1:{server.port}") as client:
                r = await client.route("/v1/completions", body[:2000], mode="BUFFERED", protocol_config=False)
                # BUFFERED: the headers get CONTINUE, the (here truncated, so 400) body the answer
                assert r.responses[0].WhichOneof("response") == "request_headers"
                assert not r.responses[0].request_headers.response.HasField("header_mutation")
        finally:
            await server.stop()

    run(scenario())


def test_request_without_body_is_routed() -> None:
    async def scenario() -> None:
        server = await start_picker(ExtprocConfig(endpoints=PODS))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = ep_grpc.ExternalProcessorStub(channel)
                for path in ("/v1/completions", "/v1/chat/completions"):
                    call = stub.Process(timeout=10)
                    headers = ep.HttpHeaders(end_of_stream=True)
                    for key, value in ((":path", path), (":method", "POST")):
                        headers.headers.headers.add(key=key, raw_value=value.encode())
                    await call.write(ep.ProcessingRequest(request_headers=headers))
                    resp = await call.read()
                    (mutation,) = resp.request_headers.response.header_mutation.set_headers
                    assert mutation.header.raw_value.decode() in PODS
                    await call.done_writing()
                    assert await call.read() is grpc.aio.EOF
                # Full duplex with only an empty last chunk: routed too.
                call = stub.Process(timeout=10)
                headers = ep.HttpHeaders()
                for key, value in ((":path", "/v1/completions"), (":method", "POST")):
                    headers.headers.headers.add(key=key, raw_value=value.encode())
                await call.write(ep.ProcessingRequest(request_headers=headers))
                await call.write(ep.ProcessingRequest(request_body=ep.HttpBody(body=b"", end_of_stream=True)))
                resp = await call.read()
                assert resp.WhichOneof("response") == "request_headers"
                assert resp.request_headers.response.header_mutation.set_headers[0].header.raw_value.decode() in PODS
                echo = await call.read()
                assert echo.request_body.response.body_mutation.streamed_response.end_of_stream
                await call.done_writing()
            assert server.picker.scorer_outcomes["unscored"] >= 3
        finally:
            await server.stop()

    run(scenario())


def test_health_port_answers_gaie_service_names(scorer_url: str, closed_url: str) -> None:
    async def scenario() -> None:
        server = await start_picker(ExtprocConfig(endpoints=PODS, scorer_url=scorer_url), health_port=0)
        try:
            assert server.health_port not in (None, 0, server.port)
            port = server.health_port
            assert port is not None
            for name in ("liveness", "readiness", "inference-extension", ""):
                assert await health_of(port, name) == SERVING, name
            assert await health_of(port, "no-such-service") == "NOT_FOUND"
        finally:
            await server.stop()
        # The scorer does not answer: not ready (alive all the same) ...
        server = await start_picker(ExtprocConfig(endpoints=PODS, scorer_url=closed_url), health_port=0)
        try:
            port = server.health_port
            assert port is not None
            assert await health_of(port, "liveness") == SERVING
            assert await health_of(port, "readiness") == NOT_SERVING
            assert await health_of(port, "inference-extension") == NOT_SERVING
        finally:
            await server.stop()
        # ... unless readiness is told not to wait for it.
        config = ExtprocConfig(endpoints=PODS, scorer_url=closed_url, ready_without_scorer=True)
        server = await start_picker(config, health_port=0)
        try:
            port = server.health_port
            assert port is not None
            assert await health_of(port, "readiness") == SERVING
        finally:
            await server.stop()

    run(scenario())


def test_readiness_waits_for_the_endpoints() -> None:
    known = False

    async def scenario() -> None:
        nonlocal known
        health = HealthServer(lambda: known, None, interval=0.05)
        port = await health.start("127.0.0.1", 0)
        try:
            assert await health_of(port, "readiness") == NOT_SERVING
            assert await health_of(port, "liveness") == SERVING
            known = True
            assert await health.check()
            assert await health_of(port, "inference-extension") == SERVING
        finally:
            await health.stop()

    run(scenario())
