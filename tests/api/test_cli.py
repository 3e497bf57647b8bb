"""``kvindex`` as a real subprocess: serve on ephemeral ports, answer, stop on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import zmq

from kvindex_service.cli import main
from tests.conftest import reap

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVINDEX_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def _wait_line(proc: subprocess.Popen[str], pattern: str, lines: list[str], timeout: float = 60.0) -> re.Match[str]:
    """Read stderr lines until one matches (the process logs to stderr)."""
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        lines.append(line)
        m = re.search(pattern, line)
        if m:
            return m
    raise AssertionError(f"no line matching {pattern!r}; got:\n{''.join(lines)}")


def test_serve_answers_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    cfg = tmp_path / "kvindex.yaml"
    cfg.write_text("index: {block_size: 32}\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvindex_service", "serve", "--config", str(cfg), "--host", "127.0.0.1",
         "--port", "0", "--zmq-bind", "tcp://127.0.0.1:*", "--hash-seed", "42", "--log-json"],
        env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: list[str] = []
    try:
        # The runtime starts (and logs its ZMQ endpoint) before HTTP is served.
        zmq_bind = _wait_line(proc, r'"zmq_bind":"(tcp://127\.0\.0\.1:\d+)"', lines).group(1)
        url = _wait_line(proc, r'"http":"(http://127\.0\.0\.1:\d+)"', lines).group(1)
        with httpx.Client(base_url=url, timeout=10.0) as c:
            deadline = time.monotonic() + 30
            while c.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert c.get("/healthz").json() == {"status": "ok"}
            r = c.post("/score", json={"model": "m", "token_ids": list(range(70))}, headers={"x-request-id": "cli-1"})
            assert r.status_code == 200
            assert r.json()["block_size"] == 32  # from the YAML file
            assert r.json()["total_blocks"] == 2
        # The ZMQ endpoint it logged is really bound.
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        try:
            pub = ctx.socket(zmq.XPUB)
            pub.connect(zmq_bind)
            assert pub.poll(10_000, zmq.POLLIN), "the service's SUB never subscribed"
            pub.close(linger=0)
        finally:
            ctx.term()
        access = _wait_line(proc, r'"request_id":"cli-1"', lines)
        assert '"status":200' in access.string and '"route":"/score"' in access.string
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        rest = proc.stderr.read() if proc.stderr else ""
        assert "runtime stopped" in "".join(lines) + rest
        assert "Traceback" not in "".join(lines) + rest
    finally:
        reap(proc)


def test_serve_reports_a_bad_configuration(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "kvindex_service", "serve", "--block-size", "0"],
        env=_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2
    assert "invalid configuration" in r.stderr and "block_size" in r.stderr


def test_help_and_dispatch(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "serve" in out and "extproc" in out and "simulate" in out
    assert main([]) == 0
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "--zmq-bind" in capsys.readouterr().out


def test_delegated_commands_get_their_own_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    # Both teammates' CLIs take argv and return an exit status; --help exits 0 through argparse.
    for command in ("extproc", "simulate"):
        try:
            code = main([command, "--help"])
        except SystemExit as exc:
            code = int(exc.code or 0)
        assert code == 0, command
        assert "usage" in capsys.readouterr().out.lower()
