"""Every capture's real frames through real PUB sockets into the subscriber, in both modes."""

from __future__ import annotations

from typing import Any

import pytest

from kvindex_service.events import PodEndpoint, Subscriber
from tests.conftest import VLLM_VERSIONS, load_vllm_capture
from tests.events.helpers import Publisher, Rig, check_expect


def _pods(capture: dict[str, Any]) -> list[str]:
    return sorted({m["pod"] for m in capture["messages"]})


def _replay_capture(
    capture: dict[str, Any], sub: Subscriber, pubs: dict[str, Publisher], ix: Any, rename: dict[str, str] | None = None
) -> None:
    for msg in capture["messages"]:
        pubs[msg["pod"]].send_wait(sub, msg["frames"])
        check_expect(ix, capture, msg["expect_after"], rename)


@pytest.mark.parametrize("version", VLLM_VERSIONS)
def test_connect_mode(version: str, rig: Rig) -> None:
    capture = load_vllm_capture(version)
    ix = rig.indexer(capture)
    pubs = {pod: rig.publisher() for pod in _pods(capture)}
    sub = rig.subscriber(ix, pods=[PodEndpoint(p.endpoint) for p in pubs.values()], probe=pubs.values())
    _replay_capture(capture, sub, pubs, ix)
    stats = sub.stats()
    assert stats["messages_applied"] == len(capture["messages"])
    assert stats["malformed_frames"] == stats["messages_received"] - len(capture["messages"])
    assert stats["gaps"] == stats["resets"] == stats["unrecoverable_gaps"] == 0
    for state in sub.pod_states():
        pod_msgs = [m for m in capture["messages"] if m["pod"] == state["pod"]]
        assert state["mode"] == "connect"
        assert state["endpoint"] == pubs[state["pod"]].endpoint
        assert state["subscribed"] is True
        assert state["last_seq"] == state["last_seq_received"] == pod_msgs[-1]["seq"]
        assert state["batches_applied"] == state["messages_received"] == len(pod_msgs)
        assert state["models"] == [capture["model"]]
        assert state["hashes_match"] is True
        assert state["decode_errors"] == 0
    sub.stop()
    assert not sub.running


@pytest.mark.parametrize("version", VLLM_VERSIONS)
def test_bind_mode(version: str, rig: Rig) -> None:
    capture = load_vllm_capture(version)
    ix = rig.indexer(capture)
    sub = rig.subscriber(ix, bind="tcp://127.0.0.1:*")
    endpoint = sub.bound_endpoint
    assert endpoint is not None and not endpoint.endswith(":*")
    pubs = {pod: rig.bound_publisher(sub) for pod in _pods(capture)}
    _replay_capture(capture, sub, pubs, ix)
    states = {s["pod"]: s for s in sub.pod_states()}
    assert set(states) == set(pubs)
    for state in states.values():
        assert state["mode"] == "bind"
        assert state["endpoint"] == endpoint
        assert state["gaps"] == 0


def test_pod_id_override_and_both_modes_at_once(rig: Rig) -> None:
    """First pod through a connect socket under an explicit pod id (the topic's id is then
    ignored); second pod through the bound endpoint under its topic id."""
    capture = load_vllm_capture("0.33.0")
    first, second = _pods(capture)
    ix = rig.indexer(capture)
    pub1 = rig.publisher()
    sub = rig.subscriber(ix, bind="tcp://127.0.0.1:*", pods=[PodEndpoint(pub1.endpoint, pod_id="pod-a")])
    pub2 = rig.bound_publisher(sub)
    pub1.probe(sub)
    _replay_capture(capture, sub, {first: pub1, second: pub2}, ix, rename={first: "pod-a"})
    assert ix.pod_state(first) is None
    states = {s["pod"]: s for s in sub.pod_states()}
    assert set(states) == {"pod-a", second}
    assert states["pod-a"]["mode"] == "connect"
    assert states["pod-a"]["endpoint"] == pub1.endpoint
    assert states[second]["mode"] == "bind"
    by_endpoint = sub.pod_state(pub1.endpoint)
    assert by_endpoint is not None and by_endpoint["pod"] == "pod-a"
    assert by_endpoint["batches_applied"] == 6


def test_publisher_restart_clears_the_pod(rig: Rig) -> None:
    capture = load_vllm_capture("0.26.0")
    ix = rig.indexer(capture)
    sub = rig.subscriber(ix, bind="tcp://127.0.0.1:*")
    pub = rig.bound_publisher(sub)
    for msg in capture["messages"]:
        pub.send_wait(sub, msg["frames"])
    final = capture["messages"][-1]["expect_after"]
    first = capture["messages"][0]
    pod = first["pod"]
    # The first pod restarts: its seq goes back to 0 with a new first batch. Without a
    # clear, blocks of the old process would linger (P2 would stay at 3 blocks).
    assert final[pod]["P2"] == 3
    pub.send_wait(sub, first["frames"])
    check_expect(ix, capture, {pod: first["expect_after"][pod]})
    others = {p: e for p, e in final.items() if p != pod}
    check_expect(ix, capture, others)
    state = sub.pod_state(pod)
    assert state is not None
    assert state["resets"] == 1 and sub.stats()["resets"] == 1
    assert state["gaps"] == 0
    assert state["last_seq"] == 0
