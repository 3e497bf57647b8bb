"""A stand-in vLLM fleet for the ingestion bench: publishes realistic KV-event batches over ZMQ as
fast as the subscriber takes them, for a fixed time, from its own process.

Batches are vLLM >= 0.24 map-encoded (the field set vLLM 0.33 sends): each BlockStored carries
16 blocks of 16 tokens chained on the previous event of the same prompt; prompts share a
system-prompt prefix per family; every few batches a BlockRemoved evicts 16 old blocks. Block
hashes come from kvindex's own token processor, i.e. the engine and the indexer agree (the
vLLM configuration DESIGN.md recommends). A pool of batches is encoded up front and then cycled
with fresh sequence numbers, so publishing costs one send per batch.

The socket is an XPUB with ``XPUB_NODROP``: it waits for the subscriber's subscription before
the first batch (no slow-joiner loss) and blocks instead of dropping at the high-water mark, so
the bench measures sustained throughput rather than how much was dropped.

Each pod's pool is cycled when exhausted (re-storing blocks the index already holds).

With ``--rate N`` it paces itself to N stored blocks per second (a steady fleet) instead;
``--schedule 0:5,100000:5,max:5`` runs phases (silent, paced, unthrottled) back to back, prints
``{"ready": T}`` once subscribed and, at the end, each phase's ``time.monotonic()`` window (the
same clock as asyncio's in another process), so a client can bucket its samples by phase.

Usage: python benches/ingest_publisher.py --connect tcp://127.0.0.1:PORT --duration 3 [--rate 100000]
Prints one JSON line: {"batches": ..., "blocks": ..., "seconds": ...}.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from typing import Any

import msgpack
import zmq

from kvindex_service import TokenProcessor

BLOCK = 16
BLOCKS_PER_EVENT = 16
MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def _stored(hashes: list[int], parent: int | None, tokens: list[int]) -> dict[str, Any]:
    return {
        "type": "BlockStored",
        "block_hashes": hashes,
        **({"parent_block_hash": parent} if parent is not None else {}),
        "token_ids": tokens,
        "block_size": BLOCK,
        "medium": "GPU",
        "group_idx": 0,
        "kv_cache_spec_kind": "full_attention",
    }


def make_batches(
    n_batches: int,
    *,
    events_per_batch: int = 4,
    remove_every: int = 4,
    algorithm: str = "sha256_cbor",
    hash_seed: str | None = "42",
    seed: int = 1,
) -> tuple[list[bytes], int]:
    """``n_batches`` encoded payloads and the number of blocks they store in total."""
    rng = random.Random(seed)
    tp = TokenProcessor(BLOCK, hash_seed, algorithm)
    families = [[rng.randrange(128_000) for _ in range(4 * BLOCK * BLOCKS_PER_EVENT)] for _ in range(8)]
    recent: list[int] = []
    payloads: list[bytes] = []
    stored = 0
    # A prompt in progress: its tokens, keys, and how many events of it were published.
    prompt: tuple[list[int], list[int]] | None = None
    done_events = 0
    for b in range(n_batches):
        events: list[dict[str, Any]] = []
        for _ in range(events_per_batch):
            if prompt is None or done_events * BLOCKS_PER_EVENT >= len(prompt[1]):
                family = rng.choice(families)
                shared = rng.randrange(1, 4) * BLOCKS_PER_EVENT * BLOCK
                tail = [rng.randrange(128_000) for _ in range(rng.randrange(2, 6) * BLOCKS_PER_EVENT * BLOCK)]
                tokens = family[:shared] + tail
                prompt = (tokens, tp.block_keys(tokens))
                done_events = 0
            tokens, keys = prompt
            lo = done_events * BLOCKS_PER_EVENT
            hashes = keys[lo : lo + BLOCKS_PER_EVENT]
            parent = keys[lo - 1] if lo else None
            events.append(_stored(hashes, parent, tokens[lo * BLOCK : (lo + len(hashes)) * BLOCK]))
            recent.extend(hashes)
            stored += len(hashes)
            done_events += 1
        if remove_every and b % remove_every == remove_every - 1 and len(recent) > 4096:
            # Evict old blocks, never one the prompt in progress still chains on.
            live = set(prompt[1]) if prompt else set()
            evict = [h for h in recent[: 4 * BLOCKS_PER_EVENT] if h not in live][:BLOCKS_PER_EVENT]
            del recent[: 4 * BLOCKS_PER_EVENT]
            events.append({"type": "BlockRemoved", "block_hashes": evict, "medium": "GPU", "group_idx": 0})
        del recent[:-65536]
        payloads.append(msgpack.packb([time.time(), events, 0]))
    return payloads, stored


def _schedule(text: str) -> list[tuple[float, float]]:
    """``RATE:SECONDS,...`` as (blocks/s, seconds) pairs; rate -1 means unthrottled."""
    out = []
    for part in text.split(","):
        rate, _, seconds = part.partition(":")
        out.append((-1.0 if rate == "max" else float(rate), float(seconds)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connect", required=True, help="the subscriber's bound endpoint")
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--pods", type=int, default=4, help="pod ids the batches rotate over")
    ap.add_argument("--pool", type=int, default=2000, help="distinct batches to encode")
    ap.add_argument("--events-per-batch", type=int, default=4)
    ap.add_argument("--algorithm", default="sha256_cbor")
    ap.add_argument("--hash-seed", default="42")
    ap.add_argument("--sndhwm", type=int, default=10_000)
    ap.add_argument(
        "--rate", type=float, default=0.0, help="blocks stored per second, paced evenly (0 = as fast as possible)"
    )
    ap.add_argument(
        "--schedule",
        default="",
        help="phases RATE:SECONDS,... (RATE in blocks/s, 0 = silent, max = unthrottled); overrides --duration/--rate",
    )
    args = ap.parse_args(argv)
    schedule = _schedule(args.schedule) if args.schedule else [(args.rate if args.rate > 0 else -1.0, args.duration)]

    # One stream per pod: a pod's prompts chain within its own batches, as on a real pod.
    pools = [
        make_batches(
            max(1, args.pool // args.pods),
            events_per_batch=args.events_per_batch,
            algorithm=args.algorithm,
            hash_seed=args.hash_seed,
            seed=pod,
        )[0]
        for pod in range(args.pods)
    ]
    stored = [
        [sum(len(e["block_hashes"]) for e in msgpack.unpackb(p)[1] if e["type"] == "BlockStored") for p in pool]
        for pool in pools
    ]
    topics = [f"kv@10.1.0.{i}:8000@{MODEL}".encode() for i in range(args.pods)]
    seqs = [0] * args.pods

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.XPUB)
    sock.setsockopt(zmq.SNDHWM, args.sndhwm)
    sock.setsockopt(zmq.XPUB_NODROP, 1)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(args.connect)
    sock.recv()  # the subscription: from here on nothing is lost to the slow-joiner race
    n = len(pools[0])
    send = sock.send_multipart
    i = blocks = 0
    phases = []
    if args.schedule:
        print(json.dumps({"ready": time.monotonic()}), flush=True)
    start = time.monotonic()
    for rate, seconds in schedule:
        t0, b0, i0 = time.monotonic(), blocks, i
        deadline = t0 + seconds
        pace = 1.0 / rate if rate > 0 else 0.0
        while True:
            if rate == 0 or pace:
                now = time.monotonic()
                if now >= deadline:
                    break
                ahead = min(deadline, t0 + (blocks - b0) * pace) - now if pace else deadline - now
                if ahead > 0.001:
                    time.sleep(ahead)
                if rate == 0:
                    continue
            elif (i & 63) == 0 and time.monotonic() >= deadline:
                break
            pod = i % args.pods
            k = seqs[pod] % n
            send([topics[pod], seqs[pod].to_bytes(8, "big"), pools[pod][k]])
            seqs[pod] += 1
            blocks += stored[pod][k]
            i += 1
        phases.append({"rate": rate, "start": t0, "end": time.monotonic(), "blocks": blocks - b0, "batches": i - i0})
    batches = i
    seconds = time.monotonic() - start
    sock.close()
    ctx.term()
    json.dump({"batches": batches, "blocks": blocks, "seconds": seconds, "phases": phases}, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
