"""Shared test fixtures: the real vLLM captures and trace shipped in tests/fixtures/."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
VLLM_DIR = FIXTURES / "vllm"
VLLM_VERSIONS = sorted(p.stem.removeprefix("vllm-") for p in VLLM_DIR.glob("vllm-*.json"))
MOONCAKE_TRACE = FIXTURES / "mooncake-synthetic.jsonl"


def reap(proc: subprocess.Popen[str]) -> None:
    """Kill a CLI process a test left running and close its stderr pipe."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()


def terminate(proc: subprocess.Popen[Any], grace: float = 20.0) -> int:
    """Stop a process a test started: SIGTERM, up to ``grace`` seconds to exit, then SIGKILL.
    Returns its exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return int(proc.returncode)


def load_vllm_capture(version: str) -> dict[str, Any]:
    """A capture of vLLM's own ZmqEventPublisher, with each message's frames decoded to bytes
    under ``frames`` (topic, seq, payload)."""
    data = json.loads((VLLM_DIR / f"vllm-{version}.json").read_text())
    for msg in data["messages"]:
        msg["frames"] = [base64.b64decode(f) for f in msg["frames_b64"]]
    return data


def load_hash_vectors() -> list[dict[str, Any]]:
    return json.loads((VLLM_DIR / "hash-vectors.json").read_text())["cases"]


@pytest.fixture(params=VLLM_VERSIONS)
def vllm_capture(request: pytest.FixtureRequest) -> dict[str, Any]:
    return load_vllm_capture(request.param)
