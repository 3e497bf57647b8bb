"""Routing latency the picker adds per request (measured, never asserted).

A ~4k-token chat request (a long system prompt shared by every request, a new user turn each
time) goes through the real gRPC picker, driven by the Envoy-like client, with:

* ``none``      -- no scorer: the gRPC + protocol + policy cost alone;
* ``inproc``    -- the in-process ``ScoringService`` (real index, real Llama 3.2 tokenizer);
* ``http``      -- the real FastAPI scoring service under uvicorn on loopback.

Reported per scorer and body mode: the client-observed request phase (request_headers ->
the answer carrying the pick; the response phase is excluded) and the server-side pick
(scoring included), p50/p99 in ms. The client runs in the same process and event loop as the
picker, so the client-observed numbers also carry the client's own gRPC cost.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest

from benches.conftest import write_result
from kvindex_service import Indexer
from kvindex_service.extproc import EnvoyClient, ExtprocConfig, InProcessScorer, start_picker
from kvindex_service.tokenization import TokenizerPool, find_llama3_tokenizer_dir

MODEL = "meta-llama/Llama-3.2-3B-Instruct"
PODS = [f"10.0.1.{i}:8000" for i in range(1, 9)]
HOLDER = PODS[5]
WARMUP = 30
ROUNDS = 300

SYSTEM = " ".join(
    f"Rule {i}: shipments to depot {i % 37} leave at {6 + i % 12}:00 and carry at most {100 + i} pallets."
    for i in range(190)
)


def _messages(i: int) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"Request {i}: which depot ships pallet batch {i * 7919 % 10007} first?"},
    ]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _store(ix: Indexer, pool: TokenizerPool) -> int:
    ids = pool.tokenize_chat(MODEL, _messages(0), add_generation_prompt=True).token_ids
    keys = ix.block_keys(ids)
    shared = keys[: len(keys) - 4]  # the system prompt's blocks, not the per-request turn
    event = {"type": "BlockStored", "block_hashes": shared, "parent_block_hash": None,
             "token_ids": ids[: len(shared) * 16], "block_size": 16, "medium": "GPU"}  # fmt: skip
    ix.apply(HOLDER, MODEL, msgpack.packb([time.time(), [event], None]))
    for pod in PODS[:3]:  # a few pods hold a shorter prefix
        ix.add_blocks(pod, MODEL, shared[: len(shared) // 3])
    return len(ids)


@pytest.fixture(scope="module")
def stack() -> Iterator[dict[str, Any]]:
    tok_dir = find_llama3_tokenizer_dir()
    assert tok_dir is not None
    from kvindex_service.scoring import ScoringService

    ix = Indexer(block_size=16)
    pool = TokenizerPool({MODEL: tok_dir})
    n_tokens = _store(ix, pool)
    service = ScoringService(ix, pool)

    import uvicorn

    from kvindex_service.api import create_app
    from kvindex_service.config import load_settings
    from kvindex_service.runtime import Runtime

    settings = load_settings(
        overrides={
            "http": {"host": "127.0.0.1", "port": 0},
            "zmq": {"bind": "tcp://127.0.0.1:*"},
            "tokenizers": {"sources": {MODEL: tok_dir}, "llama32_defaults": False},
        }
    )
    runtime = Runtime(settings)
    runtime.start()
    while not runtime.ready():
        time.sleep(0.02)
    _store(runtime.indexer, runtime.tokenizers)
    server = uvicorn.Server(
        uvicorn.Config(create_app(runtime=runtime), host="127.0.0.1", port=0, log_level="warning", ws="none")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield {"service": service, "url": f"http://127.0.0.1:{port}", "tokens": n_tokens}
    finally:
        server.should_exit = True
        thread.join(10)
        runtime.stop()
        pool.close()
        ix.close()


async def _measure(stack: dict[str, Any], scorer_kind: str, mode: str) -> dict[str, float]:
    config = ExtprocConfig(endpoints=PODS, timeout_ms=1000, scorer_url=stack["url"] if scorer_kind == "http" else None)
    scorer = InProcessScorer(stack["service"], timeout_ms=1000) if scorer_kind == "inproc" else None
    server = await start_picker(config, scorer=scorer)
    picker = server.picker
    pick_times: list[float] = []
    original = picker.pick

    async def timed_pick(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return await original(*args, **kwargs)
        finally:
            pick_times.append(time.perf_counter() - t0)

    picker.pick = timed_pick  # type: ignore[method-assign]
    client_times: list[float] = []
    endpoints: dict[str, int] = {}
    try:
        async with EnvoyClient(f"127.0.0.1:{server.port}") as client:
            for i in range(WARMUP + ROUNDS):
                body = json.dumps({"model": MODEL, "messages": _messages(i + 1), "max_tokens": 64}).encode()
                t0 = time.perf_counter()
                r = await client.route("/v1/chat/completions", body, mode=mode, complete=False)  # type: ignore[arg-type]
                dt = time.perf_counter() - t0
                await r.finish()
                if i >= WARMUP:
                    client_times.append(dt)
                    endpoints[r.endpoint or "none"] = endpoints.get(r.endpoint or "none", 0) + 1
        pick_times = pick_times[WARMUP:]
        outcomes = picker.stats()["scorer_outcomes"]
    finally:
        await server.stop()
    if scorer_kind != "none":
        # Every request must have been scored and sent to the pod holding the system prompt.
        assert outcomes == {"ok": WARMUP + ROUNDS}, outcomes
        assert endpoints == {HOLDER: ROUNDS}, endpoints
    ms = 1000.0
    return {
        "client_p50_ms": statistics.median(client_times) * ms,
        "client_p99_ms": _pct(client_times, 0.99) * ms,
        "pick_p50_ms": statistics.median(pick_times) * ms,
        "pick_p99_ms": _pct(pick_times, 0.99) * ms,
    }


@pytest.mark.parametrize("mode", ["BUFFERED", "FULL_DUPLEX_STREAMED"])
@pytest.mark.parametrize("scorer_kind", ["none", "inproc", "http"])
def test_routing_latency_4k_chat(benchmark: Any, stack: dict[str, Any], scorer_kind: str, mode: str) -> None:
    result = asyncio.run(_measure(stack, scorer_kind, mode))
    result["prompt_tokens"] = float(stack["tokens"])
    write_result("extproc", {f"route_4k_chat/{scorer_kind}/{mode}/{k}": v for k, v in result.items()})
    # pytest-benchmark's own table: one more measured request each round.
    benchmark.extra_info.update(result)

    async def one() -> None:
        server = await start_picker(ExtprocConfig(endpoints=PODS), scorer=None)
        try:
            async with EnvoyClient(f"127.0.0.1:{server.port}") as client:
                await client.route("/v1/models", b"")
        finally:
            await server.stop()

    benchmark.pedantic(lambda: asyncio.run(one()), rounds=1, iterations=1)
