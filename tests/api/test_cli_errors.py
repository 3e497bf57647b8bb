"""``kvindex`` as a real subprocess: every bad flag, port, config file or component is one
short line on stderr with exit status 2 and no traceback; ``--version``; HTTPS with a
certificate made for this run; a missing bundled tokenizer is named in its 404."""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

import kvindex_service.tokenization as tokenization
from kvindex_service.api import create_app
from kvindex_service.runtime import LLAMA32_PACKAGE
from tests.api.helpers import MODEL, make_settings
from tests.conftest import reap

ROOT = Path(__file__).resolve().parents[2]
SERVE = [sys.executable, "-m", "kvindex_service", "serve"]
LOOPBACK = ["--host", "127.0.0.1", "--port", "0", "--zmq-bind", "tcp://127.0.0.1:*"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVINDEX_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SERVE, *args], env=_env(), capture_output=True, text=True, timeout=60)


def _assert_clean_failure(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 5, r.stderr
    for needle in needles:
        assert needle in r.stderr, (needle, r.stderr)


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_bad_flags_and_values(tmp_path: Path) -> None:
    _assert_clean_failure(_run("--hash-algo", "foo", *LOOPBACK), "unknown hash algorithm", '"foo"')
    _assert_clean_failure(_run("--port", "70000"), "--port", "70000")
    _assert_clean_failure(_run("--port", "eighty"), "--port", "eighty")
    _assert_clean_failure(_run("--block-size", "0"), "index.block_size", "got 0")
    _assert_clean_failure(_run("--log-level", "loud"), "log.level", "loud")
    _assert_clean_failure(_run("--no-such-flag"), "--no-such-flag")
    _assert_clean_failure(_run("--tls-cert", str(tmp_path / "c.pem")), "tls_cert and tls_key")
    _assert_clean_failure(
        _run("--tls-cert", str(tmp_path / "c.pem"), "--tls-key", str(tmp_path / "k.pem")), "c.pem", "No such file"
    )
    _assert_clean_failure(_run("--auth-token-file", str(tmp_path / "none")), "none", "No such file")
    (tmp_path / "empty").write_text("\n")
    _assert_clean_failure(_run("--auth-token-file", str(tmp_path / "empty")), "empty")


def test_bad_config_files(tmp_path: Path) -> None:
    _assert_clean_failure(_run("--config", str(tmp_path / "missing.yaml")), "missing.yaml", "No such file")
    bad = tmp_path / "bad.yaml"
    bad.write_text("index:\n  block_size: [1, 2\n")
    _assert_clean_failure(_run("--config", str(bad)), "bad.yaml", "not valid YAML", "line")
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("index: {block_sise: 16}\n")
    _assert_clean_failure(_run("--config", str(wrong)), "index.block_sise")


def test_taken_ports(taken_port: int) -> None:
    r = _run("--host", "127.0.0.1", "--port", str(taken_port), "--zmq-bind", "none")
    _assert_clean_failure(r, f"127.0.0.1:{taken_port}", "in use")
    r = _run("--host", "127.0.0.1", "--port", "0", "--zmq-bind", f"tcp://127.0.0.1:{taken_port}")
    _assert_clean_failure(r, "cannot start")


def test_an_explicit_tokenizer_that_cannot_load_stops_serve(tmp_path: Path) -> None:
    _assert_clean_failure(_run("--tokenizer", f"my/model={tmp_path / 'nope'}", *LOOPBACK), "my/model", "nope")
    broken = tmp_path / "tokenizer.json"
    broken.write_text("{not json")
    _assert_clean_failure(_run("--tokenizer", f"my/model={broken}", *LOOPBACK), "tokenizer.json")


def test_version() -> None:
    from importlib.metadata import version

    r = subprocess.run([sys.executable, "-m", "kvindex_service", "--version"], env=_env(), capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0 and r.stdout.strip() == f"kvindex {version('kvindex')}"


def test_missing_bundled_tokenizer_warns_and_its_404_names_the_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(tokenization, "find_llama3_tokenizer_dir", lambda: None)
    settings = make_settings(zmq={"bind": "none"}, tokenizers={"hf_cache": str(tmp_path)})
    with caplog.at_level("WARNING"), TestClient(create_app(settings)) as c:
        assert any(LLAMA32_PACKAGE in rec.getMessage() for rec in caplog.records)
        assert c.get("/readyz").status_code == 200  # only a warning: token ids still score
        r = c.post("/score", json={"model": MODEL, "prompt": "hello"})
        assert r.status_code == 404 and f"pip install {LLAMA32_PACKAGE}" in r.json()["error"]["message"]
        assert c.post("/score", json={"model": MODEL, "token_ids": [1, 2, 3]}).status_code == 200


def _self_signed(d: Path) -> tuple[Path, Path]:
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    return cert, key


def test_serve_speaks_https_with_tls_cert_and_key(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    token = tmp_path / "token"
    token.write_text("tok-123\n")
    proc = subprocess.Popen(
        [*SERVE, *LOOPBACK, "--zmq-bind", "none", "--tls-cert", str(cert), "--tls-key", str(key),
         "--auth-token-file", str(token), "--log-json"],
        env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        url = None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            m = re.search(r'"http":"(https://127\.0\.0\.1:\d+)"', line)
            url = m.group(1) if m else None
            assert line or proc.poll() is None, "serve exited"
        assert url is not None
        ctx = ssl.create_default_context(cafile=str(cert))
        with httpx.Client(base_url=url, verify=ctx, timeout=30) as c:
            while c.get("/readyz").status_code != 200:
                time.sleep(0.05)
            assert c.get("/healthz").json() == {"status": "ok"}
            body = {"model": MODEL, "token_ids": list(range(40))}
            assert c.post("/score", json=body).status_code == 401
            r = c.post("/score", json=body, headers={"Authorization": "Bearer tok-123"})
            assert r.status_code == 200 and r.json()["total_blocks"] == 2
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port
            httpx.get(url.replace("https://", "http://") + "/healthz", timeout=5)
        with pytest.raises(httpx.ConnectError):  # the certificate is not trusted by default
            httpx.get(url + "/healthz", timeout=5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        reap(proc)
