"""The discovery watch loop with a scripted API (no API server here; tests/k8s has the real
one) and a real Subscriber: actions reach the subscriber, 410 Gone and failures re-list."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from kvindex_service import Indexer
from kvindex_service.config import DiscoverySettings
from kvindex_service.discovery import Discovery
from kvindex_service.discovery.kube import Gone, KubeError
from kvindex_service.events import Subscriber
from tests.discovery.test_reconcile import pod
from tests.events.helpers import wait_until


class ScriptedApi:
    """``list`` answers the current pods; ``watch`` yields queued events, or raises a queued
    exception, and ends when the test queues ``None``."""

    def __init__(self) -> None:
        self.pods: dict[str, dict[str, Any]] = {}
        self.events: queue.Queue[dict[str, Any] | BaseException | None] = queue.Queue()
        self.lists = 0
        self.rv = 10
        self.interrupted = threading.Event()

    def list(self, namespace: str, selector: str) -> tuple[list[dict[str, Any]], str]:
        self.lists += 1
        return list(self.pods.values()), str(self.rv)

    def watch(self, namespace: str, selector: str, resource_version: str, timeout: int) -> Iterator[dict[str, Any]]:
        while not self.interrupted.is_set():
            try:
                item = self.events.get(timeout=0.05)
            except queue.Empty:
                continue
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def interrupt(self) -> None:
        self.interrupted.set()

    def send(self, kind: str, obj: dict[str, Any]) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        if kind == "DELETED":
            self.pods.pop(obj["metadata"]["name"], None)
        else:
            self.pods[obj["metadata"]["name"]] = obj
        self.events.put({"type": kind, "object": obj})


@pytest.fixture
def rig() -> Iterator[tuple[ScriptedApi, Subscriber, Discovery]]:
    ix = Indexer(block_size=16, shards=1)
    sub = Subscriber(ix)
    sub.start()
    api = ScriptedApi()
    settings = DiscoverySettings(enabled=True, label_selector="app=vllm", unready_grace=0.2)
    disc = Discovery(settings, sub, api=api, namespace="ns")  # type: ignore[arg-type]
    yield api, sub, disc
    disc.stop()
    sub.stop()
    ix.close()


def endpoints(sub: Subscriber) -> set[str]:
    return {e.endpoint for e in sub.endpoints()}


def test_list_watch_subscribe_and_drop(rig: tuple[ScriptedApi, Subscriber, Discovery]) -> None:
    api, sub, disc = rig
    api.pods["a"] = pod("a", "127.0.0.2")
    api.pods["b"] = pod("b", "127.0.0.3", ready=False)
    disc.start()
    assert disc.wait_synced(10)
    assert endpoints(sub) == {"tcp://127.0.0.2:5557"}
    assert {e.pod_id for e in sub.endpoints()} == {"127.0.0.2:8000"}
    api.send("MODIFIED", pod("b", "127.0.0.3"))
    wait_until(lambda: endpoints(sub) == {"tcp://127.0.0.2:5557", "tcp://127.0.0.3:5557"}, what="b subscribed")
    api.send("DELETED", pod("a", "127.0.0.2"))
    wait_until(lambda: endpoints(sub) == {"tcp://127.0.0.3:5557"}, what="a dropped")
    api.send("MODIFIED", pod("b", "127.0.0.3", ready=False))  # the timer thread drops it
    wait_until(lambda: endpoints(sub) == set(), what="b dropped after the grace")
    assert disc.counts() == {"subscribed": 0, "unready": 0, "pending": 1, "failed": 0}
    assert disc.resyncs == 0 and disc.watch_errors == 0
    assert disc.resource_version == str(api.rv)


def test_gone_relists_and_errors_back_off_and_relist(rig: tuple[ScriptedApi, Subscriber, Discovery]) -> None:
    api, sub, disc = rig
    api.pods["a"] = pod("a", "127.0.0.2")
    disc.start()
    assert disc.wait_synced(10)
    # Changed while the watch was broken: a deleted, c added. Only a re-list can tell.
    del api.pods["a"]
    api.pods["c"] = pod("c", "127.0.0.4")
    api.events.put(Gone("410 Gone: too old resource version"))
    wait_until(lambda: endpoints(sub) == {"tcp://127.0.0.4:5557"}, what="re-list after 410")
    assert disc.resyncs == 1 and disc.watch_errors == 0
    api.pods["d"] = pod("d", "127.0.0.5")
    api.events.put(KubeError("connection reset"))
    wait_until(lambda: "tcp://127.0.0.5:5557" in endpoints(sub), what="re-list after an error")
    assert disc.resyncs == 2 and disc.watch_errors == 1
    assert disc.status()["last_error"] == "connection reset"
    # A watch the server ends normally is re-opened without a list.
    lists = api.lists
    api.events.put(None)
    api.send("ADDED", pod("e", "127.0.0.6"))
    wait_until(lambda: "tcp://127.0.0.6:5557" in endpoints(sub), what="watch renewed")
    assert api.lists == lists


def test_subscribe_failure_is_reported_and_retried(rig: tuple[ScriptedApi, Subscriber, Discovery]) -> None:
    api, sub, disc = rig
    sub.add_pod("tcp://127.0.0.2:5557", pod_id="someone-else")  # the endpoint is taken
    api.pods["a"] = pod("a", "127.0.0.2")
    disc.start()
    assert disc.wait_synced(10)
    wait_until(lambda: disc.counts()["failed"] == 1, what="failure recorded")
    (rec,) = disc.status()["pods"]
    assert rec["state"] == "failed" and "already subscribed" in rec["error"]
    sub.remove_pod("tcp://127.0.0.2:5557")
    disc.reconciler.retry = 0.0
    wait_until(lambda: {e.pod_id for e in sub.endpoints()} == {"127.0.0.2:8000"}, what="retried")


def test_selector_is_required() -> None:
    with pytest.raises(ValueError, match="label_selector is required"):
        DiscoverySettings(enabled=True)
    assert DiscoverySettings(enabled=True, label_selector="  app=x ").label_selector == "  app=x "
    with pytest.raises(ValueError, match="label_selector is required"):
        DiscoverySettings(enabled=True, label_selector=" ")
