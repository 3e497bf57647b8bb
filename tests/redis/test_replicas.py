"""Done-when of the shared index, with real processes: replica A ingests a vLLM stream over
real ZMQ into a real redis-server, replica B (no ZMQ at all) answers the same ``/score``; A
survives SIGKILL and a restart with the index intact; a pod's ``AllBlocksCleared`` is seen by
both replicas."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import msgpack
import zmq

from tests.conftest import load_vllm_capture, reap

ROOT = Path(__file__).resolve().parents[2]
POD = "10.0.0.1:8000"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVINDEX_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def serve(*flags: str) -> tuple[subprocess.Popen[str], str]:
    """``kvindex serve`` on an ephemeral HTTP port; (process, base URL) once it is ready."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvindex_service", "serve", "--host", "127.0.0.1", "--port", "0", "--log-json", *flags],
        env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    url = None
    while url is None:
        line = proc.stderr.readline()
        assert line or proc.poll() is None, "".join(lines)
        assert time.monotonic() < deadline, "".join(lines)
        lines.append(line)
        if '"http":"http://127.0.0.1:' in line:
            url = line.split('"http":"', 1)[1].split('"', 1)[0]
    # keep draining stderr so the process never blocks on a full pipe
    import threading

    threading.Thread(target=lambda: [None for _ in proc.stderr or ()], daemon=True).start()
    with httpx.Client(base_url=url, timeout=10.0) as c:
        while c.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline and proc.poll() is None, "never ready"
            time.sleep(0.05)
    return proc, url


def score(url: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(url + "/score", json=body, timeout=10.0)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def wait_for(pred: Any, what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_replicas_share_one_index_across_kill_and_clear(redis_url: str) -> None:
    cap = load_vllm_capture("0.33.0")
    model = cap["model"]
    msgs = [m for m in cap["messages"] if m["pod"] == POD]
    expect = msgs[-1]["expect_after"][POD]
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub = ctx.socket(zmq.XPUB)  # the pod's publisher binds, as vLLM does with tcp://*:5557
    pub.setsockopt(zmq.LINGER, 0)
    pub.setsockopt(zmq.XPUB_VERBOSE, 1)  # a restarted subscriber's subscription shows up again
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    common = ["--index-backend", redis_url, "--hash-seed", cap["pythonhashseed"], "--hash-algo", cap["hash_algo"]]
    ingest = [*common, "--zmq-bind", "none", "--pod", f"{POD}=tcp://127.0.0.1:{port}"]
    a, url_a = serve(*ingest)
    b, url_b = serve(*common, "--zmq-bind", "none")
    procs = [a, b]
    try:
        assert pub.poll(20_000, zmq.POLLIN), "replica A never subscribed"
        pub.recv()
        for m in msgs:
            pub.send_multipart(m["frames"])
        bodies = {n: {"model": model, "token_ids": t, "pods": [POD]} for n, t in cap["prompts"].items()}

        def held(url: str) -> dict[str, int]:
            return {n: score(url, body)["scores"][0]["matched_blocks"] for n, body in bodies.items()}

        wait_for(lambda: held(url_b) == expect, "replica B to see A's ingestion")
        before = {n: score(url_b, body) for n, body in bodies.items()}
        assert any(r["scores"][0]["matched_blocks"] > 0 for r in before.values())
        assert all(not r["degraded"] for r in before.values())
        assert {n: score(url_a, body) for n, body in bodies.items()} == before  # identical answers

        a.kill()  # SIGKILL: no flush, no goodbye
        a.wait(30)
        assert {n: score(url_b, body) for n, body in bodies.items()} == before
        a, url_a = serve(*ingest)
        procs.append(a)
        assert {n: score(url_a, body) for n, body in bodies.items()} == before  # index intact

        # the pod's cache is emptied: both replicas see it
        assert pub.poll(20_000, zmq.POLLIN), "restarted replica A never subscribed"
        pub.recv()
        seq = int.from_bytes(msgs[-1]["frames"][1], "big") + 1
        topic = msgs[-1]["frames"][0]
        pub.send_multipart([topic, seq.to_bytes(8, "big"), msgpack.packb([time.time(), [["AllBlocksCleared"]], 0])])
        for url in (url_a, url_b):
            wait_for(lambda u=url: set(held(u).values()) == {0}, "the clear to reach both replicas")
    finally:
        for p in procs:
            reap(p)
        pub.close()
        ctx.term()
