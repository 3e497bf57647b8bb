"""Routing policies: baselines behave as named, the oracle reads true pools, and the replay
ROUTER of a simulated pod answers in vLLM's format."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import msgpack
import pytest
import zmq

from kvindex_service import TokenProcessor
from kvindex_service.sim import BlockPool, EventPublisher, Request, SimPod, make_router
from kvindex_service.sim.routers import router_names

BS = 4


class _Fleet:
    def __init__(self, pods: Sequence[SimPod], loads: Sequence[int]) -> None:
        self._pods = list(pods)
        self.loads = list(loads)

    @property
    def pods(self) -> Sequence[SimPod]:
        return self._pods

    @property
    def now(self) -> float:
        return 0.0

    def load(self, i: int) -> int:
        return self.loads[i]

    def prompt_keys(self, req: Request) -> Sequence[int]:
        return self._pods[0].processor.block_keys(req.token_ids)


def _pods(n: int) -> list[SimPod]:
    tp = TokenProcessor(BS)
    return [SimPod(f"127.0.0.1:{18001 + i}", BlockPool(32, BS), tp) for i in range(n)]


def _req(rid: int, tokens: Sequence[int], session: str | None = None) -> Request:
    return Request(rid=rid, arrival=0.0, token_ids=tuple(tokens), output_ids=(1,), session=session)


def test_round_robin_cycles_and_random_stays_in_range() -> None:
    fleet = _Fleet(_pods(3), [0, 0, 0])
    rr = make_router("round-robin", 1)
    assert [rr.pick(_req(i, [1]), fleet) for i in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    rnd = make_router("random", 1)
    picks = [rnd.pick(_req(i, [1]), fleet) for i in range(200)]
    assert set(picks) == {0, 1, 2}


def test_session_sticky_is_stable_and_least_loaded_picks_the_minimum() -> None:
    fleet = _Fleet(_pods(4), [3, 1, 5, 2])
    a, b = make_router("session-sticky", 1), make_router("session-sticky", 99)
    for s in ("alice", "bob", "carol"):
        first = a.pick(_req(0, [1], s), fleet)
        assert all(a.pick(_req(i, [i], s), fleet) == first for i in range(5))
        assert b.pick(_req(9, [2], s), fleet) == first  # a hash, not per-process state
    ll = make_router("least-loaded", 1)
    assert ll.pick(_req(0, [1]), fleet) == 1
    fleet.loads = [0, 4, 0, 4]
    assert {ll.pick(_req(i, [1]), fleet) for i in range(50)} == {0, 2}


def test_oracle_follows_the_longest_true_prefix_then_load() -> None:
    pods = _pods(3)
    prompt = list(range(100, 116))  # 4 blocks
    for pod, n in zip(pods, (1, 3, 0), strict=True):
        if n:
            alloc = pod.admit(prompt[: n * BS] + [7], 0, 0.0)
            assert alloc is not None
            pod.pool.free(alloc)
    fleet = _Fleet(pods, [9, 9, 0])
    greedy = make_router("oracle-greedy", 1)
    assert greedy.pick(_req(0, prompt), fleet) == 1  # longest prefix beats any load
    assert greedy.pick(_req(1, [5, 6, 7, 8, 9]), fleet) == 2  # no prefix anywhere: least loaded
    # The picker's utility kv * prefix - load * extra_inflight (defaults 1.0, 0.1): pod 1 holds
    # 3/4 of the prompt but runs 9 more requests than pod 2 (0.75 - 0.9 < 0), so pod 2 wins;
    # with equal loads the longer prefix wins.
    oracle = make_router("oracle", 1)
    oracle.bind(fleet)
    assert oracle.pick(_req(2, prompt), fleet) == 2
    fleet.loads = [1, 1, 1]
    assert oracle.pick(_req(3, prompt), fleet) == 1
    assert oracle.stats()["picker"]["decisions"] == {"load": 1, "kv": 1}


def test_approximate_remembers_what_it_sent_and_forgets_past_its_capacity() -> None:
    pods = _pods(2)
    fleet = _Fleet(pods, [0, 0])
    approx = make_router("approximate", 1)
    approx.bind(fleet, approx_capacity=4)
    a, b = list(range(100, 117)), list(range(200, 217))  # 4 full blocks each
    first = approx.pick(_req(0, a), fleet)
    fleet.loads[first] = 1
    assert approx.pick(_req(1, a), fleet) == first  # remembered, though no pod holds it
    fleet.loads = [0, 0]
    other = approx.pick(_req(2, b), fleet)
    if other == first:  # b pushed a out of that pod's 4-block memory
        fleet.loads = [0, 1] if first == 0 else [1, 0]
        assert approx.pick(_req(3, a), fleet) != first


def test_unknown_router_is_a_clear_error() -> None:
    assert {"kvindex", "kvindex-direct", "oracle", "oracle-greedy", "approximate", "round-robin"} <= set(router_names())
    with pytest.raises(ValueError, match="unknown router"):
        make_router("nope", 1)


def test_replay_router_answers_in_vllm_format() -> None:
    ctx = zmq.Context()
    pub = EventPublisher(ctx, "127.0.0.1:18009", "m", replay_endpoint="tcp://127.0.0.1:*", buffer_steps=3)
    dealer = ctx.socket(zmq.DEALER)
    try:
        for t in range(5):
            pub.publish(float(t), [{"type": "AllBlocksCleared"}])
        assert pub.replay_endpoint is not None
        dealer.connect(pub.replay_endpoint)
        dealer.send_multipart([b"", struct.pack(">Q", 3)])
        replies: list[list[bytes]] = []
        while dealer.poll(5000, zmq.POLLIN):
            replies.append(dealer.recv_multipart())
            if replies[-1][2] == b"\xff" * 8:
                break
        # buffer of 3 keeps seq 2..4; asked from 3 -> 3, 4, then the end marker
        assert [struct.unpack(">Q", r[2])[0] for r in replies[:-1]] == [3, 4]
        assert all(r[0] == b"" and r[1] == b"kv@127.0.0.1:18009@m" for r in replies[:-1])
        assert replies[-1] == [b"", b"", b"\xff" * 8, b""]
        payload: Any = msgpack.unpackb(replies[0][3])
        assert payload[1] == [{"type": "AllBlocksCleared"}] and payload[2] == 0
    finally:
        dealer.close(linger=0)
        pub.close()
        ctx.term()
