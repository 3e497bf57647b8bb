"""Simulated vLLM pods: prefix-caching block pools and their real-format event streams."""

from __future__ import annotations

from typing import Any

import msgpack
import zmq

from kvindex_service import Indexer, TokenProcessor
from kvindex_service.sim import BlockPool, EventPublisher, SimPod

BS = 4


def test_hits_pin_and_reuse_the_cached_prefix() -> None:
    pool = BlockPool(8, BS)
    got = pool.allocate([1, 2, 3], 3)
    assert got is not None
    alloc, evicted = got
    assert (alloc.hit_blocks, evicted) == (0, [])
    assert pool.cache(alloc, [1, 2, 3]) == [(0, 1), (1, 2), (2, 3)]
    pool.free(alloc)
    assert pool.cached_prefix([1, 2, 3, 4]) == 3
    again = pool.allocate([1, 2, 9], 4)
    assert again is not None
    assert again[0].hit_blocks == 2  # blocks 1, 2 reused; 9 is new
    assert pool.free_blocks == 8 - 4


def test_eviction_takes_the_least_recently_freed_tail_first() -> None:
    pool = BlockPool(4, BS)
    a = pool.allocate([1, 2], 2)
    assert a is not None
    pool.cache(a[0], [1, 2])
    pool.free(a[0])  # queue: ..., 2, 1 (the tail is freed first)
    b = pool.allocate([5, 6], 2)
    assert b is not None
    pool.cache(b[0], [5, 6])
    pool.free(b[0])
    # the never-used blocks go first, then the oldest freed sequence, tail first
    assert pool.free_order() == [2, 1, 6, 5]
    c = pool.allocate([7], 1)
    assert c is not None and c[1] == [2]
    assert pool.cached_prefix([1, 2]) == 1 and pool.evictions == 1
    # pinned blocks are never evicted: a request larger than the free queue waits
    assert pool.allocate([8, 9, 10, 11], 4) is None


def _drain(sub: zmq.Socket[Any]) -> list[list[bytes]]:
    out = []
    while sub.poll(200, zmq.POLLIN):
        out.append(sub.recv_multipart())
    return out


def test_published_frames_are_vllm_batches_that_rebuild_the_pool() -> None:
    """The pod's events, applied by the real core, give exactly the pool's cache."""
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    tp = TokenProcessor(BS, "7")
    pub = EventPublisher(ctx, "127.0.0.1:18001", "sim/model", replay_endpoint="tcp://127.0.0.1:*")
    try:
        sub.setsockopt(zmq.SUBSCRIBE, b"kv@")
        sub.connect(pub.endpoint)
        assert pub.wait_subscribed(10.0)
        pod = SimPod("127.0.0.1:18001", BlockPool(6, BS), tp, pub)
        prompts = [list(range(100, 110)), list(range(100, 108)) + [1, 2, 3, 4], list(range(50, 62))]
        for t, prompt in enumerate(prompts):
            alloc = pod.admit(prompt, 2, float(t))
            assert alloc is not None
            pod.finish(alloc, prompt + [9, 9], float(t) + 0.5)
        frames = _drain(sub)
        assert frames and all(len(f) == 3 for f in frames)
        seqs = [int.from_bytes(f[1], "big") for f in frames]
        assert seqs == list(range(len(frames)))
        assert frames[0][0] == b"kv@127.0.0.1:18001@sim/model"
        kinds = {e["type"] for f in frames for e in msgpack.unpackb(f[2])[1]}
        assert kinds == {"BlockStored", "BlockRemoved"}  # 6 blocks: the third prompt evicts
        ix = Indexer(block_size=BS, hash_seed="7")
        for f in frames:
            res = ix.apply("127.0.0.1:18001", "sim/model", f[2], int.from_bytes(f[1], "big"))
            assert res.decode_errors == 0 and res.unknown_parents == 0
        state = ix.pod_state("127.0.0.1:18001")
        assert state is not None and state.hashes_match is True
        assert state.blocks_by_tier["GPU"] == pod.pool.cached_blocks
        for prompt in prompts:
            keys = tp.block_keys(prompt)
            got = ix.score_keys("sim/model", keys, pods=["127.0.0.1:18001"]).scores[0].matched_blocks
            assert got == pod.pool.cached_prefix(keys)
        ix.close()
    finally:
        pub.close()
        sub.close(linger=0)
        ctx.term()
