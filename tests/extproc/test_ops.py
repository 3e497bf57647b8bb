"""Operations: Prometheus exporter, gRPC health, the CLI as a real process, configuration
and body parsing edge cases."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError

from kvindex_service.extproc import BadRequest, EnvoyClient, ExtprocConfig, parse_body, start_picker
from kvindex_service.extproc.cli import build_config, build_parser, main
from tests.extproc.support import POD1, PODS, completion_body, free_port, run


def _metric(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{line_start} not exported")


def test_metrics_exporter_and_health(scorer_url: str, model: str, prompt_text: dict[str, str]) -> None:
    port = free_port()

    async def scenario() -> None:
        config = ExtprocConfig(
            endpoints=PODS, scorer_url=scorer_url, timeout_ms=5000, metrics_port=port, metrics_host="127.0.0.1"
        )
        server = await start_picker(config)
        try:
            assert server.metrics_port == port
            async with EnvoyClient(f"127.0.0.1:{server.port}") as client:
                await client.route("/v1/completions", completion_body(model, prompt_text["P1"]))
                held = await client.route("/v1/completions", completion_body(model, prompt_text["P1"]), complete=False)
                await client.route("/v1/completions", b"{oops")
                async with httpx.AsyncClient() as http:
                    text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
                assert _metric(text, 'kvindex_extproc_decisions_total{reason="kv"}') == 2
                assert _metric(text, 'kvindex_extproc_scorer_requests_total{outcome="ok"}') == 2
                assert _metric(text, 'kvindex_extproc_immediate_responses_total{status="400"}') == 1
                assert _metric(text, f'kvindex_extproc_inflight_requests{{endpoint="{POD1}"}}') == 1
                assert _metric(text, 'kvindex_extproc_inflight_requests{endpoint="10.0.0.2:8000"}') == 0
                assert _metric(text, "kvindex_extproc_pick_duration_seconds_count") == 2
                assert _metric(text, "kvindex_extproc_scorer_duration_seconds_count") == 2
                assert _metric(text, "kvindex_extproc_fail_open_total") == 0
                await held.finish()

            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                for service in ("", "envoy.service.ext_proc.v3.ExternalProcessor"):
                    resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                    assert resp.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            await server.stop()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)

    run(scenario())


def test_two_pickers_have_separate_registries() -> None:
    async def scenario() -> None:
        a = await start_picker(ExtprocConfig(endpoints=PODS))
        b = await start_picker(ExtprocConfig(endpoints=PODS))
        try:
            async with EnvoyClient(f"127.0.0.1:{a.port}") as client:
                await client.route("/v1/models", b"")
            assert b'kvindex_extproc_decisions_total{reason="round_robin"} 1.0' in a.metrics.render()
            assert b"kvindex_extproc_decisions_total{" not in b.metrics.render()
        finally:
            await a.stop()
            await b.stop()

    run(scenario())


def test_cli_serves_until_sigterm(scorer_url: str, model: str, prompt_text: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    conf = tmp_path / "picker.yaml"
    conf.write_text("extproc:\n  timeout_ms: 5000\n  weights: {load: 0.5}\n")
    code = "import sys; from kvindex_service.extproc.cli import main; sys.exit(main(sys.argv[1:]))"
    args = [sys.executable, "-c", code, "--config", str(conf), "--host", "127.0.0.1", "--port", str(port),
            "--health-port", "0", "--scorer-url", scorer_url, "--endpoint", PODS[0], "--endpoint", PODS[1], "--log-level", "WARNING"]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=Path(__file__).parents[2]
    )
    try:

        async def scenario() -> str | None:
            deadline = time.monotonic() + 30
            async with EnvoyClient(f"127.0.0.1:{port}") as client:
                while True:
                    try:
                        r = await client.route("/v1/completions", completion_body(model, prompt_text["P1"]), timeout=5)
                        return r.endpoint
                    except grpc.aio.AioRpcError:
                        if time.monotonic() > deadline or proc.poll() is not None:
                            raise
                        await _sleep(0.1)

        assert run(scenario()) == POD1
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err.decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


def test_cli_rejects_bad_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--endpoint", "pod-a:8000"]) == 2
    assert "'pod-a' is not an IPv4 address" in capsys.readouterr().err
    assert main(["--scorer-url", "ftp://x"]) == 2
    args = build_parser().parse_args(
        [
            "--endpoint",
            "10.0.0.1:8000",
            "--endpoint",
            "[fd00::1]:8000",
            "--max-inflight",
            "8",
            "--kv-weight",
            "2",
            "--session-header",
            "X-User",
            "--release-on",
            "response_end",
        ]
    )
    config = build_config(args)
    assert config.endpoints == ["10.0.0.1:8000", "[fd00::1]:8000"]
    assert config.metrics_host == "0.0.0.0" and config.tls_cert is None and config.scorer_token_file is None
    assert config.max_inflight == 8 and config.weights.kv == 2.0 and config.weights.load == 0.1
    assert config.session_header == "x-user" and config.release_on == "response_end"


def test_config_validation() -> None:
    for bad in (
        ["10.0.0.1"],
        ["10.0.0.1:0"],
        ["10.0.0.1:70000"],
        ["host:80"],
        ["[::1:80"],
        ["fd00::1:80"],
        ["0.0.0.0:80"],
    ):
        with pytest.raises(ValidationError):
            ExtprocConfig(endpoints=bad)
    assert ExtprocConfig(endpoints=[" 10.0.0.1:80", "10.0.0.1:80"]).endpoints == ["10.0.0.1:80"]
    with pytest.raises(ValidationError):
        ExtprocConfig(timeout_ms=0)
    with pytest.raises(ValidationError):
        ExtprocConfig(unknown_field=1)  # type: ignore[call-arg]
    assert ExtprocConfig(scorer_url="http://scorer:8080/").scorer_url == "http://scorer:8080"


def test_parse_body_forms() -> None:
    q = parse_body("/v1/completions", b'{"model": "m", "prompt": ["first", "second"]}')
    assert (q.model, q.prompt, q.token_ids) == ("m", "first", None)
    q = parse_body("/v1/completions?stream=true", b'{"model": "m", "prompt": [[1, 2], [3]]}')
    assert q.token_ids == [1, 2]
    q = parse_body("/v1/completions", b'{"model": "m", "prompt": [5, 6, 7], "cache_salt": "tenant-a"}')
    assert q.token_ids == [5, 6, 7] and q.cache_salt == "tenant-a"
    q = parse_body(
        "/v1/chat/completions",
        b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": false, "stream": true}',
    )
    assert q.messages == [{"role": "user", "content": "hi"}]
    assert q.chat_options == {"add_generation_prompt": False}
    for body in (b'{"model": "m", "prompt": []}', b'{"model": "m", "prompt": [1, "a"]}', b'{"model": "m", "prompt": [true]}',
                 b'{"model": "m", "prompt": [-1]}', b'{"model": 5, "prompt": "x"}', b"", b"null",
                 b'{"model": "m", "prompt": "x", "cache_salt": 1}'):  # fmt: skip
        with pytest.raises(BadRequest):
            parse_body("/v1/completions", body)
    with pytest.raises(BadRequest):
        parse_body("/v1/chat/completions", b'{"model": "m", "messages": ["hi"]}')
