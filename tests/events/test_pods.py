"""Pods added and removed at run time, lifecycle, and configuration errors."""

from __future__ import annotations

import json
import threading

import pytest

from kvindex_service.events import PodEndpoint, Subscriber
from tests.conftest import load_vllm_capture
from tests.events.helpers import Rig, check_expect, make_indexer


def test_add_and_remove_pods_at_run_time(rig: Rig) -> None:
    capture = load_vllm_capture("0.33.0")
    msgs = capture["messages"]
    first, second = "10.0.0.1:8000", "10.0.0.2:8000"
    ix = rig.indexer(capture)
    pub1, pub2 = rig.publisher(), rig.publisher()
    sub = rig.subscriber(ix)
    assert sub.running and sub.endpoints() == [] and sub.pod_states() == []
    spec = sub.add_pod(pub1.endpoint)
    assert spec == PodEndpoint(pub1.endpoint)
    # Known endpoint, pod id not known until it publishes.
    [silent] = sub.pod_states()
    assert silent["pod"] is None and silent["endpoint"] == pub1.endpoint
    pub1.probe(sub)
    # The second pod is added from another thread while the first one publishes.
    added: list[PodEndpoint] = []
    adder = threading.Thread(
        target=lambda: added.append(sub.add_pod(pub2.endpoint, replay_endpoint="tcp://127.0.0.1:1"))
    )
    adder.start()
    for msg in [m for m in msgs if m["pod"] == first][:3]:
        pub1.send_wait(sub, msg["frames"])
    adder.join(10)
    assert added == [PodEndpoint(pub2.endpoint, replay_endpoint="tcp://127.0.0.1:1")]
    pub2.probe(sub)
    pub2.send_wait(sub, [m for m in msgs if m["pod"] == second][0]["frames"])
    assert {e.endpoint for e in sub.endpoints()} == {pub1.endpoint, pub2.endpoint}
    states = {s["pod"]: s for s in sub.pod_states()}
    assert set(states) == {first, second}
    assert states[second]["replay_endpoint"] == "tcp://127.0.0.1:1"
    json.dumps(sub.pod_states())  # plain data all the way down

    with pytest.raises(ValueError, match="already"):
        sub.add_pod(pub1.endpoint)
    with pytest.raises(ValueError):
        sub.add_pod("tcp://nohost")
    with pytest.raises(ValueError):
        sub.add_pod("udp://127.0.0.1:5557")
    with pytest.raises(ValueError):
        sub.add_pod("tcp://127.0.0.1:5557", replay_endpoint="tcp://*:5558")

    # Remove the first pod by pod id: disconnected, gone from the index.
    assert sub.remove_pod(first) is True
    assert sub.sync()
    assert ix.pod_state(first) is None
    assert sub.pod_state(first) is None
    assert [e.endpoint for e in sub.endpoints()] == [pub2.endpoint]
    assert sub.remove_pod(first) is False
    # The second one by endpoint.
    assert sub.remove_pod(pub2.endpoint) is True
    assert sub.sync()
    assert ix.pod_state(second) is None and sub.endpoints() == []
    assert sub.remove_pod("nobody") is False
    # The removed endpoint can be added again and works from a clean slate.
    sub.add_pod(pub1.endpoint, pod_id="pod-a")
    pub1.probe(sub)
    pub1.send_wait(sub, msgs[0]["frames"])
    check_expect(ix, capture, {first: msgs[0]["expect_after"][first]}, rename={first: "pod-a"})
    stats = sub.stats()
    assert (stats["pods_added"], stats["pods_removed"]) == (3, 2)


def test_remove_a_bind_mode_pod(rig: Rig) -> None:
    capture = load_vllm_capture("0.24.0")
    ix = rig.indexer(capture)
    sub = rig.subscriber(ix, bind="tcp://127.0.0.1:*")
    pub = rig.bound_publisher(sub)
    for msg in capture["messages"][:2]:
        pub.send_wait(sub, msg["frames"])
    assert sub.remove_pod("10.0.0.1:8000")
    assert sub.sync()
    assert ix.pod_state("10.0.0.1:8000") is None
    assert [s["pod"] for s in sub.pod_states()] == ["10.0.0.2:8000"]
    # If it publishes again it is a new pod: a mid-stream join (its batch 2; a first batch 1
    # would start a stream numbered from 1), counted as a gap.
    pub.send_wait(sub, capture["messages"][3]["frames"])
    state = sub.pod_state("10.0.0.1:8000")
    assert state is not None and state["gaps"] == 1 and state["unrecoverable_gaps"] == 1


def test_pods_configured_before_start_and_removed_after_stop(rig: Rig) -> None:
    ix = rig.indexer()
    pub = rig.publisher()
    sub = rig.subscriber(ix, pods=[PodEndpoint(pub.endpoint, pod_id="a")], start=False)
    assert not sub.running and sub.bound_endpoint is None
    assert sub.pod_states()[0]["subscribed"] is False
    sub.add_pod("tcp://127.0.0.1:9", pod_id="b")
    try:
        sub.start()
        assert sub.running
        states = {s["pod"]: s for s in sub.pod_states()}
        assert states["a"]["subscribed"] and states["b"]["subscribed"]
        with pytest.raises(RuntimeError):
            sub.start()
    finally:
        sub.stop()
    sub.stop()  # idempotent
    assert not sub.running
    assert sub.remove_pod("a") is True
    assert [e.pod_id for e in sub.endpoints()] == ["b"]
    with pytest.raises(RuntimeError):
        sub.add_pod("tcp://127.0.0.1:10")


def test_constructor_validation() -> None:
    ix = make_indexer()
    try:
        bad_kwargs: list[dict[str, object]] = [
            {"bind": "tcp://127.0.0.1"},
            {"pods": [PodEndpoint("tcp://h:1"), PodEndpoint("tcp://h:1")]},
            {"pods": [PodEndpoint("tcp://h:1", pod_id="x"), PodEndpoint("tcp://h:2", pod_id="x")]},
            {"pods": [PodEndpoint("tcp://h:1", pod_id="")]},
            {"pods": ["tcp://h:1"]},
            {"rcvhwm": 0},
            {"replay_timeout": 0},
            {"replay_timeout": float("nan")},
            {"replay_retries": -1},
            {"replay_backoff": -0.1},
            {"max_message_bytes": 0},
        ]
        for kwargs in bad_kwargs:
            with pytest.raises(ValueError):
                Subscriber(ix, **kwargs)  # type: ignore[arg-type]
    finally:
        ix.close()


def test_bind_failure_raises_and_cleans_up() -> None:
    ix = make_indexer()
    first = Subscriber(ix, bind="tcp://127.0.0.1:*")
    try:
        first.start()
        assert first.bound_endpoint is not None
        second = Subscriber(ix, bind=first.bound_endpoint)
        with pytest.raises(OSError):
            second.start()
        assert not second.running
        second.stop()
    finally:
        first.stop()
        ix.close()
