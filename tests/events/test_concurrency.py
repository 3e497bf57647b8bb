"""Per-pod order under concurrency: many publishers at once, two shards, both modes at once."""

from __future__ import annotations

import random
import threading

from kvindex_service.events import PodEndpoint
from tests.events.helpers import (
    WAIT,
    Publisher,
    Rig,
    matched,
    removed_batch,
    stored_batch,
    wait_until,
)

PODS = 16
BATCHES = 300
MODEL = "m@rev"


def test_many_publishers_keep_per_pod_order(rig: Rig) -> None:
    """Each pod's batch i stores block i whose parent is block i-1, and the last batch removes
    the block stored just before it. Applied out of order, a block's parent would be unknown
    (and not placed) or the removal would precede its store: the final state of every pod
    depends on its batches being applied in publication order."""
    ix = rig.indexer(shards=2)
    rng = random.Random(7)
    prompts = {f"pod-{i:02d}": [rng.randrange(128_000) for _ in range(16 * (BATCHES - 1))] for i in range(PODS)}
    keys = {pod: ix.block_keys(tokens) for pod, tokens in prompts.items()}
    connected = [rig.publisher() for _ in range(PODS // 2)]
    sub = rig.subscriber(
        ix, bind="tcp://127.0.0.1:*", pods=[PodEndpoint(p.endpoint) for p in connected], probe=connected
    )
    pubs: list[Publisher] = connected + [rig.bound_publisher(sub) for _ in range(PODS - len(connected))]

    def frames(pod: str, seq: int) -> list[bytes]:
        topic = f"kv@{pod}@{MODEL}".encode()
        if seq == BATCHES - 1:
            payload = removed_batch([keys[pod][seq - 1]])
        else:
            parent = keys[pod][seq - 1] if seq else None
            payload = stored_batch([keys[pod][seq]], parent, prompts[pod][16 * seq : 16 * seq + 16])
        return [topic, seq.to_bytes(8, "big"), payload]

    # ZMQ sockets are not thread-safe: each publisher thread owns its own PUB socket.
    go = threading.Event()

    def publish(pub: Publisher, pod: str) -> None:
        go.wait()
        for seq in range(BATCHES):
            pub.send(frames(pod, seq))

    threads = [threading.Thread(target=publish, args=(pub, pod)) for pub, pod in zip(pubs, prompts, strict=True)]
    for t in threads:
        t.start()
    go.set()
    for t in threads:
        t.join(WAIT)
    total = PODS * BATCHES
    wait_until(lambda: sub.stats()["messages_applied"] >= total, what="all batches")
    assert sub.sync(WAIT)

    stats = sub.stats()
    assert stats["messages_applied"] == total
    assert stats["gaps"] == stats["resets"] == stats["internal_errors"] == 0
    for pod, tokens in prompts.items():
        state = ix.pod_state(pod)
        assert state is not None
        assert state.unknown_parents == 0, pod
        assert state.last_seq == BATCHES - 1 and state.batches_applied == BATCHES
        assert state.blocks_by_tier["GPU"] == BATCHES - 2
        assert matched(ix, MODEL, tokens, pod) == BATCHES - 2
    modes = {s["pod"]: s["mode"] for s in sub.pod_states()}
    assert sorted(modes.values()).count("connect") == len(connected)
