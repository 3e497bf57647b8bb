"""KvindexFeed.sync is a barrier: after it, kvindex has applied every batch published so far.

The core records a batch's sequence number when it starts applying it, so a sync that
returned on sequence numbers alone could leave a batch half applied, and the next routing
decision would read a partial index: the same seed then gave different reports on a loaded
machine. The sync must see the sequence numbers first and flush the core after.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import zmq

from kvindex_service import TokenProcessor
from kvindex_service.sim import AccuracyStats, BlockPool, EventPublisher, KvindexFeed, SimPod

BS = 16
BLOCKS = 1000  # one admission publishes one batch storing this many blocks


@dataclass
class _State:
    last_seq: int | None


class _Core:
    """The core's contract: ``last_seq`` is set when a batch starts applying; ``flush``
    returns once everything queued before it is applied."""

    def __init__(self) -> None:
        self.started = 2
        self.applied = 2

    def pod_state(self, pod: str) -> _State:
        return _State(self.started)

    def flush(self, timeout: float | None = None) -> bool:
        self.applied = self.started
        return True


class _Subscriber:
    """Flushes what it had received, then receives batch 3, which the core starts applying:
    the interleaving a loaded machine produces."""

    def __init__(self, core: _Core) -> None:
        self.core = core

    def sync(self, timeout: float = 5.0) -> bool:
        self.core.flush()
        self.core.started = 3
        return True


@dataclass
class _Publisher:
    last_seq: int | None


@dataclass
class _Pod:
    pod_id: str
    publisher: _Publisher


def test_sync_flushes_after_the_sequence_numbers_are_reached() -> None:
    core = _Core()
    feed = object.__new__(KvindexFeed)
    feed.pods = [_Pod("p", _Publisher(3))]  # type: ignore[list-item]
    feed.indexer = core  # type: ignore[assignment]
    feed.subscriber = _Subscriber(core)  # type: ignore[assignment]
    feed.sync_timeout = 5.0
    feed.sync_waits = 0
    feed.accuracy = AccuracyStats()
    feed.sync()
    assert core.applied == 3, "sync returned while the pod's last batch was still being applied"


def _pod(ctx: zmq.Context[Any], processor: TokenProcessor, i: int) -> SimPod:
    pod_id = f"127.0.0.1:{19001 + i}"
    pub = EventPublisher(ctx, pod_id, "sim/m", replay_endpoint="tcp://127.0.0.1:*")
    return SimPod(pod_id, BlockPool(4 * BLOCKS, BS), processor, pub)


def test_sync_waits_until_large_batches_are_fully_applied() -> None:
    ctx: zmq.Context[Any] = zmq.Context()
    processor = TokenProcessor(BS, None, "sha256_cbor")
    pods = [_pod(ctx, processor, i) for i in range(2)]
    feed = KvindexFeed(pods, ctx, model="sim/m")
    rng = random.Random(7)
    try:
        for round_ in range(8):
            tokens = [rng.randrange(1, 50_000) for _ in range(BLOCKS * BS)]
            pod = pods[round_ % len(pods)]
            alloc = pod.admit(tokens, 1, float(round_))
            assert alloc is not None
            feed.sync()
            keys = feed.indexer.block_keys(tokens)
            held = feed.indexer.lookup("sim/m", keys, pods=[pod.pod_id])
            missing = sum(1 for entries in held if not entries)
            assert missing == 0, f"round {round_}: sync returned with {missing} of {len(keys)} blocks unapplied"
            for p in pods:
                state = feed.indexer.pod_state(p.pod_id)
                assert p.publisher is not None
                applied = 0 if state is None else state.batches_applied
                assert applied == p.publisher.next_seq, f"round {round_}: {p.pod_id} has a batch in flight"
            pod.pool.free(alloc)
    finally:
        feed.close()
        for p in pods:
            assert p.publisher is not None
            p.publisher.close()
        ctx.term()
