"""`kvindex extproc --pool-name --pool-namespace` as a drop-in GAIE endpoint picker (issue 17),
against a real kube-apiserver with GAIE's own InferencePool CRD (v1.5.0, tests/k8s/fixtures),
as a real process with a service-account token that may only read pods and InferencePools.
Requests go through the real gRPC ext_proc stream (EnvoyClient), health through grpc.health.v1."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kubernetes import client

from kvindex_service.extproc import EnvoyClient
from tests.conftest import terminate
from tests.k8s.conftest import ControlPlane, free_port
from tests.k8s.helpers import PICKER_RULES, ROOT, Kube, wait_for

POOL = "vllm-pool"
LABELS = {"app": "vllm-gaie", "pool": "a"}
A, B, D = "10.1.0.1", "10.1.0.2", "10.1.0.4"
OUTSIDER = "10.1.0.3"
"""A Ready pod the pool's selector does not match."""
BODY = b'{"model":"m","prompt":"' + b"hello " * 20_000 + b'"}'


def _pool(ports: list[int]) -> dict[str, Any]:
    return {
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": {"name": POOL},
        "spec": {
            "selector": {"matchLabels": LABELS},
            "targetPorts": [{"number": p} for p in ports],
            "endpointPickerRef": {"name": "picker", "port": {"number": 9002}},
        },
    }


class Picker:
    """``kvindex extproc`` as a real process."""

    def __init__(self, workdir: Path, kubeconfig: Path, namespace: str) -> None:
        self.port, self.health_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KVINDEX_", "KUBERNETES_"))}
        cmd = [sys.executable, "-m", "kvindex_service", "extproc", "--host", "127.0.0.1", "--port", str(self.port),
               "--health-port", str(self.health_port), "--pool-name", POOL, "--pool-namespace", namespace,
               "--kubeconfig", str(kubeconfig), "--log-level", "DEBUG"]  # fmt: skip
        self.log_path = workdir / f"picker-{self.port}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)

    def log(self) -> str:
        return self.log_path.read_bytes()[-6000:].decode("utf-8", "replace")

    def health(self, service: str) -> int | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"the picker exited with {self.proc.returncode}:\n{self.log()}")
        with grpc.insecure_channel(f"127.0.0.1:{self.health_port}") as channel:
            try:
                resp = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=5
                )
            except grpc.RpcError:
                return None
            return int(resp.status)

    def route(self, subset: list[str] | None = None, **kwargs: Any) -> Any:
        async def once() -> Any:
            async with EnvoyClient(f"127.0.0.1:{self.port}") as envoy:
                return await envoy.route("/v1/models", b"", subset=subset, **kwargs)

        return asyncio.run(once())

    def picks(self, n: int = 10, subset: list[str] | None = None) -> set[str | None]:
        async def many() -> set[str | None]:
            async with EnvoyClient(f"127.0.0.1:{self.port}") as envoy:
                return {(await envoy.route("/v1/models", b"", subset=subset)).endpoint for _ in range(n)}

        return asyncio.run(many())

    def stop(self) -> int:
        code = terminate(self.proc)
        self._log.close()
        return code


@pytest.fixture
def picker_account(kube: Kube, control_plane: ControlPlane, namespace: str) -> Path:
    """A kubeconfig for a service account that may only get/list/watch pods and pools."""
    kube.core.create_namespaced_service_account(namespace, {"metadata": {"name": "picker"}})
    kube.rbac.create_namespaced_role(namespace, {"metadata": {"name": "picker"}, "rules": PICKER_RULES})
    kube.rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "picker"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "picker"},
            "subjects": [{"kind": "ServiceAccount", "name": "picker", "namespace": namespace}],
        },
    )
    return control_plane.kubeconfig(kube.service_account_token(namespace, "picker"), "picker")


@pytest.fixture
def picker(
    inference_pool_crd: None, kube: Kube, picker_account: Path, namespace: str, tmp_path: Path
) -> Iterator[Picker]:
    custom = client.CustomObjectsApi(kube.api_client)
    custom.create_namespaced_custom_object(
        "inference.networking.k8s.io", "v1", namespace, "inferencepools", _pool([8000])
    )
    for name, ip, labels, ready in (
        ("a", A, LABELS, True),
        ("b", B, LABELS, True),
        ("outsider", OUTSIDER, {"app": "vllm-gaie", "pool": "other"}, True),
        ("d", D, LABELS, False),
    ):
        kube.create_pod(namespace, name, labels)
        kube.set_status(namespace, name, ip, ready)
    proc = Picker(tmp_path, picker_account, namespace)
    try:
        yield proc
    finally:
        code = proc.stop()
        assert code == 0, proc.log()


def test_picker_follows_the_pool(picker: Picker, kube: Kube, namespace: str) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    wait_for(lambda: picker.health("readiness") == serving, what="readiness SERVING")
    for service in ("liveness", "readiness", "inference-extension", ""):
        assert picker.health(service) == serving, service
    # Only the pool's Ready pods, each podIP:targetPort.
    wait_for(lambda: picker.picks() == {f"{A}:8000", f"{B}:8000"}, what="both pool pods picked")

    # Subset rules: a hint naming only a stranger gets 503; a mixed hint picks only the member.
    assert picker.route([f"{OUTSIDER}:8000"]).status == 503
    assert picker.route([f"{A}:9999"]).status == 503  # a pool pod on a port the pool does not target
    assert picker.picks(6, [f"{OUTSIDER}:8000", f"{B}:8000"]) == {f"{B}:8000"}

    # Full duplex without protocol_config: the pick on the headers answer, the body echoed.
    async def duplex() -> Any:
        async with EnvoyClient(f"127.0.0.1:{picker.port}") as envoy:
            return await envoy.route(
                "/v1/completions", BODY, mode="FULL_DUPLEX_STREAMED", protocol_config=False, chunk_size=40_000
            )

    r = asyncio.run(duplex())
    assert r.status is None and r.endpoint in {f"{A}:8000", f"{B}:8000"}
    assert r.responses[0].WhichOneof("response") == "request_headers"
    assert r.body == BODY

    # A pod that becomes Ready joins; a deleted pod is never picked again.
    kube.set_status(namespace, "d", D, True)
    wait_for(lambda: f"{D}:8000" in picker.picks(), what="d picked once Ready")
    kube.core.delete_namespaced_pod("b", namespace, grace_period_seconds=0)
    wait_for(lambda: f"{B}:8000" not in picker.picks(), what="b no longer picked")
    assert picker.picks(20) == {f"{A}:8000", f"{D}:8000"}
    assert picker.route([f"{B}:8000"]).status == 503

    # The pool's targetPorts change: every endpoint moves to the new port.
    custom = client.CustomObjectsApi(kube.api_client)
    custom.patch_namespaced_custom_object(
        "inference.networking.k8s.io",
        "v1",
        namespace,
        "inferencepools",
        POOL,
        {"spec": {"targetPorts": [{"number": 8001}]}},
    )
    wait_for(lambda: picker.picks() == {f"{A}:8001", f"{D}:8001"}, what="picks on the new target port")

    # The pool is deleted: nothing is eligible, and the picker is no longer ready.
    custom.delete_namespaced_custom_object("inference.networking.k8s.io", "v1", namespace, "inferencepools", POOL)
    wait_for(lambda: picker.route().status == 503, what="503 without the pool")
    wait_for(lambda: picker.health("readiness") == health_pb2.HealthCheckResponse.NOT_SERVING, what="not ready")
    assert picker.health("liveness") == serving
