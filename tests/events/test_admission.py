"""Edge checks with real sockets: publisher authenticity (peer address), the pod budget, idle
expiry of bind-mode pods, name lengths, and sanitised logs."""

from __future__ import annotations

import logging

import pytest

from kvindex_service.events.admission import safe_text
from tests.events.helpers import Rig, stored_batch, wait_until

MODEL = "m"
TOKENS = list(range(16))


def _msg(pod: str, seq: int = 0, model: str = MODEL, h: int = 1) -> list[bytes]:
    return [f"kv@{pod}@{model}".encode(), seq.to_bytes(8, "big"), stored_batch([h], None, TOKENS)]


def _settle(rig: Rig, sub: object, pub: object, before: int, n: int) -> None:
    wait_until(lambda: sub.stats()["messages_received"] >= before + n, what="messages received")  # type: ignore[attr-defined]
    assert sub.sync(10)  # type: ignore[attr-defined]


def test_loopback_publisher_cannot_speak_for_another_ip(rig: Rig) -> None:
    ix = rig.indexer()
    sub = rig.subscriber(ix, bind="tcp://127.0.0.1:*", verify_peer=True)
    pub = rig.bound_publisher(sub)
    before = sub.stats()["messages_received"]
    pub.send(_msg("10.9.9.9:8000"))
    pub.send(_msg("127.0.0.1:8000"))
    _settle(rig, sub, pub, before, 2)
    pods = {s.pod for s in ix.pod_states()}
    assert pods == {"127.0.0.1:8000"}
    assert sub.rejections()["peer_mismatch"] == 1
    assert sub.stats()["rejected_peer_mismatch"] == 1
    assert ix.score(MODEL, TOKENS, pods=["127.0.0.1:8000"]).scores[0].matched_blocks == 1


def test_verification_off_accepts_any_pod(rig: Rig) -> None:
    ix = rig.indexer()
    sub = rig.subscriber(ix, bind="tcp://127.0.0.1:*", verify_peer=False)
    pub = rig.bound_publisher(sub)
    before = sub.stats()["messages_received"]
    pub.send(_msg("10.9.9.9:8000"))
    _settle(rig, sub, pub, before, 1)
    assert {s.pod for s in ix.pod_states()} == {"10.9.9.9:8000"}
    assert sum(sub.rejections().values()) == 0


@pytest.mark.parametrize(("allowed", "accepted"), [(["10.0.0.0/8"], False), (["127.0.0.0/8"], True)])
def test_allowed_publishers_for_names_that_are_not_ip_port(rig: Rig, allowed: list[str], accepted: bool) -> None:
    ix = rig.indexer()
    sub = rig.subscriber(ix, bind="tcp://127.0.0.1:*", verify_peer=True, allowed_publishers=allowed)
    pub = rig.bound_publisher(sub)
    before = sub.stats()["messages_received"]
    pub.send(_msg("vllm-a"))
    _settle(rig, sub, pub, before, 1)
    assert ({s.pod for s in ix.pod_states()} == {"vllm-a"}) is accepted
    assert sub.rejections()["peer_not_allowed"] == (0 if accepted else 1)


def test_max_pods_drops_and_counts_new_topics(rig: Rig) -> None:
    ix = rig.indexer()
    sub = rig.subscriber(ix, bind="tcp://127.0.0.1:*", max_pods=3)
    pub = rig.bound_publisher(sub)
    before = sub.stats()["messages_received"]
    for i in range(6):
        pub.send(_msg(f"10.0.0.{i}:8000"))
    pub.send(_msg("10.0.0.0:8000", seq=1, h=2))  # a known pod keeps publishing
    _settle(rig, sub, pub, before, 7)
    assert sorted(s.pod for s in ix.pod_states()) == ["10.0.0.0:8000", "10.0.0.1:8000", "10.0.0.2:8000"]
    assert sub.rejections()["pod_limit"] == 3
    assert sub.stats()["pods"] == 3
    state = sub.pod_state("10.0.0.0:8000")
    assert state is not None and state["last_seq"] == 1


def test_max_pods_is_one_budget_with_configured_pods(rig: Rig) -> None:
    ix = rig.indexer()
    target = rig.publisher()  # a connect-mode pod, counted even before it publishes
    sub = rig.subscriber(ix, bind="tcp://127.0.0.1:*", max_pods=2)
    sub.add_pod(target.endpoint, pod_id="10.1.0.1:8000")
    pub = rig.bound_publisher(sub)
    before = sub.stats()["messages_received"]
    pub.send(_msg("10.0.0.1:8000"))
    pub.send(_msg("10.0.0.2:8000"))
    _settle(rig, sub, pub, before, 2)
    assert {s.pod for s in ix.pod_states()} == {"10.0.0.1:8000"}
    assert sub.rejections()["pod_limit"] == 1
    from kvindex_service.events.admission import PodLimitError

    with pytest.raises(PodLimitError):
        sub.add_pod("tcp://127.0.0.1:1", pod_id="10.1.0.2:8000")


def test_idle_bind_pods_expire_but_configured_ones_stay(rig: Rig) -> None:
    ix = rig.indexer()
    target = rig.publisher()
    sub = rig.subscriber(ix, bind="tcp://127.0.0.1:*", pod_idle_timeout=1.5)
    sub.add_pod(target.endpoint, pod_id="10.1.0.1:8000")
    target.probe(sub)
    pub = rig.bound_publisher(sub)
    target.send_wait(sub, _msg("whatever"))
    pub.send_wait(sub, _msg("10.0.0.1:8000"))
    assert {s.pod for s in ix.pod_states()} == {"10.0.0.1:8000", "10.1.0.1:8000"}
    wait_until(lambda: sub.stats()["pods_expired"] == 1, what="the idle bind-mode pod expired")
    assert sub.pod_state("10.0.0.1:8000") is None
    assert ix.score(MODEL, TOKENS, pods=["10.0.0.1:8000"]).scores[0].matched_blocks == 0
    # the configured pod is as silent, but never expires
    assert {s.pod for s in ix.pod_states()} == {"10.1.0.1:8000"}
    assert sub.pod_state("10.1.0.1:8000") is not None


def test_long_names_are_refused_and_never_logged_in_full(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    ix = rig.indexer()
    sub = rig.subscriber(ix, bind="tcp://127.0.0.1:*")
    pub = rig.bound_publisher(sub)
    caplog.set_level(logging.DEBUG, logger="kvindex_service")
    before = sub.stats()["messages_received"]
    pub.send(_msg("p" * 100_000))
    pub.send(_msg("p" * 300))
    pub.send(_msg("10.0.0.1:8000", model="m" * 300))
    pub.send(_msg("10.0.0.2:8000\nFORGED line", seq=0))
    _settle(rig, sub, pub, before, 4)
    rejected = sub.rejections()
    assert rejected["pod_id_too_long"] == 2 and rejected["model_too_long"] == 1
    assert {s.pod for s in ix.pod_states()} == {"10.0.0.2:8000\nFORGED line"}
    sub.remove_pod("10.0.0.2:8000\nFORGED line")
    text = caplog.text
    assert "p" * 200 not in text and "m" * 200 not in text
    assert "\nFORGED" not in text and "\\nFORGED" in text


def test_connect_mode_link_speaks_for_one_pod(rig: Rig) -> None:
    """No configured pod id: the first pod a link names pins it; with a configured pod id the
    topic's pod is replaced by it (never another pod)."""
    ix = rig.indexer()
    free = rig.publisher()
    pinned = rig.publisher()
    sub = rig.subscriber(ix, verify_peer=True)
    sub.add_pod(free.endpoint)
    sub.add_pod(pinned.endpoint, pod_id="10.7.0.1:8000")
    free.probe(sub)
    pinned.probe(sub)
    free.send_wait(sub, _msg("10.9.9.9:8000"))  # the publisher is on 127.0.0.1
    free.send_wait(sub, _msg("127.0.0.1:8000"))
    free.send_wait(sub, _msg("127.0.0.1:9000"))  # another pod through the same link
    pinned.send_wait(sub, _msg("10.9.9.9:8000"))  # re-attributed to the configured pod
    assert {s.pod for s in ix.pod_states()} == {"127.0.0.1:8000", "10.7.0.1:8000"}
    rejected = sub.rejections()
    assert rejected["peer_mismatch"] == 1 and rejected["other_pod"] == 1


def test_safe_text() -> None:
    assert safe_text("a\nb\x1b") == "a\\nb\\x1b"
    long = safe_text("x" * 1000)
    assert long.startswith("x" * 80) and "(+920 chars)" in long and len(long) < 100
