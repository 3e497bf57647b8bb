"""Pod discovery against a real kube-apiserver (see conftest.py), with `kvindex serve
--discover` as a real process and real ZMQ publishers bound on 127.0.0.N sending the events
vLLM's own publisher produced (tests/fixtures/vllm)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from tests.conftest import load_vllm_capture
from tests.k8s.conftest import ADMIN_TOKEN, ControlPlane
from tests.k8s.helpers import Kube, PodPublisher, Service, free_zmq_port, wait_for

CAPTURE = load_vllm_capture("0.26.0")
FIRST, SECOND = "10.0.0.1:8000", "10.0.0.2:8000"
"""The capture's two pods; their messages are replayed by the test pods' publishers."""


def messages_of(pod: str) -> list[dict[str, Any]]:
    return [m for m in CAPTURE["messages"] if m["pod"] == pod]


def expect_after(pod: str) -> dict[str, int]:
    expect: dict[str, int] = messages_of(pod)[-1]["expect_after"][pod]
    return expect


@pytest.fixture
def zctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def services(tmp_path: Path) -> Iterator[list[Service]]:
    started: list[Service] = []
    yield started
    for svc in started:
        svc.stop()


def publish_and_check(svc: Service, pub: PodPublisher, source: str, pod_id: str) -> None:
    """Send ``source``'s captured batches through ``pub``; the service must index them under
    ``pod_id`` exactly as vLLM's pod held them."""
    msgs = messages_of(source)
    pub.wait_subscribed()
    pub.send_all(msgs)
    last = int.from_bytes(msgs[-1]["frames"][1], "big")
    wait_for(lambda: svc.last_seq(pod_id) == last, what=f"{pod_id} applied seq {last}")
    for prompt, blocks in expect_after(source).items():
        assert svc.matched(CAPTURE["prompts"][prompt], pod_id) == blocks, (pod_id, prompt)


def test_pods_discovered_indexed_purged_and_added(
    control_plane: ControlPlane, kube: Kube, namespace: str, zctx: Any, services: list[Service], tmp_path: Path
) -> None:
    ips = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    port = free_zmq_port(ips)
    pubs = [PodPublisher(zctx, ip, port) for ip in ips]
    for name, ip in (("vllm-a", ips[0]), ("vllm-b", ips[1])):
        kube.create_pod(namespace, name)
        kube.set_status(namespace, name, ip, ready=True)
    kube.create_pod(namespace, "other", labels={"app": "web"})  # not selected
    kube.set_status(namespace, "other", "127.0.0.9", ready=True)

    svc = Service(tmp_path, control_plane.admin_kubeconfig, namespace, zmq_port=port)
    services.append(svc)
    svc.wait_ready()
    a, b, c = (f"{ip}:8000" for ip in ips)
    # Both Ready pods are subscribed and their events indexed under podIP:pod_port.
    publish_and_check(svc, pubs[0], FIRST, a)
    publish_and_check(svc, pubs[1], SECOND, b)
    status = svc.discovery()
    assert status["namespace"] == namespace and status["synced"]
    assert {p["name"]: p["state"] for p in status["pods"]} == {"vllm-a": "subscribed", "vllm-b": "subscribed"}
    assert svc.metric('kvindex_discovery_pods{state="subscribed"}') == 2
    prompt = next(iter(expect_after(FIRST)))
    assert svc.matched(CAPTURE["prompts"][prompt], a) > 0

    # Deleting a pod purges it: no subscription, no blocks.
    kube.delete_pod(namespace, "vllm-a")
    wait_for(lambda: a not in svc.pod_ids(), what="deleted pod purged")
    assert svc.matched(CAPTURE["prompts"][prompt], a) == 0
    assert b in svc.pod_ids()
    assert [p["name"] for p in svc.discovery()["pods"]] == ["vllm-b"]

    # A new pod is picked up once Ready; time from Ready to its first indexed batch.
    kube.create_pod(namespace, "vllm-c")
    kube.set_status(namespace, "vllm-c", ips[2], ready=False)
    wait_for(lambda: any(p["name"] == "vllm-c" for p in svc.discovery()["pods"]), what="pending pod seen")
    assert c not in svc.pod_ids()
    t0 = time.monotonic()
    kube.set_status(namespace, "vllm-c", ips[2], ready=True)
    pubs[2].wait_subscribed()
    subscribed = time.monotonic() - t0
    first = messages_of(FIRST)[0]
    pubs[2].send_all([first])
    wait_for(lambda: svc.last_seq(c) == 0, what="new pod's first batch")
    indexed = time.monotonic() - t0
    print(f"\nready->subscribed {subscribed * 1000:.0f} ms, ready->first batch indexed {indexed * 1000:.0f} ms")
    assert svc.discovery()["resyncs"] == 0 and svc.discovery()["watch_errors"] == 0
    for pub in pubs:
        pub.close()


def test_unready_past_grace_is_dropped_and_back_when_ready(
    control_plane: ControlPlane, kube: Kube, namespace: str, zctx: Any, services: list[Service], tmp_path: Path
) -> None:
    ip = "127.0.0.5"
    port = free_zmq_port([ip])
    pub = PodPublisher(zctx, ip, port)
    kube.create_pod(namespace, "vllm-a")
    kube.set_status(namespace, "vllm-a", ip, ready=True)
    svc = Service(tmp_path, control_plane.admin_kubeconfig, namespace, zmq_port=port, pod_port=9000, grace=1.0)
    services.append(svc)
    svc.wait_ready()
    pod_id = f"{ip}:9000"
    publish_and_check(svc, pub, FIRST, pod_id)

    kube.set_status(namespace, "vllm-a", ip, ready=False)
    # Unready: kept for the grace, then dropped with its blocks.
    wait_for(lambda: pod_id not in svc.pod_ids(), what="unready pod dropped after the grace")
    prompt = next(iter(expect_after(FIRST)))
    assert svc.matched(CAPTURE["prompts"][prompt], pod_id) == 0
    assert {p["name"]: p["state"] for p in svc.discovery()["pods"]} == {"vllm-a": "pending"}
    assert svc.metric('kvindex_discovery_pods{state="pending"}') == 1

    # Ready again: subscribed again (a fresh stream: vLLM's seq restarts with the new SUB).
    kube.set_status(namespace, "vllm-a", ip, ready=True)
    publish_and_check(svc, pub, FIRST, pod_id)
    pub.close()


def test_documented_role_is_enough_and_no_more(
    control_plane: ControlPlane, kube: Kube, namespace: str, zctx: Any, services: list[Service], tmp_path: Path
) -> None:
    from kubernetes.client import ApiException

    from tests.k8s.helpers import documented_rbac

    kube.apply_rbac(namespace, documented_rbac())
    token = kube.service_account_token(namespace, "kvindex")
    # The context's namespace is the default when --discovery-namespace is not given.
    kubeconfig = control_plane.kubeconfig(token, "kvindex-sa", namespace=namespace)
    limited = Kube.from_kubeconfig(kubeconfig)
    other = namespace + "-other"
    kube.create_namespace(other)
    try:
        assert limited.core.list_namespaced_pod(namespace).items == []
        for forbidden in (
            lambda: limited.core.list_namespaced_pod(other),
            lambda: limited.core.list_pod_for_all_namespaces(),
            lambda: limited.core.list_namespaced_secret(namespace),
            lambda: limited.core.create_namespaced_pod(
                namespace, {"metadata": {"name": "x"}, "spec": {"containers": [{"name": "c", "image": "i"}]}}
            ),
        ):
            with pytest.raises(ApiException) as err:
                forbidden()
            assert err.value.status == 403

        ip = "127.0.0.6"
        port = free_zmq_port([ip])
        pub = PodPublisher(zctx, ip, port)
        kube.create_pod(namespace, "vllm-a")
        kube.set_status(namespace, "vllm-a", ip, ready=True)
        svc = Service(tmp_path, kubeconfig, None, zmq_port=port)
        services.append(svc)
        svc.wait_ready()
        assert svc.discovery()["namespace"] == namespace
        publish_and_check(svc, pub, FIRST, f"{ip}:8000")
        assert svc.discovery()["watch_errors"] == 0
        pub.close()

        # The same token pointed at another namespace: forbidden, counted, never ready.
        denied = Service(tmp_path, kubeconfig, other, zmq_port=port, name="denied")
        services.append(denied)
        denied.wait_http()
        wait_for(lambda: denied.discovery()["watch_errors"] >= 1, what="forbidden list counted")
        assert "403" in (denied.discovery()["last_error"] or "")
        assert denied.http.get("/readyz").status_code == 503
    finally:
        kube.delete_namespace(other)


def test_missing_kubeconfig_and_selector_are_one_line_errors(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVINDEX_", "KUBERNETES_"))}
    env["KUBECONFIG"] = str(tmp_path / "absent")
    base = [sys.executable, "-m", "kvindex_service", "serve", "--port", "0", "--zmq-bind", "none", "--discover"]
    for extra, needle in (([], "label_selector is required"), (["--discovery-selector", "app=x"], "no Kubernetes")):
        proc = subprocess.run(base + extra, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], proc.stderr
        assert ADMIN_TOKEN not in proc.stderr
