"""kvindex's view of a simulated fleet: a fresh Indexer fed over real ZMQ sockets.

The simulator needs deterministic results, so before each routing decision at simulated
time t it waits until kvindex has applied every batch the pods published up to t. It
knows what "every batch" means because it knows each publisher's last sequence number;
the core records, per pod, the sequence number of the last batch it was handed (set when
the batch starts applying), and ``Indexer.flush`` then waits for that batch to be applied.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import takewhile
from operator import gt, lt
from typing import Any

import zmq

from kvindex_service import Indexer
from kvindex_service.events import Subscriber

from .pod import SimPod

__all__ = ["AccuracyStats", "IngestTimeout", "KvindexFeed"]


class IngestTimeout(RuntimeError):
    """kvindex did not apply the published events in time (lost messages, stuck subscriber)."""


@dataclass
class AccuracyStats:
    """Index view of the chosen pod vs. that pod's true block pool, per prompt block."""

    decisions: int = 0
    blocks: int = 0
    false_hits: int = 0
    """Blocks the index says the pod holds but its pool does not."""
    false_misses: int = 0
    """Blocks the pool holds but the index does not know about."""
    prefix_mismatches: int = 0
    """Decisions where the index's matched prefix length differed from the true one."""

    @property
    def accuracy(self) -> float | None:
        if not self.blocks:
            return None
        return 1.0 - (self.false_hits + self.false_misses) / self.blocks

    def as_dict(self) -> dict[str, Any]:
        return {
            "decisions": self.decisions,
            "blocks": self.blocks,
            "false_hit_blocks": self.false_hits,
            "false_miss_blocks": self.false_misses,
            "prefix_mismatch_decisions": self.prefix_mismatches,
            "accuracy": self.accuracy,
        }


class KvindexFeed:
    """An Indexer subscribed to every pod's publisher, with a deterministic ``sync``."""

    def __init__(
        self,
        pods: Sequence[SimPod],
        ctx: zmq.Context[Any],
        *,
        model: str,
        hash_seed: str | None = None,
        sync_timeout: float = 30.0,
    ) -> None:
        if not pods or any(p.publisher is None for p in pods):
            raise ValueError("kvindex needs every simulated pod to publish events")
        self.pods = list(pods)
        self.model = model
        self.sync_timeout = sync_timeout
        self.indexer = Indexer(block_size=pods[0].block_size, hash_seed=hash_seed, algorithm="sha256_cbor", shards=1)
        self.accuracy = AccuracyStats()
        self.sync_waits = 0
        del ctx  # the subscriber owns its sockets
        self.subscriber = Subscriber(self.indexer)
        self.subscriber_kind = "kvindex_service.events.Subscriber"
        for p in self.pods:
            assert p.publisher is not None
            self.subscriber.add_pod(p.publisher.endpoint, pod_id=p.pod_id, replay_endpoint=p.publisher.replay_endpoint)
        self.subscriber.start()
        for p in self.pods:
            assert p.publisher is not None
            if not p.publisher.wait_subscribed(10.0):
                self.close()
                raise IngestTimeout(f"kvindex did not subscribe to pod {p.pod_id} within 10 s")

    def sync(self) -> None:
        """Return once kvindex has applied every batch published so far.

        Two explicit barriers, no reliance on timing:

        1. per pod, the core's ``last_seq`` reaches the publisher's: the pod's last batch
           has been received by the subscriber and handed to the core. The core records a
           batch's sequence number when it *starts* applying it, so this alone says the
           batch is being applied, not that it has been;
        2. ``Indexer.flush``: a barrier queued on every shard behind those batches,
           acknowledged once everything before it is applied.

        Checking the sequence numbers after a flush instead (the order used before) lets a
        decision read a half-applied batch whenever the shard worker is preempted
        mid-batch, as happens on a loaded machine. The wait is bounded by ``sync_timeout``
        only to turn a lost message into an error (``IngestTimeout``) instead of a hang;
        it never changes a result.
        """
        deadline = time.monotonic() + self.sync_timeout
        pending = [p for p in self.pods if p.publisher is not None and p.publisher.last_seq is not None]
        pause = 0.00005
        while pending:
            still = []
            for p in pending:
                assert p.publisher is not None
                state = self.indexer.pod_state(p.pod_id)
                target = p.publisher.last_seq
                if state is None or state.last_seq is None or target is None or state.last_seq < target:
                    still.append(p)
            pending = still
            if not pending:
                break
            self.sync_waits += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise IngestTimeout(
                    f"kvindex did not receive the events of {[p.pod_id for p in pending]} within {self.sync_timeout} s"
                )
            # Wait for what the subscriber has received to reach the core (returns at once
            # when nothing new has arrived yet, hence the pause). The pause doubles up to
            # 2 ms: spinning here held the GIL the subscriber needs to make progress.
            self.subscriber.sync(min(1.0, remaining))
            time.sleep(pause)
            pause = min(2 * pause, 0.002)
        if not self.indexer.flush(max(0.0, deadline - time.monotonic())):
            raise IngestTimeout(f"kvindex did not apply the events it received within {self.sync_timeout} s")

    def check(self, pod: SimPod, keys: Sequence[int]) -> None:
        """Compare the index's view of ``pod`` with its true pool for a prompt's block keys
        (as the pod hashes them; the Indexer hashes the same way)."""
        in_index = list(map(bool, self.indexer.lookup(self.model, keys, pods=[pod.pod_id])))
        in_pool = pod.pool.held(keys)
        acc = self.accuracy
        acc.decisions += 1
        acc.blocks += len(keys)
        acc.false_hits += sum(map(gt, in_index, in_pool))  # True > False: indexed, not held
        acc.false_misses += sum(map(lt, in_index, in_pool))
        if len(list(takewhile(bool, in_index))) != len(list(takewhile(bool, in_pool))):
            acc.prefix_mismatches += 1

    def close(self) -> None:
        try:
            self.subscriber.stop()
        finally:
            self.indexer.close()
