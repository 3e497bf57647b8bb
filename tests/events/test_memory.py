"""Memory stays bounded when the core cannot keep up: ZMQ's high-water marks drop the excess at
the publisher instead of queueing it in the subscriber, and the drops show up as gaps."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import zmq

from kvindex_service import Indexer
from tests.events.helpers import WAIT, Rig, wait_until

HWM = 50
FLOOD = 3000
PAYLOAD = b"\x00" * 65536


class GatedIndexer:
    """The real Indexer behind a gate: ``submit`` waits until the test opens it. It stands in for
    a core that cannot keep up (a full shard queue blocks ``submit`` the same way), which no
    real workload produces on demand."""

    def __init__(self, ix: Indexer) -> None:
        self.ix = ix
        self.gate = threading.Event()
        self.blocked = threading.Event()

    def submit(self, pod: str, model: str, seq: int, payload: bytes) -> bool:
        self.blocked.set()
        if not self.gate.wait(WAIT):
            raise AssertionError("gate never opened")
        return self.ix.submit(pod, model, seq, payload)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ix, name)


def test_flood_is_bounded_by_the_high_water_marks(rig: Rig, tmp_path: Path) -> None:
    ix = rig.indexer(shards=1)
    gated = GatedIndexer(ix)
    # ipc keeps kernel socket buffers small next to 64 KiB messages, so the HWMs dominate.
    sub = rig.subscriber(gated, bind=f"ipc://{tmp_path}/kv.sock", rcvhwm=HWM)
    pub = rig.bound_publisher(sub, sndhwm=HWM)
    probes = sub.stats()["messages_received"]
    topic = b"kv@flood@m"
    pub.send([topic, (0).to_bytes(8, "big"), PAYLOAD])
    assert gated.blocked.wait(WAIT)  # the loop is stuck handing batch 0 to the core
    for seq in range(1, FLOOD):
        pub.socket.send_multipart([topic, seq.to_bytes(8, "big"), PAYLOAD], zmq.NOBLOCK)
    gated.gate.set()
    pub.probe(sub)  # arrives after everything that was queued ahead of it
    assert sub.sync(WAIT)

    stats = sub.stats()
    probes = stats["malformed_frames"]  # every probe, before and after the flood
    flood_received = stats["messages_received"] - probes
    assert flood_received == stats["messages_applied"]
    # Only what fits in the two high-water marks (plus libzmq's in-flight batches) was kept.
    assert 1 <= flood_received <= 4 * HWM + 50 < FLOOD
    state = sub.pod_state("flood")
    assert state is not None
    assert state["gaps"] >= 1 and state["gaps"] == state["unrecoverable_gaps"]
    assert state["decode_errors"] == flood_received


def test_pushback_is_counted_when_the_shard_queue_is_full(rig: Rig) -> None:
    """A one-slot shard queue makes ``submit`` wait; the subscriber counts each wait."""
    ix = rig.indexer(shards=1, queue_capacity=1)
    sub = rig.subscriber(ix, bind="tcp://127.0.0.1:*")
    pub = rig.bound_publisher(sub)
    for seq in range(500):
        pub.send([b"kv@p@m", seq.to_bytes(8, "big"), PAYLOAD])
    # a probe cannot mark the end here: the 500 batches themselves move the counter
    wait_until(lambda: sub.stats()["messages_applied"] == 500, what="all 500 batches applied")
    assert sub.sync(WAIT)
    assert sub.stats()["pushbacks"] == ix.counters()["queue_pushbacks"]
