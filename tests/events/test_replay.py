"""Gaps and mid-stream joins filled from a real ROUTER serving vLLM's captured replay frames."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import zmq

from kvindex_service import Indexer
from kvindex_service.events import PodEndpoint, Subscriber
from tests.conftest import VLLM_VERSIONS, load_vllm_capture
from tests.events.helpers import (
    WAIT,
    Ctx,
    Publisher,
    Rig,
    check_expect,
    fixture_replies,
    fixture_request,
    stored_batch,
    wait_until,
)

FAST = {"replay_timeout": 0.2, "replay_retries": 1, "replay_backoff": 0.01}


def running(
    rig: Rig, capture: dict[str, Any], replay_endpoint: str | None, **kw: Any
) -> tuple[Indexer, Subscriber, dict[str, Publisher]]:
    """Both capture pods in connect mode; the first one with ``replay_endpoint``."""
    first, second = sorted({m["pod"] for m in capture["messages"]})
    ix = rig.indexer(capture)
    pubs = {first: rig.publisher(), second: rig.publisher()}
    pods = [PodEndpoint(pubs[first].endpoint, replay_endpoint=replay_endpoint), PodEndpoint(pubs[second].endpoint)]
    return ix, rig.subscriber(ix, pods=pods, probe=pubs.values(), **kw), pubs


def _first_pod(capture: dict[str, Any]) -> str:
    pod: str = capture["replay_from_seq_2_of_first_pod"]["pod"]
    return pod


def _publish_skipping(
    capture: dict[str, Any],
    sub: Subscriber,
    pubs: dict[str, Publisher],
    ix: Indexer,
    skip: Callable[[dict[str, Any]], bool],
) -> None:
    """Publish every message but the skipped ones. After each, the publishing pod must match
    vLLM's expectation (the other pod may still lack the skipped batches); at the end, all."""
    for msg in capture["messages"]:
        if skip(msg):
            continue
        pubs[msg["pod"]].send_wait(sub, msg["frames"])
        check_expect(ix, capture, {msg["pod"]: msg["expect_after"][msg["pod"]]})
    check_expect(ix, capture, capture["messages"][-1]["expect_after"])


@pytest.mark.parametrize("last_skipped", [2, 4])
@pytest.mark.parametrize("version", VLLM_VERSIONS)
def test_gap_filled_from_captured_replay(version: str, last_skipped: int, rig: Rig) -> None:
    capture = load_vllm_capture(version)
    pod = _first_pod(capture)
    router = rig.router(lambda start: fixture_replies(capture))
    ix, sub, pubs = running(rig, capture, router.endpoint)
    _publish_skipping(capture, sub, pubs, ix, lambda m: m["pod"] == pod and 2 <= m["seq"] <= last_skipped)
    # The request on the wire is exactly the one vLLM's own client sent.
    assert router.requests == [fixture_request(capture)]
    state = sub.pod_state(pod)
    assert state is not None
    assert (state["gaps"], state["replays"], state["unrecoverable_gaps"]) == (1, 1, 0)
    assert state["replayed_batches"] == last_skipped - 1
    assert state["batches_applied"] == 6 and state["last_seq"] == 5
    assert state["unknown_parents"] == 0
    stats = sub.stats()
    assert stats["replayed_batches"] == last_skipped - 1
    assert stats["malformed_replay"] == 0 and stats["replays_in_progress"] == 0


def _shaped(capture: dict[str, Any], msg: dict[str, Any]) -> list[bytes]:
    """A live message in the reply shape of the capture's vLLM version."""
    topic, seq, payload = msg["frames"]
    four = len(fixture_replies(capture)[0]) == 4
    return [b"", topic, seq, payload] if four else [b"", seq, payload]


@pytest.mark.parametrize("version", VLLM_VERSIONS)
def test_mid_stream_join_replays_from_zero(version: str, rig: Rig) -> None:
    """The subscriber first hears the pod at seq 4: it asks for everything from 0. The ROUTER
    answers with batches 0-1 (the capture's live frames in the version's reply shape) followed
    by the captured replay frames for 2-5."""
    capture = load_vllm_capture(version)
    pod = _first_pod(capture)
    early = [_shaped(capture, m) for m in capture["messages"] if m["pod"] == pod and m["seq"] < 2]
    router = rig.router(lambda start: early + fixture_replies(capture))
    ix, sub, pubs = running(rig, capture, router.endpoint)
    _publish_skipping(capture, sub, pubs, ix, lambda m: m["pod"] == pod and m["seq"] < 4)
    assert router.requests == [[b"", b"\x00" * 8]]
    state = sub.pod_state(pod)
    assert state is not None
    assert (state["gaps"], state["replayed_batches"], state["unrecoverable_gaps"]) == (1, 4, 0)
    assert state["batches_applied"] == 6


def test_mid_stream_join_beyond_the_buffer_is_unrecoverable(rig: Rig) -> None:
    """The ROUTER only holds 2-5 (exactly the captured frames): 0-1 are lost for good."""
    capture = load_vllm_capture("0.24.0")
    pod = _first_pod(capture)
    router = rig.router(lambda start: fixture_replies(capture))
    ix, sub, pubs = running(rig, capture, router.endpoint)
    by_seq = {m["seq"]: m for m in capture["messages"] if m["pod"] == pod}
    pubs[pod].send_wait(sub, by_seq[4]["frames"])
    state = sub.pod_state(pod)
    assert state is not None
    assert (state["gaps"], state["replays"], state["unrecoverable_gaps"]) == (1, 1, 1)
    assert state["replayed_batches"] == 2  # 2 and 3; 5 is not in the missing range
    assert state["last_seq"] == 4 and state["batches_applied"] == 3
    pubs[pod].send_wait(sub, by_seq[5]["frames"])
    assert sub.pod_state(pod)["last_seq"] == 5  # type: ignore[index]
    assert sub.stats()["unrecoverable_gaps"] == 1


def test_gap_without_replay_endpoint_is_unrecoverable(rig: Rig) -> None:
    capture = load_vllm_capture("0.26.0")
    pod = _first_pod(capture)
    ix, sub, pubs = running(rig, capture, None)
    by_seq = {m["seq"]: m for m in capture["messages"] if m["pod"] == pod}
    for seq in (0, 1, 4):
        pubs[pod].send_wait(sub, by_seq[seq]["frames"])
    state = sub.pod_state(pod)
    assert state is not None
    assert (state["gaps"], state["replays"], state["unrecoverable_gaps"]) == (1, 0, 1)
    assert state["last_seq"] == 4 and state["batches_applied"] == 3


def _absent_endpoint() -> str:
    """An endpoint nobody listens on (bound once, then closed)."""
    ctx: Ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind("tcp://127.0.0.1:*")
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    sock.close(linger=0)
    ctx.term()
    return endpoint


@pytest.mark.parametrize("router_kind", ["absent", "silent"])
def test_replay_timeouts_are_retried_then_unrecoverable(router_kind: str, rig: Rig) -> None:
    capture = load_vllm_capture("0.33.0")
    pod = _first_pod(capture)
    router = rig.router(lambda start: fixture_replies(capture), ignore_first=99) if router_kind == "silent" else None
    endpoint = router.endpoint if router else _absent_endpoint()
    ix, sub, pubs = running(rig, capture, endpoint, **FAST)
    by_seq = {m["seq"]: m for m in capture["messages"] if m["pod"] == pod}
    for seq in (0, 1, 4, 5):
        pubs[pod].send_wait(sub, by_seq[seq]["frames"])
    state = sub.pod_state(pod)
    assert state is not None
    assert (state["gaps"], state["unrecoverable_gaps"]) == (1, 1)
    assert state["replays"] == 2 and state["replay_timeouts"] == 2  # 1 try + 1 retry
    assert state["replayed_batches"] == 0
    assert state["last_seq"] == 5 and state["batches_applied"] == 4
    if router is not None:
        assert router.requests == [fixture_request(capture)] * 2


def test_retry_after_a_lost_reply_fills_the_gap(rig: Rig) -> None:
    capture = load_vllm_capture("0.23.0")
    pod = _first_pod(capture)
    router = rig.router(lambda start: fixture_replies(capture), ignore_first=1)
    ix, sub, pubs = running(rig, capture, router.endpoint, **FAST)
    _publish_skipping(capture, sub, pubs, ix, lambda m: m["pod"] == pod and m["seq"] in (2, 3))
    state = sub.pod_state(pod)
    assert state is not None
    assert (state["replays"], state["replay_timeouts"], state["unrecoverable_gaps"]) == (2, 1, 0)
    assert state["replayed_batches"] == 2
    assert router.requests == [fixture_request(capture)] * 2


def test_other_pods_flow_while_a_replay_is_pending(rig: Rig) -> None:
    capture = load_vllm_capture("0.26.0")
    first = _first_pod(capture)
    router = rig.router(lambda start: fixture_replies(capture), hold=True)
    ix, sub, pubs = running(rig, capture, router.endpoint, replay_timeout=60.0)
    msgs = {(m["pod"], m["seq"]): m for m in capture["messages"]}
    second = next(p for p in pubs if p != first)
    for seq in (0, 1):
        pubs[first].send_wait(sub, msgs[first, seq]["frames"])
    pubs[first].send(msgs[first, 4]["frames"])  # gap: 2-3 missing
    assert router.received.wait(WAIT)
    pubs[first].send(msgs[first, 5]["frames"])  # held behind the replay
    wait_until(
        lambda: (sub.pod_state(first) or {}).get("pending_messages") == 1,
        what="live batch held behind the replay",
    )
    for seq in (0, 1):
        pubs[second].send(msgs[second, seq]["frames"])
    wait_until(lambda: getattr(ix.pod_state(second), "last_seq", None) == 1, what="second pod applied")
    check_expect(ix, capture, {second: msgs[second, 1]["expect_after"][second]})
    state = sub.pod_state(first)
    assert state is not None and state["replay_in_progress"] is True
    assert state["last_seq"] == 1  # nothing after the gap reached the core yet
    assert sub.sync(0.01) is False  # the held batches are not applied yet
    router.release()
    assert sub.sync(WAIT)
    check_expect(ix, capture, capture["messages"][-1]["expect_after"])
    state = sub.pod_state(first)
    assert state is not None
    assert (state["replayed_batches"], state["unrecoverable_gaps"]) == (2, 0)
    assert state["pending_messages"] == 0 and state["replay_in_progress"] is False


def test_too_many_held_batches_abandon_the_replay(rig: Rig) -> None:
    """Live batches held behind a replay are capped at rcvhwm; past that the replay is given up
    (counted) and the held batches are applied in order."""
    ix = rig.indexer(block_size=16, shards=2)
    tokens = list(range(16 * 10))
    keys = ix.block_keys(tokens)
    router = rig.router(lambda start: [], hold=True)
    pub = rig.publisher()
    pods = [PodEndpoint(pub.endpoint, replay_endpoint=router.endpoint)]
    sub = rig.subscriber(ix, pods=pods, rcvhwm=2, replay_timeout=60.0, probe=[pub])

    def frames(seq: int) -> list[bytes]:
        parent = keys[seq - 1] if seq else None
        return [b"kv@p@m", seq.to_bytes(8, "big"), stored_batch([keys[seq]], parent, tokens[16 * seq : 16 * seq + 16])]

    pub.send_wait(sub, frames(0))
    pub.send(frames(5))  # gap 1-4, replay held
    assert router.received.wait(WAIT)
    for seq in (6, 7, 8):
        pub.send(frames(seq))
    wait_until(
        lambda: (sub.pod_state("p") or {}).get("last_seq_received") == 8,
        what="held batches applied after the replay was abandoned",
    )
    assert sub.sync(WAIT)
    state = sub.pod_state("p")
    assert state is not None
    assert (state["gaps"], state["unrecoverable_gaps"], state["replayed_batches"]) == (1, 1, 0)
    assert state["batches_applied"] == 5 and state["last_seq"] == 8
    # Block 5's parent (block 4) was never seen, so 5 cannot be keyed, nor 6-8 after it.
    assert state["unknown_parents"] == 4
