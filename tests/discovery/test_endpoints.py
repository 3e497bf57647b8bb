"""The picker's endpoint discovery without an API server (tests/k8s/test_gaie_picker.py has the
real one): reading an InferencePool, mapping pods to podIP:targetPort, following the pool's
selector and ports, dropping a pod that leaves at once."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from kvindex_service.discovery.endpoints import EndpointWatch, pool_spec
from kvindex_service.discovery.reconcile import Reconciler, Subscribe, TargetPorts, Unsubscribe
from tests.discovery.test_reconcile import pod
from tests.events.helpers import wait_until


def labelled(name: str, ip: str, labels: dict[str, str], ready: bool = True) -> dict[str, Any]:
    obj = pod(name, ip, ready=ready)
    obj["metadata"]["labels"] = labels
    return obj


def pool(labels: dict[str, str], ports: list[int]) -> dict[str, Any]:
    return {
        "metadata": {"name": "p"},
        "spec": {"selector": {"matchLabels": labels}, "targetPorts": [{"number": n} for n in ports]},
    }


class Store:
    """Objects of one kind; every watch opened on it gets the events sent after it opened,
    filtered by a label selector ``k=v,...`` (pods) or not at all (the pool)."""

    def __init__(self, by_labels: bool) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.by_labels = by_labels
        self.watchers: list[tuple[str, queue.Queue[dict[str, Any]]]] = []
        self.selectors: list[str] = []
        self.lock = threading.Lock()

    def matches(self, obj: dict[str, Any], selector: str) -> bool:
        if not self.by_labels:
            return True
        labels = obj["metadata"].get("labels") or {}
        return all(labels.get(k) == v for k, v in (term.split("=", 1) for term in selector.split(",")))

    def send(self, kind: str, obj: dict[str, Any]) -> None:
        with self.lock:
            if kind == "DELETED":
                self.objects.pop(obj["metadata"]["name"], None)
            else:
                self.objects[obj["metadata"]["name"]] = obj
            for selector, q in self.watchers:
                if self.matches(obj, selector):
                    q.put({"type": kind, "object": obj})

    def api(self) -> StoreApi:
        return StoreApi(self)


class StoreApi:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.stopped = threading.Event()

    def list(self, namespace: str, selector: str) -> tuple[list[dict[str, Any]], str]:
        with self.store.lock:
            self.store.selectors.append(selector)
            self.q: queue.Queue[dict[str, Any]] = queue.Queue()
            self.store.watchers.append((selector, self.q))
            return [o for o in self.store.objects.values() if self.store.matches(o, selector)], "1"

    def watch(self, namespace: str, selector: str, resource_version: str, timeout: int) -> Iterator[dict[str, Any]]:
        while not self.stopped.is_set():
            try:
                yield self.q.get(timeout=0.02)
            except queue.Empty:
                continue

    def interrupt(self) -> None:
        self.stopped.set()


@pytest.fixture
def cluster() -> Iterator[tuple[Store, Store, list[list[str]], EndpointWatch]]:
    pods, pools = Store(by_labels=True), Store(by_labels=False)
    seen: list[list[str]] = []
    watch = EndpointWatch(seen.append, namespace="ns", pool_name="p", pod_api=pods.api, pool_api_factory=pools.api)
    yield pods, pools, seen, watch
    watch.stop()


def test_pool_spec_reads_selector_and_ports() -> None:
    spec = pool_spec(pool({"tier": "a", "app": "vllm"}, [8000, 8001, 8000]))
    assert spec.selector == "app=vllm,tier=a" and spec.ports == (8000, 8001)
    for bad, why in (
        ({}, "without spec"),
        (pool({}, [8000]), "matchLabels is empty"),
        (pool({"app": "x"}, []), "no port number"),
        (pool({"app": "x"}, [0, 70000]), "no port number"),
    ):
        with pytest.raises(ValueError, match=why):
            pool_spec(bad)


def test_target_ports_and_new_ports() -> None:
    assert [e.endpoint for e in TargetPorts((8000, 8001)).endpoints("10.0.0.1")] == ["10.0.0.1:8000", "10.0.0.1:8001"]
    assert [e.pod_id for e in TargetPorts((80,)).endpoints("fd00::1")] == ["[fd00::1]:80"]
    r = Reconciler(TargetPorts((8000,)), unready_grace=0.0)
    (sub,) = r.upsert(pod("a", "10.0.0.1"), 0.0)
    assert isinstance(sub, Subscribe) and sub.target.pod_ids == ["10.0.0.1:8000"]
    drop, again = r.set_ports(TargetPorts((9000,)), 1.0)
    assert isinstance(drop, Unsubscribe) and drop.reason == "ports changed"
    assert isinstance(again, Subscribe) and again.target.pod_ids == ["10.0.0.1:9000"]
    assert r.set_ports(TargetPorts((9000,)), 2.0) == []
    # no grace: an unready pod is dropped at once
    (gone,) = r.upsert(pod("a", "10.0.0.1", ready=False), 3.0)
    assert isinstance(gone, Unsubscribe)


def test_watch_follows_pool_and_pods(cluster: tuple[Store, Store, list[list[str]], EndpointWatch]) -> None:
    pods, pools, seen, watch = cluster
    pools.send("ADDED", pool({"app": "vllm"}, [8000]))
    pods.send("ADDED", labelled("a", "10.0.0.1", {"app": "vllm"}))
    pods.send("ADDED", labelled("b", "10.0.0.2", {"app": "vllm"}))
    pods.send("ADDED", labelled("x", "10.0.0.3", {"app": "other"}))
    watch.start()
    wait_until(lambda: watch.synced, what="synced")
    wait_until(lambda: watch.endpoints() == ["10.0.0.1:8000", "10.0.0.2:8000"], what="pool pods")
    pods.send("DELETED", labelled("b", "10.0.0.2", {"app": "vllm"}))
    wait_until(lambda: watch.endpoints() == ["10.0.0.1:8000"], what="b dropped")
    pods.send("MODIFIED", labelled("a", "10.0.0.1", {"app": "vllm"}, ready=False))
    wait_until(lambda: watch.endpoints() == [], what="unready a dropped at once")
    # new ports: same pods, new endpoints; new selector: another pod set
    pods.send("MODIFIED", labelled("a", "10.0.0.1", {"app": "vllm"}))
    pools.send("MODIFIED", pool({"app": "vllm"}, [9000]))
    wait_until(lambda: watch.endpoints() == ["10.0.0.1:9000"], what="new port")
    pools.send("MODIFIED", pool({"app": "other"}, [9000]))
    wait_until(lambda: watch.endpoints() == ["10.0.0.3:9000"], what="new selector")
    assert pods.selectors[-1] == "app=other"
    # the pool goes: nothing eligible, not synced
    pools.send("DELETED", pool({"app": "other"}, [9000]))
    wait_until(lambda: watch.endpoints() == [] and not watch.synced, what="pool gone")
    assert seen[-1] == [] and "not found" in str(watch.pool_error)
    # every published list differs from the one before (after the first)
    assert all(a != b for a, b in zip(seen[1:], seen[2:], strict=False))


def test_selector_mode_needs_ports() -> None:
    with pytest.raises(ValueError, match="target ports"):
        EndpointWatch(lambda eps: None, selector="app=x")
    with pytest.raises(ValueError, match="either"):
        EndpointWatch(lambda eps: None, selector="app=x", pool_name="p", ports=(80,))
