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
import random
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from benches.conftest import write_result
from benches.http_load import run_open_loop
from benches.serving import MODEL, Service, fill, token_id_bodies, words

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, list[list[int]]]]:
    service = Service(tmp_path_factory.mktemp("api-bench"))
    try:
        chains = fill(service, random.Random(11))
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
    bodies = token_id_bodies(chains, random.Random(5))
    with httpx.Client(timeout=10) as c:  # sanity: the bodies really match something
        body = c.post(f"{service.url}/score", json=bodies[0]).json()
        assert body["scores"] and body["scores"][0]["matched_blocks"] >= 64
    _record("token_ids_2048tok_500rps", _run(f"{service.url}/score", bodies, 500, 10))


def test_text_prompts_seen_before_vs_first_seen(filled: tuple[Service, list[list[int]]]) -> None:
    service, _ = filled
    rng = random.Random(9)
    url = f"{service.url}/score"
    document = words(rng, 1950)  # ~4k tokens with the question
    with httpx.Client(timeout=30) as c:
        seen = {"model": MODEL, "prompt": document + "\nQuestion: which depot ships first?"}
        body = c.post(url, json=seen).json()
        tokens = body["total_tokens"]
    _record("text_seen_before_200rps", {**_run(url, [seen], 200, 5), "prompt_tokens": tokens})
    shared = [{"model": MODEL, "prompt": document + f"\nQuestion {i}: {words(rng, 30)}?"} for i in range(2000)]
    _record("text_shared_document_new_question_100rps", _run(url, shared, 100, 5))
    cold = [{"model": MODEL, "prompt": f"Case {i}. " + words(rng, 1950)} for i in range(400)]
    _record("text_first_seen_50rps", _run(url, cold, 50, 5))
