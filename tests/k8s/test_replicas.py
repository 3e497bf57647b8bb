"""Active-active: two `kvindex serve --discover` replicas on the same pods (a real
kube-apiserver, real ZMQ publishers) hold the same index and give identical /score answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import zmq

from tests.conftest import load_vllm_capture
from tests.k8s.conftest import ControlPlane
from tests.k8s.helpers import Kube, PodPublisher, Service, free_zmq_port, wait_for

CAPTURE = load_vllm_capture("0.33.0")


def test_two_replicas_answer_alike(control_plane: ControlPlane, kube: Kube, namespace: str, tmp_path: Path) -> None:
    # Pod 0 replays all of the capture's first pod, pod 1 its first three batches: two pods
    # holding different prefixes.
    first = [m for m in CAPTURE["messages"] if m["pod"] == "10.0.0.1:8000"]
    streams = [first, first[:3]]
    ips = ["127.0.0.10", "127.0.0.11"]
    port = free_zmq_port(ips)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pubs = [PodPublisher(ctx, ip, port) for ip in ips]
    replicas: list[Service] = []
    try:
        for i, ip in enumerate(ips):
            kube.create_pod(namespace, f"vllm-{i}")
            kube.set_status(namespace, f"vllm-{i}", ip, ready=True)
        replicas = [
            Service(tmp_path, control_plane.admin_kubeconfig, namespace, zmq_port=port, name=f"replica-{i}")
            for i in range(2)
        ]
        for svc in replicas:
            svc.wait_ready()
        pod_ids = [f"{ip}:8000" for ip in ips]
        # Each publisher (XPUB) sees one subscription per replica before it publishes.
        for pub in pubs:
            wait_for(lambda pub=pub: pub.subscriptions() >= 2, what="both replicas subscribed")
        for pub, stream in zip(pubs, streams, strict=True):
            pub.send_all(stream)
        for pod_id, stream in zip(pod_ids, streams, strict=True):
            last = int.from_bytes(stream[-1]["frames"][1], "big")
            for svc in replicas:
                wait_for(lambda svc=svc, pod_id=pod_id, last=last: svc.last_seq(pod_id) == last, what="applied")
        answers: list[list[Any]] = [[svc.scores(ids) for ids in CAPTURE["prompts"].values()] for svc in replicas]
        assert answers[0] == answers[1]
        # ... and they are the pods' real contents, not two empty indexes.
        for pod_id, stream in zip(pod_ids, streams, strict=True):
            for prompt, blocks in stream[-1]["expect_after"]["10.0.0.1:8000"].items():
                assert [svc.matched(CAPTURE["prompts"][prompt], pod_id) for svc in replicas] == [blocks, blocks]
        assert answers[0] != [[] for _ in answers[0]]
    finally:
        for svc in replicas:
            svc.stop()
        for pub in pubs:
            pub.close()
        ctx.destroy(linger=0)
