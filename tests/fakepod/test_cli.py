"""``kvindex fake-pod`` as a real process: starts, publishes, stops; bad flags are one line."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import reap
from tests.fakepod.support import MODEL, ROOT, Service, clean_env, prompt_text, wait_for

_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvindex_service", "fake-pod", *args],
        env=clean_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _help_flags() -> set[str]:
    out = _run("--help")
    assert out.returncode == 0
    return set(_FLAG.findall(out.stdout)) - {"--help"}


@pytest.fixture(scope="module")
def taken_port() -> object:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    yield s.getsockname()[1]
    s.close()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--port", "70000"], "out of range"),
        (["--port", "http"], "not a port number"),
        (["--capacity", "0"], "--capacity"),
        (["--block-size", "x"], "--block-size"),
        (["--vllm-format", "0.99"], "--vllm-format"),
        (["--tokenizer", "no-equals-sign"], "MODEL=VALUE"),
        (["--host", "0.0.0.0"], "--pod-id"),
        (["--pod-id", "a@b", "--port", "0"], "without '@'"),
        (["--port", "0", "--model", "acme/no-such-model"], "acme/no-such-model"),
        (["--port", "0", "--zmq-endpoint", "nonsense://x"], "cannot open ZMQ endpoint"),
        (["--unknown-flag"], "unrecognized arguments"),
    ],
)
def test_bad_flags_exit_2_with_one_line(args: list[str], needle: str) -> None:
    r = _run(*args)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip() and "loaded tokenizer" not in line]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("kvindex fake-pod: error:") and needle in lines[0]
    assert "Traceback" not in r.stderr


def test_a_taken_port_is_one_line(taken_port: int) -> None:
    r = _run("--port", str(taken_port), "--zmq-endpoint", "tcp://127.0.0.1:*")
    assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{taken_port}" in r.stderr
    assert "Traceback" not in r.stderr


def test_the_process_serves_publishes_to_serve_and_stops_on_sigterm() -> None:
    service = Service()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvindex_service", "fake-pod", "--port", "0", "--zmq-endpoint", service.zmq,
         "--replay-endpoint", "tcp://127.0.0.1:*", "--vllm-format", "array", "--log-json"],
        env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        ready: dict[str, str] = {}
        for line in proc.stderr:
            record = json.loads(line)
            if record["msg"] == "fake pod ready":
                ready = record
                break
        assert ready, "no ready line"
        assert ready["zmq_mode"] == "connect" and ready["vllm_format"] == "0.23"
        assert ready["pod_id"] == ready["http"].removeprefix("http://")
        with httpx.Client(base_url=ready["http"], timeout=30) as c:
            wait_for(lambda: c.get("/health").json()["subscribed"], "subscription")
            prompt = prompt_text("process")
            r = c.post("/v1/completions", json={"model": MODEL, "prompt": prompt})
            assert r.status_code == 200
        wait_for(lambda: (service.pod(ready["pod_id"]) or {}).get("events_applied"), "events applied")
        assert service.score(prompt=prompt)["best_pod"] == ready["pod_id"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        reap(proc)
        service.close()


def _documented_uses() -> list[str]:
    """The rest of every ``kvindex fake-pod ...`` line in the README and the docs."""
    uses = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8").replace("\\\n", " ")
        uses += [m.group(1) for m in re.finditer(r"\bkvindex fake-pod\b([^\n`]*)", text)]
    return uses


def test_every_flag_is_documented_and_every_documented_flag_exists() -> None:
    flags = _help_flags()
    assert {"--host", "--port", "--zmq-endpoint", "--model", "--vllm-format"} <= flags
    page = (ROOT / "docs" / "fleet.md").read_text(encoding="utf-8")
    missing = sorted(f for f in flags if not re.search(re.escape(f) + r"(?![\w-])", page))
    assert not missing, f"flags missing from docs/fleet.md: {missing}"
    uses = _documented_uses()
    assert len(uses) >= 2
    wrong = sorted({f for rest in uses for f in _FLAG.findall(rest)} - flags)
    assert not wrong, f"documented flags that kvindex fake-pod does not have: {wrong}"


def test_make_fleet_is_documented_in_the_readme_and_the_makefile() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "make fleet" in readme and "(docs/fleet.md" in readme
    makefile = Path(ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^## fleet: ", makefile, re.M) and "kvindex_service.fakepod.fleet" in makefile
