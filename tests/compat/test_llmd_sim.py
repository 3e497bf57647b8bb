"""llm-d-inference-sim's event shapes (DESIGN §8) through a real ZMQ publisher into a real
Subscriber and Indexer.

The simulator is Go, and the Go module proxy reachable here refuses it (``403 Forbidden: This
module version is not available`` for github.com/llm-d/llm-d-inference-sim and for its
dependency github.com/llm-d/llm-d-kv-cache-manager, every version), so its publisher is
modelled in the test (docs/compatibility.md#llm-d-inference-sim lists what the model leaves
out): legacy
array-encoded events whose ``parent_block_hash`` is the integer 0 for "no parent" (its map
format writes nil), batches numbered from 1, block hashes that are FNV-64a over the canonical
CBOR of ``[parent, tokens, extra]`` (never equal to kvindex's keys, so every removal goes
through the engine-hash bridge), ``token_ids``, ``block_size`` 16 and medium ``"GPU"``.
Expected scores are what the modelled simulator holds: for every prompt, the longest run of
its blocks from block 0.
"""

from __future__ import annotations

import random
from typing import Any

import cbor2
import msgpack
import pytest

from kvindex_service.events.topic import PodEndpoint
from tests.events.helpers import Rig, matched, wait_until

MODEL = "sim-model"
POD = "10.0.0.7:8000"
TOPIC = f"kv@{POD}@{MODEL}".encode()
BS = 16
END = (2**64 - 1).to_bytes(8, "big")


def fnv64a(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def sim_hashes(tokens: list[int]) -> list[int]:
    """The simulator's block hashes: FNV-64a(CBOR([parent, block tokens, extra])), from 0."""
    out, parent = [], 0
    for i in range(len(tokens) // BS):
        parent = fnv64a(cbor2.dumps([parent, tokens[i * BS : (i + 1) * BS], None], canonical=True))
        out.append(parent)
    return out


class SimPod:
    """What the simulator holds and the batches it publishes (seq from 1)."""

    def __init__(self, legacy: bool, replay_topic: bool = False) -> None:
        self.legacy = legacy
        self.replay_topic = replay_topic
        self.held: set[int] = set()
        self.seq = 0
        self.sent: list[tuple[int, bytes]] = []

    def _event(self, tag: str, **fields: Any) -> Any:
        if tag == "BlockRemoved":
            if self.legacy:
                return ["BlockRemoved", fields["block_hashes"], "GPU"]
            return {"type": "BlockRemoved", "block_hashes": fields["block_hashes"], "medium": "GPU"}
        parent = fields["parent"]
        if self.legacy:  # [tag, hashes, parent (0: none), tokens, block_size, lora_id, medium, lora_name]
            return ["BlockStored", fields["hashes"], parent or 0, fields["tokens"], BS, None, "GPU", None]
        return {
            "type": "BlockStored",
            "block_hashes": fields["hashes"],
            "parent_block_hash": parent,
            "token_ids": fields["tokens"],
            "block_size": BS,
            "medium": "GPU",
        }

    def _batch(self, events: list[Any]) -> list[bytes]:
        self.seq += 1
        payload = msgpack.packb([float(self.seq), events, 0])
        self.sent.append((self.seq, payload))
        return [TOPIC, self.seq.to_bytes(8, "big"), payload]

    def serve(self, tokens: list[int]) -> list[bytes]:
        """A request: its blocks not yet held are stored, chained on the last held one."""
        hashes = sim_hashes(tokens)
        k = 0
        while k < len(hashes) and hashes[k] in self.held:
            k += 1
        self.held.update(hashes[k:])
        parent = hashes[k - 1] if k else None
        stored = self._event("BlockStored", hashes=hashes[k:], parent=parent, tokens=tokens[k * BS : len(hashes) * BS])
        return self._batch([stored])

    def evict(self, hashes: list[int]) -> list[bytes]:
        self.held.difference_update(hashes)
        return self._batch([self._event("BlockRemoved", block_hashes=hashes)])

    def expected(self, tokens: list[int]) -> int:
        n = 0
        for h in sim_hashes(tokens):
            if h not in self.held:
                break
            n += 1
        return n

    def replies(self, start: int) -> list[list[bytes]]:
        """Its replay socket: every batch it still has from ``start``, then the end marker.
        With ``replay_topic`` (the simulator's replayer) each reply carries the topic, and the
        end marker an empty one."""
        if self.replay_topic:
            batches = [[b"", TOPIC, seq.to_bytes(8, "big"), p] for seq, p in self.sent if seq >= start]
            return [*batches, [b"", b"", END, b""]]
        return [[b"", seq.to_bytes(8, "big"), p] for seq, p in self.sent if seq >= start] + [[b"", END, b""]]


def prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    system = [rng.randrange(50_000) for _ in range(3 * BS)]
    out = [system + [rng.randrange(50_000) for _ in range(rng.randrange(0, 5 * BS))] for _ in range(6)]
    out.append([rng.randrange(50_000) for _ in range(4 * BS + 7)])  # no shared prefix, partial tail
    return out


@pytest.mark.parametrize("legacy", [True, False], ids=["array-zero-parent", "map-nil-parent"])
@pytest.mark.parametrize(
    ("with_replay", "replay_topic"),
    [(False, False), (True, False), (True, True)],
    ids=["no-replay", "replay", "replay-with-topic"],
)
def test_llm_d_sim_shapes_score_exactly(rig: Rig, legacy: bool, with_replay: bool, replay_topic: bool) -> None:
    sim = SimPod(legacy, replay_topic)
    ix = rig.indexer()
    pub = rig.publisher()
    router = rig.router(sim.replies) if with_replay else None
    replay = router.endpoint if router else None
    sub = rig.subscriber(ix, pods=[PodEndpoint(pub.endpoint, replay_endpoint=replay)], probe=[pub])
    ps = prompts(15)

    def check() -> None:
        for i, toks in enumerate(ps):
            got = matched(ix, MODEL, toks, POD) if ix.pod_state(POD) else 0
            assert got == sim.expected(toks), f"prompt {i}: {got} blocks, expected {sim.expected(toks)}"

    for toks in ps:
        pub.send_wait(sub, sim.serve(toks))
    assert sum(sim.expected(t) for t in ps) > len(ps)
    check()
    # evictions through the bridge: a tail, a shared middle block, a whole unshared prompt
    pub.send_wait(sub, sim.evict(sim_hashes(ps[0])[-1:]))
    pub.send_wait(sub, sim.evict(sim_hashes(ps[1])[2:3]))
    pub.send_wait(sub, sim.evict(sim_hashes(ps[-1])))
    check()
    assert matched(ix, MODEL, ps[-1], POD) == 0 and matched(ix, MODEL, ps[2], POD) == 2
    # re-serving brings them back, chained on the blocks still held
    for toks in ps:
        pub.send_wait(sub, sim.serve(toks))
    check()
    assert all(matched(ix, MODEL, t, POD) == len(t) // BS for t in ps)

    wait_until(lambda: sub.pod_state(POD) is not None and sub.pod_state(POD)["last_seq"] == sim.seq)
    state = sub.pod_state(POD)
    assert state is not None
    assert (state["gaps"], state["unrecoverable_gaps"], state["unknown_parents"]) == (0, 0, 0)
    if router is not None:  # batch 0 was asked for once, and the simulator had none
        assert [int.from_bytes(r[1], "big") for r in router.requests] == [0] and state["replays"] == 1
    native = ix.pod_state(POD)
    assert native is not None and native.hash_matches == 0 and native.hash_mismatches > 0
    counters = ix.counters()
    assert counters["unknown_parents"] == 0
    # every prefix root came with a 0 parent in the legacy format, with nil in the map format
    assert (counters["root_zero_parent"] > 0) == legacy
