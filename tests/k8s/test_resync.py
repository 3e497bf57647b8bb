"""The watch loop's recovery against a real kube-apiserver: 410 Gone (a resourceVersion etcd
has compacted away) and a dropped connection both re-list, and what changed meanwhile is applied.
In-process (a real Subscriber and Indexer, real ZMQ publishers), so the test can step in
between the watch loop and the API server."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from kvindex_service import Indexer
from kvindex_service.config import DiscoverySettings
from kvindex_service.discovery import Discovery
from kvindex_service.discovery.kube import KubeError, PodApi, load_api
from kvindex_service.events import Subscriber
from tests.conftest import load_vllm_capture
from tests.k8s.conftest import ControlPlane
from tests.k8s.helpers import Kube, PodPublisher, free_zmq_port, wait_for

CAPTURE = load_vllm_capture("0.26.0")
FIRST = "10.0.0.1:8000"


class SteeredApi(PodApi):
    """The real client, with test hooks: gates the next list and watch wait at, and a failure
    of the next watch request."""

    def __init__(self, inner: PodApi) -> None:
        super().__init__(inner._core)
        self.fail_next = False
        self.gate = threading.Event()
        self.gate.set()
        self.watch_gate = threading.Event()
        self.watch_gate.set()
        self.watch_rvs: list[str] = []

    def list(self, namespace: str, selector: str) -> tuple[list[dict[str, Any]], str]:
        assert self.gate.wait(60)
        return super().list(namespace, selector)

    def watch(self, namespace: str, selector: str, resource_version: str, timeout: int) -> Iterator[dict[str, Any]]:
        assert self.watch_gate.wait(60)
        if self.fail_next:
            self.fail_next = False
            raise KubeError("injected: connection reset")
        self.watch_rvs.append(resource_version)
        return super().watch(namespace, selector, resource_version, timeout)


@pytest.fixture
def rig(control_plane: ControlPlane, namespace: str) -> Iterator[dict[str, Any]]:
    ips = ["127.0.0.7", "127.0.0.8"]
    port = free_zmq_port(ips)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pubs = [PodPublisher(ctx, ip, port) for ip in ips]
    ix = Indexer(block_size=16, hash_seed="42", shards=2)
    sub = Subscriber(ix, reconnect_ivl=0.05)
    sub.start()
    inner, ns = load_api(str(control_plane.admin_kubeconfig), namespace)
    api = SteeredApi(inner)
    settings = DiscoverySettings(
        enabled=True, label_selector="app=vllm", zmq_port=port, unready_grace=30, watch_timeout=1
    )
    disc = Discovery(settings, sub, api=api, namespace=ns)
    out = {"ips": ips, "pubs": pubs, "ix": ix, "sub": sub, "api": api, "disc": disc}
    yield out
    disc.stop()
    sub.stop()
    ix.close()
    for pub in pubs:
        pub.close()
    ctx.destroy(linger=0)


def pod_ids(sub: Subscriber) -> set[str]:
    return {str(e.pod_id) for e in sub.endpoints()}


def test_gone_and_reconnect_resync(
    control_plane: ControlPlane, kube: Kube, namespace: str, rig: dict[str, Any]
) -> None:
    disc: Discovery = rig["disc"]
    api: SteeredApi = rig["api"]
    sub: Subscriber = rig["sub"]
    a, b = (f"{ip}:8000" for ip in rig["ips"])
    kube.create_pod(namespace, "vllm-a")
    kube.set_status(namespace, "vllm-a", rig["ips"][0], ready=True)

    api.watch_gate.clear()  # list, then wait before watching
    disc.start()
    assert disc.wait_synced(60)
    assert pod_ids(sub) == {a}
    listed_at = disc.resource_version
    # Meanwhile pod b appears, and etcd compacts its history past the list's resourceVersion:
    # the watch from it is answered 410 Gone by the API server; only a re-list finds b.
    kube.create_pod(namespace, "vllm-b")
    kube.set_status(namespace, "vllm-b", rig["ips"][1], ready=True)
    control_plane.compact()
    api.watch_gate.set()
    wait_for(lambda: pod_ids(sub) == {a, b}, what="pod found by the re-list after 410")
    assert disc.resyncs == 1 and disc.watch_errors == 0
    assert api.watch_rvs[0] == listed_at

    # Its events reach the index.
    pub = rig["pubs"][1]
    pub.wait_subscribed()
    msgs = [m for m in CAPTURE["messages"] if m["pod"] == FIRST]
    pub.send_all(msgs)
    ix: Indexer = rig["ix"]
    wait_for(lambda: getattr(ix.pod_state(b), "last_seq", None) == len(msgs) - 1, what="batches applied")

    # A dropped connection: the next list waits until the test deleted a pod meanwhile; the
    # re-list must notice the deletion it never saw as a watch event.
    resyncs = disc.resyncs
    api.gate.clear()
    api.fail_next = True
    wait_for(lambda: disc.watch_errors == 1, what="injected watch failure")
    kube.delete_pod(namespace, "vllm-b")
    api.gate.set()
    wait_for(lambda: pod_ids(sub) == {a}, what="deletion seen through the re-list")
    assert disc.resyncs == resyncs + 1
    assert ix.pod_state(b) is None  # its blocks are gone
    print(f"\nresyncs={disc.resyncs} watch_errors={disc.watch_errors} lists={disc.lists}")


def test_stop_is_prompt_with_a_watch_open(kube: Kube, namespace: str, rig: dict[str, Any]) -> None:
    disc: Discovery = rig["disc"]
    disc.settings = disc.settings.model_copy(update={"watch_timeout": 300})
    disc.start()
    assert disc.wait_synced(60)
    wait_for(lambda: rig["api"].watch_rvs, what="watch opened")
    time.sleep(0.2)
    started = time.monotonic()
    disc.stop(timeout=20)
    took = time.monotonic() - started
    assert len(disc.threads()) == 2
    assert all(not t.is_alive() for t in disc.threads()), "discovery threads still running"
    print(f"\ndiscovery stop took {took * 1000:.0f} ms with a 300 s watch open")
