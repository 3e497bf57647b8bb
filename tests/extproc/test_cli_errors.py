"""``kvindex extproc`` as a real process: every unusable flag, config file or port ends it
with one line naming the problem and the value, exit code 2, and no traceback; a picker
without a scorer says so once at start."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.extproc.certs import Certs

ROOT = Path(__file__).parents[2]
CODE = "import sys; from kvindex_service.cli import main; sys.exit(main(['extproc', *sys.argv[1:]]))"


def _extproc(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CODE, "--health-port", "0", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def _assert_clean_failure(result: subprocess.CompletedProcess[str], *expected: str) -> str:
    err = result.stderr
    assert result.returncode == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) <= 5, err
    error_lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(error_lines) == 1, err
    for text in expected:
        assert text in error_lines[0], err
    return error_lines[0]


@pytest.fixture
def listener() -> Iterator[int]:
    """A port some other process is listening on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


BAD_FLAGS = [
    (["--port", "70000"], ["--port", "70000"]),
    (["--port", "-1"], ["--port", "-1"]),
    (["--port", "http"], ["--port", "'http'"]),
    (["--metrics-port", "65536"], ["--metrics-port", "65536"]),
    (["--endpoint", "pod-a:8000"], ["--endpoint", "pod-a:8000"]),
    (["--endpoint", "10.0.0.1:99999"], ["--endpoint", "99999"]),
    (["--scorer-url", "ftp://scorer"], ["--scorer-url", "ftp://scorer"]),
    (["--timeout-ms", "0"], ["--timeout-ms", "0"]),
    (["--max-inflight", "0"], ["--max-inflight", "0"]),
    (["--kv-weight", "-1"], ["--kv-weight", "-1"]),
    (["--release-on", "never"], ["--release-on", "never"]),
    (["--grace", "soon"], ["--grace", "soon"]),
    (["--log-level", "loud"], ["--log-level", "LOUD"]),
    (["--tls-cert", "/nonexistent/cert.pem"], ["--tls-cert", "/nonexistent/cert.pem", "--tls-key"]),
    (["--tls-cert", "/nonexistent/c.pem", "--tls-key", "/nonexistent/k.pem"], ["--tls-cert", "/nonexistent/c.pem"]),
    (
        ["--scorer-url", "https://s:1", "--scorer-token-file", "/nonexistent/t"],
        ["--scorer-token-file", "/nonexistent/t"],
    ),
    (["--config", "/nonexistent/picker.yaml"], ["--config", "/nonexistent/picker.yaml"]),
    (["--health-port", "70000"], ["--health-port", "70000"]),
    (["--endpoint-selector", "app=vllm"], ["--endpoint-selector", "--endpoint-target-ports"]),
    (["--endpoint-target-ports", "8000,x"], ["--endpoint-target-ports", "'x'"]),
    (["--pool-name", "p", "--endpoint-selector", "app=x"], ["--pool-name", "--endpoint-selector"]),
    (["--pool-name", "p", "--endpoint", "10.0.0.1:8000"], ["--endpoint", "not with a pool"]),
    (["--pool-name", "p", "--kubeconfig", "/nonexistent/kubeconfig"], ["no Kubernetes configuration", "/nonexistent"]),
]


@pytest.mark.parametrize("args,expected", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flag_is_one_line(args: list[str], expected: list[str]) -> None:
    _assert_clean_failure(_extproc("--port", "0", *args) if args[0] != "--port" else _extproc(*args), *expected)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("extproc:\n  endpoints: [10.0.0.1:8000\n", ["not valid YAML", "line 3"]),
        ("extproc:\n  timout_ms: 5\n", ["timout_ms", "unknown setting"]),
        ("extproc:\n  weights: 3\n", ["weights", "3"]),
        ("- a\n- b\n", ["top level must be a mapping"]),
        ("extproc:\n  metrics_port: 70000\n", ["metrics_port", "70000"]),
        ("extproc:\n  scorer_url: http://s:1\n  scorer_ca_file: /ca.pem\n", ["https://", "http://s:1"]),
    ],
)
def test_bad_config_file_is_one_line(tmp_path: Path, text: str, expected: list[str]) -> None:
    conf = tmp_path / "picker.yaml"
    conf.write_text(text)
    _assert_clean_failure(_extproc("--port", "0", "--config", str(conf)), *expected)


def test_taken_ports_are_one_line(listener: int) -> None:
    _assert_clean_failure(_extproc("--host", "127.0.0.1", "--port", str(listener)), f"127.0.0.1:{listener}", "in use")
    _assert_clean_failure(
        _extproc("--host", "127.0.0.1", "--port", "0", "--metrics-host", "127.0.0.1", "--metrics-port", str(listener)),
        f"127.0.0.1:{listener}",
        "metrics",
    )


def test_tls_key_not_matching_the_certificate_is_one_line(certs: Certs) -> None:
    line = _assert_clean_failure(
        _extproc("--port", "0", "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.client_key)),
        "--tls-cert",
        str(certs.server_cert),
    )
    assert "unusable" in line


def _start_until_ready(*args: str) -> tuple[subprocess.Popen[str], list[str]]:
    """Run the picker until it logs ``picker ready``; return the process and its stderr lines."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CODE, "--host", "127.0.0.1", "--port", "0", "--health-port", "0", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    assert proc.stderr is not None
    lines: list[str] = []
    for line in proc.stderr:
        lines.append(line)
        if "picker ready" in line:
            return proc, lines
    proc.wait(30)
    pytest.fail(f"picker exited ({proc.returncode}) before it was ready: {''.join(lines)}")


def test_no_scorer_warns_once_at_start() -> None:
    proc, lines = _start_until_ready("--endpoint", "10.0.0.1:8000")
    try:
        warnings = [line for line in lines if "without KV-cache scores" in line]
        assert len(warnings) == 1 and "WARNING" in warnings[0] and "--scorer-url" in warnings[0]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0

    proc, lines = _start_until_ready("--endpoint", "10.0.0.1:8000", "--scorer-url", "http://127.0.0.1:9")
    try:
        assert not [line for line in lines if "without KV-cache scores" in line]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0
