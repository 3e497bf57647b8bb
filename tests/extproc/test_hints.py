"""Envoy's subset hint is checked before it can name a routing target: only ``IP:port``
entries, and only configured endpoints when ``--endpoint``s are given. Through the real gRPC
server with the real grpc.aio client."""

from __future__ import annotations

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from google.protobuf import struct_pb2

from kvindex_service.extproc import EnvoyClient, ExtprocConfig, start_picker
from kvindex_service.extproc.hints import SubsetHintFilter, canonical_endpoint
from tests.extproc.support import POD1, POD2, PODS, run

METADATA_IP = "169.254.169.254:80"


def _dropped(text: bytes, reason: str) -> float:
    prefix = f'kvindex_extproc_subset_hint_dropped_total{{reason="{reason}"}} '.encode()
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


def test_hint_outside_the_configured_endpoints_is_dropped() -> None:
    async def scenario() -> None:
        server = await start_picker(ExtprocConfig(endpoints=PODS))
        try:
            async with EnvoyClient(f"127.0.0.1:{server.port}") as client:
                # The probe: a hint naming the cloud metadata address.
                r = await client.route("/v1/models", b"", subset=[METADATA_IP])
                assert (r.status, r.endpoint) == (503, None)
                r = await client.route("/v1/models", b"", subset=[METADATA_IP, POD2])
                assert r.endpoint == POD2
                junk = ["pod-a:8000", "10.0.0.1", "10.0.0.1:0", "10.0.0.1:65536", "fd00::1:8000", "10.0.0.1:８０"]
                r = await client.route("/v1/models", b"", subset=[*junk, "0.0.0.0:8000", "224.0.0.1:8000"])
                assert r.status == 503
                # A configured endpoint however the hint spells it: the configured form is routed to.
                r = await client.route("/v1/models", b"", subset=["  10.0.0.1:08000 "])
                assert r.endpoint == POD1
            text = server.metrics.render()
            assert _dropped(text, "not_configured") == 2
            assert _dropped(text, "malformed") == 6
            assert _dropped(text, "not_unicast") == 2
            assert server.picker.stats()["rejections"] == {503: 2}
        finally:
            await server.stop()

    run(scenario())


def test_hint_without_configured_endpoints_needs_ip_port() -> None:
    async def scenario() -> None:
        server = await start_picker(ExtprocConfig(endpoints=[], max_subset=3))
        try:
            async with EnvoyClient(f"127.0.0.1:{server.port}") as client:
                r = await client.route("/v1/models", b"", subset=["[fd00:0::1]:8000"])
                assert r.endpoint == "[fd00::1]:8000"  # canonical form in the header
                r = await client.route("/v1/models", b"", subset=["[fd00::1%eth0]:8000", "[fd00::1]", "[::]:80"])
                assert r.status == 503
                r = await client.route("/v1/models", b"", subset=["x", "y", POD1, POD2])  # POD2 is past max_subset
                assert r.endpoint == POD1
            text = server.metrics.render()
            assert _dropped(text, "over_limit") == 1
            assert _dropped(text, "malformed") == 4
            assert _dropped(text, "not_unicast") == 1
        finally:
            await server.stop()

    run(scenario())


def test_non_string_hint_entries_are_dropped() -> None:
    """Entries that are not strings (a control plane sending numbers, a nested struct)."""

    async def scenario() -> None:
        server = await start_picker(ExtprocConfig(endpoints=PODS))
        try:
            hint = struct_pb2.Struct()
            hint.update({"x-gateway-destination-endpoint-subset": [8000, {"ip": "10.0.0.1"}, POD2]})
            req = ep.ProcessingRequest(
                request_headers=ep.HttpHeaders(end_of_stream=True),
            )
            req.request_headers.headers.headers.add(key=":path", raw_value=b"/v1/models")
            req.request_headers.headers.headers.add(key=":method", raw_value=b"GET")
            req.metadata_context.filter_metadata["envoy.lb.subset_hint"].CopyFrom(hint)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                call = ep_grpc.ExternalProcessorStub(channel).Process()
                await call.write(req)
                resp = await call.read()
                await call.done_writing()
            header = resp.request_headers.response.header_mutation.set_headers[0].header
            assert header.raw_value == POD2.encode()
            assert _dropped(server.metrics.render(), "malformed") == 2
        finally:
            await server.stop()

    run(scenario())


def test_filter_and_canonical_forms() -> None:
    f = SubsetHintFilter(["10.0.0.1:8000", "[fd00::1]:80"], limit=10)
    assert f.filter(["[FD00:0:0::1]:80", "10.0.0.1:8000", "10.0.0.1:8000", None]) == ["[fd00::1]:80", POD1]
    assert f.dropped == {"malformed": 1}
    assert canonical_endpoint(" [FD00:0::1]:0080") == "[fd00::1]:80"
    for bad in ("10.0.0.1:", ":80", "[fd00::1]80", "010.0.0.1:80", "10.0.0.1:-1", "255.255.255.255:80"):
        with pytest.raises(ValueError):
            canonical_endpoint(bad)
