"""The discovery reconciler, fed with API-server-shaped pod dicts and a test clock."""

from __future__ import annotations

from typing import Any

import pytest

from kvindex_service.discovery import Ports, Reconciler, Subscribe, Unsubscribe
from kvindex_service.discovery.reconcile import Action, pod_ready


def pod(
    name: str,
    ip: str | None = "10.0.0.1",
    *,
    ready: bool = True,
    uid: str | None = None,
    deleting: bool = False,
    conditions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "uid": uid or f"uid-{name}", "resourceVersion": "1"}
    if deleting:
        meta["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    status: dict[str, Any] = {"phase": "Running" if ready else "Pending"}
    if ip is not None:
        status["podIP"] = ip
    status["conditions"] = (
        conditions if conditions is not None else [{"type": "Ready", "status": "True" if ready else "False"}]
    )
    return {"metadata": meta, "status": status}


def subs(actions: list[Action]) -> list[str]:
    return [a.target.ip for a in actions if isinstance(a, Subscribe)]


def unsubs(actions: list[Action]) -> list[tuple[str, str]]:
    return [(a.target.ip, a.reason) for a in actions if isinstance(a, Unsubscribe)]


def test_ready_pod_with_ip_is_subscribed_once() -> None:
    rec = Reconciler(Ports())
    actions = rec.upsert(pod("a"), 0.0)
    assert subs(actions) == ["10.0.0.1"]
    (target,) = [a.target for a in actions]
    assert [(e.endpoint, e.pod_id, e.replay_endpoint) for e in target.endpoints] == [
        ("tcp://10.0.0.1:5557", "10.0.0.1:8000", None)
    ]
    assert rec.upsert(pod("a"), 1.0) == []  # an unrelated MODIFIED
    assert rec.counts()["subscribed"] == 1


@pytest.mark.parametrize(
    "obj",
    [
        pod("a", ready=False),
        pod("a", ip=None),
        pod("a", deleting=True),
        pod("a", conditions=[]),
        pod("a", conditions=[{"type": "ContainersReady", "status": "True"}]),
    ],
)
def test_pods_not_wanted_are_pending(obj: dict[str, Any]) -> None:
    rec = Reconciler(Ports())
    assert rec.upsert(obj, 0.0) == []
    assert rec.state_of("a") == "pending"


def test_ready_condition() -> None:
    assert pod_ready(pod("a"))
    assert not pod_ready(pod("a", ready=False))
    assert not pod_ready({"metadata": {"name": "x"}})


def test_dp_ranks_and_replay_ports() -> None:
    rec = Reconciler(Ports(zmq_port=6000, replay_port=7000, pod_port=9000, dp_size=3))
    (action,) = rec.upsert(pod("a", "10.1.2.3"), 0.0)
    assert [(e.endpoint, e.pod_id, e.replay_endpoint) for e in action.target.endpoints] == [
        ("tcp://10.1.2.3:6000", "10.1.2.3:9000", "tcp://10.1.2.3:7000"),
        ("tcp://10.1.2.3:6001", "10.1.2.3:9001", "tcp://10.1.2.3:7001"),
        ("tcp://10.1.2.3:6002", "10.1.2.3:9002", "tcp://10.1.2.3:7002"),
    ]


def test_ipv6_pod_ip_is_bracketed() -> None:
    rec = Reconciler(Ports())
    (action,) = rec.upsert(pod("a", "fd00::5"), 0.0)
    assert action.target.endpoints[0].endpoint == "tcp://[fd00::5]:5557"
    assert action.target.pod_ids == ["[fd00::5]:8000"]


def test_delete_unsubscribes_and_forgets() -> None:
    rec = Reconciler(Ports())
    rec.upsert(pod("a"), 0.0)
    assert unsubs(rec.delete(pod("a"), 1.0)) == [("10.0.0.1", "deleted")]
    assert rec.state_of("a") is None
    assert rec.delete(pod("a"), 2.0) == []  # twice: nothing
    assert rec.delete(pod("never-seen"), 2.0) == []


def test_losing_the_ip_drops_at_once() -> None:
    rec = Reconciler(Ports(), unready_grace=30)
    rec.upsert(pod("a"), 0.0)
    assert unsubs(rec.upsert(pod("a", ip=None, ready=False), 1.0)) == [("10.0.0.1", "lost its IP")]
    assert rec.state_of("a") == "pending"


def test_ip_change_is_a_new_pod() -> None:
    rec = Reconciler(Ports())
    rec.upsert(pod("a", "10.0.0.1"), 0.0)
    actions = rec.upsert(pod("a", "10.0.0.2"), 1.0)
    assert [type(a).__name__ for a in actions] == ["Unsubscribe", "Subscribe"]
    assert unsubs(actions) == [("10.0.0.1", "IP changed")] and subs(actions) == ["10.0.0.2"]


def test_recreated_pod_same_name_same_ip_is_resubscribed() -> None:
    rec = Reconciler(Ports())
    rec.upsert(pod("a", uid="u1"), 0.0)
    actions = rec.upsert(pod("a", uid="u2"), 1.0)
    assert unsubs(actions) == [("10.0.0.1", "re-created")] and subs(actions) == ["10.0.0.1"]


def test_unready_within_grace_keeps_the_subscription() -> None:
    rec = Reconciler(Ports(), unready_grace=30)
    rec.upsert(pod("a"), 0.0)
    assert rec.upsert(pod("a", ready=False), 10.0) == []
    assert rec.state_of("a") == "unready"
    assert rec.next_deadline() == 40.0
    assert rec.tick(39.9) == []
    assert rec.upsert(pod("a"), 39.95) == []  # Ready again in time: nothing happens
    assert rec.state_of("a") == "subscribed"
    assert rec.next_deadline() is None
    assert rec.tick(1000.0) == []


def test_unready_past_grace_is_dropped_then_resubscribed_when_ready() -> None:
    rec = Reconciler(Ports(), unready_grace=30)
    rec.upsert(pod("a"), 0.0)
    rec.upsert(pod("a", ready=False), 10.0)
    rec.upsert(pod("a", ready=False), 20.0)  # still unready: the clock does not restart
    assert unsubs(rec.tick(40.0)) == [("10.0.0.1", "unready past the grace")]
    assert rec.state_of("a") == "pending"
    assert rec.tick(50.0) == []
    assert subs(rec.upsert(pod("a"), 60.0)) == ["10.0.0.1"]


def test_zero_grace_drops_on_the_unready_event() -> None:
    rec = Reconciler(Ports(), unready_grace=0)
    rec.upsert(pod("a"), 0.0)
    assert unsubs(rec.upsert(pod("a", ready=False), 1.0)) == [("10.0.0.1", "unready past the grace")]


def test_terminating_pod_is_dropped_after_the_grace() -> None:
    rec = Reconciler(Ports(), unready_grace=5)
    rec.upsert(pod("a"), 0.0)
    assert rec.upsert(pod("a", deleting=True), 1.0) == []
    assert unsubs(rec.tick(6.0)) == [("10.0.0.1", "being deleted")]


def test_replace_forgets_missing_pods_and_removes_before_adding() -> None:
    rec = Reconciler(Ports())
    rec.upsert(pod("a", "10.0.0.1"), 0.0)
    rec.upsert(pod("b", "10.0.0.2"), 0.0)
    # While disconnected: a was deleted, c took over its IP, b is unchanged.
    actions = rec.replace([pod("c", "10.0.0.1"), pod("b", "10.0.0.2")], 5.0)
    assert [type(a).__name__ for a in actions] == ["Unsubscribe", "Subscribe"]
    assert actions[0].target.name == "a" and actions[1].target.name == "c"
    assert rec.counts() == {"subscribed": 2, "unready": 0, "pending": 0, "failed": 0}
    assert rec.replace([pod("c", "10.0.0.1"), pod("b", "10.0.0.2")], 6.0) == []
    assert {t.name for t in rec.targets()} == {"b", "c"}


def test_failed_subscription_is_retried() -> None:
    rec = Reconciler(Ports(), retry=5)
    (action,) = rec.upsert(pod("a"), 0.0)
    rec.failed(action.target, "boom", 0.0)
    assert rec.state_of("a") == "failed"
    assert rec.snapshot(1.0)[0]["error"] == "boom"
    assert rec.next_deadline() == 5.0
    assert rec.tick(4.0) == []
    assert subs(rec.tick(5.0)) == ["10.0.0.1"]
    assert rec.state_of("a") == "subscribed"


def test_failed_then_unwanted_clears_the_retry() -> None:
    rec = Reconciler(Ports(), retry=5)
    (action,) = rec.upsert(pod("a"), 0.0)
    rec.failed(action.target, "boom", 0.0)
    rec.upsert(pod("a", ready=False), 1.0)
    assert rec.state_of("a") == "pending" and rec.next_deadline() is None


def test_snapshot_records() -> None:
    rec = Reconciler(Ports(), unready_grace=30)
    rec.upsert(pod("b", "10.0.0.2"), 0.0)
    rec.upsert(pod("a", "10.0.0.1"), 0.0)
    rec.upsert(pod("a", "10.0.0.1", ready=False), 1.0)
    snap = rec.snapshot(3.0)
    assert [r["name"] for r in snap] == ["a", "b"]
    assert snap[0]["state"] == "unready" and snap[0]["unready_for_seconds"] == 2.0
    assert snap[1] == {
        "name": "b",
        "uid": "uid-b",
        "ip": "10.0.0.2",
        "phase": "Running",
        "ready": True,
        "deleting": False,
        "state": "subscribed",
        "pod_ids": ["10.0.0.2:8000"],
    }


def test_bad_input() -> None:
    rec = Reconciler(Ports())
    with pytest.raises(ValueError, match=r"metadata\.name"):
        rec.upsert({"status": {}}, 0.0)
    with pytest.raises(ValueError, match="unready_grace"):
        Reconciler(Ports(), unready_grace=-1)
