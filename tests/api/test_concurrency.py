"""Many concurrent /score clients must not stall event ingestion: while they hammer the
server, every ZMQ batch a publisher sends is still applied. Asserts on counts, not time."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable

import httpx
import msgpack

from tests.api.helpers import MODEL, LiveServer, Publisher, wait_for

CLIENTS = 24
BATCHES = 400
BLOCKS = 4


def _batch(rng: random.Random, seq: int) -> tuple[list[int], bytes]:
    tokens = [rng.randrange(1, 128_000) for _ in range(16 * BLOCKS)]
    hashes = [seq * 100 + i + 1 for i in range(BLOCKS)]
    event = {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": None,
             "token_ids": tokens, "block_size": 16, "medium": "GPU"}  # fmt: skip
    return tokens, msgpack.packb([time.time(), [event], 0])


def test_ingestion_keeps_up_under_scoring_load(
    live_server: LiveServer, client: httpx.Client, publishers: Callable[[], Publisher]
) -> None:
    rng = random.Random(7)
    pod = "load-10.0.0.9:8000"
    topic = f"kv@{pod}@{MODEL}".encode()
    batches = [_batch(rng, seq) for seq in range(BATCHES)]
    prompt = batches[0][0] * 8  # 512 tokens, one pod holds the first 4 blocks

    stop = threading.Event()
    answered = [0]
    errors: list[str] = []

    async def hammer() -> None:
        limits = httpx.Limits(max_connections=CLIENTS)
        async with httpx.AsyncClient(base_url=live_server.url, timeout=30.0, limits=limits) as ac:

            async def one_client() -> None:
                while not stop.is_set():
                    r = await ac.post("/score", json={"model": MODEL, "token_ids": prompt})
                    if r.status_code != 200:
                        errors.append(r.text)
                    answered[0] += 1

            await asyncio.gather(*(one_client() for _ in range(CLIENTS)))

    loader = threading.Thread(target=asyncio.run, args=(hammer(),), name="score-load")
    loader.start()
    try:
        wait_for(lambda: answered[0] >= 50, what="load running")
        pub = publishers()
        # Interleave: each chunk of batches goes out while the clients are demonstrably
        # being answered (the count of answers grows between chunks).
        for start in range(0, BATCHES, 50):
            seen = answered[0]
            for seq in range(start, min(start + 50, BATCHES)):
                pub.send([topic, seq.to_bytes(8, "big"), batches[seq][1]])
            wait_for(lambda: answered[0] > seen, what="clients served between chunks")

        def applied() -> int:
            r = client.get(f"/pods/{pod}")
            return int(r.json()["batches_applied"]) if r.status_code == 200 else 0

        wait_for(lambda: applied() == BATCHES, timeout=60, what="every batch applied under load")
        assert not stop.is_set() and loader.is_alive()
    finally:
        stop.set()
        loader.join(60)
    assert not loader.is_alive()
    assert errors == []
    state = client.get(f"/pods/{pod}").json()
    assert state["gaps"] == 0 and state["decode_errors"] == 0
    assert state["blocks_by_tier"]["GPU"] == BATCHES * BLOCKS
    body = client.post("/score", json={"model": MODEL, "token_ids": batches[-1][0], "pods": [pod]}).json()
    assert body["scores"][0]["matched_blocks"] == BLOCKS
