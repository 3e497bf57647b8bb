"""Scoring-service latency over real HTTP at a fixed request rate (measured, never asserted).

The service runs as its own process (``python -m kvindex_service serve``, access log on, as in
production), so the load generator in this process does not share its GIL. Its index is
filled over real ZMQ with realistic content: 16 pods, 1,600 stored prompts of 2,048 tokens
(8 shared 1,024-token system prompts + a per-request part), 204,800 blocks.

Runs:

* ``token_ids``   2,048-token token-id bodies at 500 req/s (open loop, 10 s);
* ``text_seen``   a ~4k-token text prompt already in the prefix store, 200 req/s;
* ``text_shared`` ~4k-token prompts never seen whole, sharing a ~4k-token document
                  with earlier ones (a new question each time), 100 req/s;
* ``text_cold``   ~4k-token prompts with nothing in common (full tokenization), 50 req/s.

Results: ``benches/out/api.json`` (p50/p90/p99 ms, achieved rate).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
import zmq

from benches.conftest import write_result
from benches.http_load import run_open_loop

ROOT = Path(__file__).resolve().parents[1]
MODEL = "meta-llama/Llama-3.2-3B-Instruct"
PODS = [f"10.0.2.{i}:8000" for i in range(1, 17)]
SYSTEM_PROMPTS = 8
CHAINS_PER_POD = 100
SYSTEM_TOKENS = 1024
CHAIN_TOKENS = 2048

pytestmark = pytest.mark.timeout(900)


class Service:
    def __init__(self, tmp: Path) -> None:
        self.log_path = tmp / "serve.log"
        self._log = self.log_path.open("w")
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVINDEX_")}
        env["PYTHONPATH"] = str(ROOT)
        env["KVINDEX_ZMQ__VERIFY_PEER"] = "false"  # the bench publishes 10.1.0.x pods from loopback
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvindex_service", "serve", "--host", "127.0.0.1", "--port", "0",
             "--zmq-bind", "tcp://127.0.0.1:*", "--hash-seed", "42", "--log-json"],
            env=env, stdout=subprocess.DEVNULL, stderr=self._log,
        )  # fmt: skip
        self.url = self._find(r'"http":"(http://127\.0\.0\.1:\d+)"')
        self.zmq = self._find(r'"zmq_bind":"(tcp://127\.0\.0\.1:\d+)"')

    def _find(self, pattern: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.log_path.read_text())
            if m:
                return m.group(1)
            assert self.proc.poll() is None, self.log_path.read_text()
            time.sleep(0.05)
        raise TimeoutError(pattern)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._log.close()


def _fill(service: Service, rng: random.Random) -> list[list[int]]:
    """Publish every pod's stored prompts; returns the stored chains (token ids)."""
    systems = [
        [128000] + [rng.randrange(1000, 120_000) for _ in range(SYSTEM_TOKENS - 1)] for _ in range(SYSTEM_PROMPTS)
    ]
    chains: list[list[int]] = []
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        for pod in PODS:
            pub = ctx.socket(zmq.XPUB)
            pub.setsockopt(zmq.SNDHWM, 0)
            pub.connect(service.zmq)
            assert pub.poll(10_000, zmq.POLLIN)
            pub.recv()
            topic = f"kv@{pod}@{MODEL}".encode()
            for seq in range(CHAINS_PER_POD):
                tokens = systems[rng.randrange(SYSTEM_PROMPTS)] + [
                    rng.randrange(1000, 120_000) for _ in range(CHAIN_TOKENS - SYSTEM_TOKENS)
                ]
                chains.append(tokens)
                n = len(tokens) // 16
                event = ["BlockStored", [rng.getrandbits(64) for _ in range(n)], None, tokens, 16, None, "GPU"]
                pub.send_multipart([topic, seq.to_bytes(8, "big"), msgpack.packb([time.time(), [event], 0])])
            pub.close(linger=10_000)
    finally:
        ctx.term()
    with httpx.Client(base_url=service.url, timeout=30) as c:
        deadline = time.monotonic() + 300
        while True:
            pods = c.get("/pods").json()["pods"]
            if sum(p["batches_applied"] for p in pods) >= len(PODS) * CHAINS_PER_POD:
                break
            assert time.monotonic() < deadline, "fill not applied"
            time.sleep(0.2)
        while c.get("/readyz").status_code != 200:
            time.sleep(0.05)
    return chains


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, list[list[int]]]]:
    service = Service(tmp_path_factory.mktemp("api-bench"))
    try:
        chains = _fill(service, random.Random(11))
        yield service, chains
    finally:
        service.stop()


def _server_time(base: str) -> tuple[float, float]:
    """(sum of seconds, count) the service itself spent in POST /score, from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base}/metrics", timeout=10).text
    total = count = 0.0
    for fam in text_string_to_metric_families(text):
        if fam.name != "kvindex_http_request_duration_seconds":
            continue
        for smp in fam.samples:
            if smp.labels.get("route") == "/score" and smp.labels.get("method") == "POST":
                if smp.name.endswith("_sum"):
                    total = smp.value
                elif smp.name.endswith("_count"):
                    count = smp.value
    return total, count


def _run(url: str, bodies: list[dict[str, Any]], rate: float, duration: float) -> dict[str, Any]:
    """Open-loop run; adds the mean time spent inside the service (from its own histogram),
    so transport + client cost and server cost can be told apart."""
    raw = [json.dumps(b).encode() for b in bodies]
    base = url.rsplit("/", 1)[0]
    s0, c0 = _server_time(base)
    res = asyncio.run(run_open_loop(url, raw, rate=rate, duration=duration, connections=32, warmup=1.0))
    s1, c1 = _server_time(base)
    summary = res.summary()
    summary["server_mean_ms"] = round((s1 - s0) / (c1 - c0) * 1000, 3) if c1 > c0 else float("nan")
    return summary


def _record(name: str, summary: dict[str, Any]) -> None:
    flat = {f"{name}_{k}": v for k, v in summary.items() if isinstance(v, int | float)}
    write_result("api", flat)
    print(name, json.dumps(summary))


def test_token_ids_at_500_rps(filled: tuple[Service, list[list[int]]]) -> None:
    service, chains = filled
    rng = random.Random(5)
    bodies = []
    for _ in range(200):
        base = chains[rng.randrange(len(chains))]
        keep = rng.choice([64, 96, 128]) * 16  # blocks of a stored prompt the request shares
        tokens = base[:keep] + [rng.randrange(1000, 120_000) for _ in range(CHAIN_TOKENS - keep)]
        bodies.append({"model": MODEL, "token_ids": tokens})
    with httpx.Client(timeout=10) as c:  # sanity: the bodies really match something
        body = c.post(f"{service.url}/score", json=bodies[0]).json()
        assert body["scores"] and body["scores"][0]["matched_blocks"] >= 64
    _record("token_ids_2048tok_500rps", _run(f"{service.url}/score", bodies, 500, 10))


def _words(rng: random.Random, n: int) -> str:
    vocab = ["shipment", "depot", "pallet", "north", "route", "carrier", "invoice", "customs", "freight",
             "warehouse", "priority", "delay", "schedule", "manifest", "container", "refrigerated"]  # fmt: skip
    return " ".join(f"{rng.choice(vocab)}{rng.randrange(100)}" for _ in range(n))


def test_text_prompts_seen_before_vs_first_seen(filled: tuple[Service, list[list[int]]]) -> None:
    service, _ = filled
    rng = random.Random(9)
    url = f"{service.url}/score"
    document = _words(rng, 1950)  # ~4k tokens with the question
    with httpx.Client(timeout=30) as c:
        seen = {"model": MODEL, "prompt": document + "\nQuestion: which depot ships first?"}
        body = c.post(url, json=seen).json()
        tokens = body["total_tokens"]
    _record("text_seen_before_200rps", {**_run(url, [seen], 200, 5), "prompt_tokens": tokens})
    shared = [{"model": MODEL, "prompt": document + f"\nQuestion {i}: {_words(rng, 30)}?"} for i in range(2000)]
    _record("text_shared_document_new_question_100rps", _run(url, shared, 100, 5))
    cold = [{"model": MODEL, "prompt": f"Case {i}. " + _words(rng, 1950)} for i in range(400)]
    _record("text_first_seen_50rps", _run(url, cold, 50, 5))
