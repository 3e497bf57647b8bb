"""Helpers for the tests against a real kube-apiserver: pods whose status a test sets like a
kubelet would, vLLM-like publishers bound on 127.0.0.N, and ``kvindex serve`` processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml
import zmq
from kubernetes import client, config

from tests.conftest import terminate
from tests.k8s.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
MODEL = "meta-llama/Llama-3.2-3B-Instruct"
WAIT = 60.0
"""Generous deadline for things that normally take well under a second."""


def wait_for(predicate: Callable[[], Any], timeout: float = WAIT, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


class Kube:
    """Admin access to the API server through the official client."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.api_client = api_client
        self.core = client.CoreV1Api(api_client)
        self.rbac = client.RbacAuthorizationV1Api(api_client)

    @classmethod
    def from_kubeconfig(cls, path: Path) -> Kube:
        cfg = client.Configuration()
        config.load_kube_config(config_file=str(path), client_configuration=cfg)
        return cls(client.ApiClient(cfg))

    def create_namespace(self, name: str) -> None:
        self.core.create_namespace({"metadata": {"name": name}})

    def delete_namespace(self, name: str) -> None:
        try:
            self.core.delete_namespace(name)
        except client.ApiException:
            pass

    def create_pod(self, ns: str, name: str, labels: dict[str, str] | None = None) -> None:
        body = {
            "metadata": {"name": name, "labels": labels if labels is not None else {"app": "vllm"}},
            "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai:latest"}]},
        }
        self.core.create_namespaced_pod(ns, body)

    def set_status(self, ns: str, name: str, ip: str | None, ready: bool) -> None:
        """What a kubelet would report: Running with ``ip`` and the Ready condition."""
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        status: dict[str, Any] = {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False", "lastTransitionTime": now}],
        }
        if ip is not None:
            status["podIP"] = ip
            status["podIPs"] = [{"ip": ip}]
        self.core.patch_namespaced_pod_status(name, ns, {"status": status})

    def delete_pod(self, ns: str, name: str) -> None:
        self.core.delete_namespaced_pod(name, ns, grace_period_seconds=0)

    def apply_rbac(self, ns: str, docs: list[dict[str, Any]]) -> None:
        """Create the ServiceAccount / Role / RoleBinding documents in ``ns``."""
        for doc in docs:
            doc = {**doc, "metadata": {**doc["metadata"], "namespace": ns}}
            for subject in doc.get("subjects", []):
                subject["namespace"] = ns
            kind = doc["kind"]
            if kind == "ServiceAccount":
                self.core.create_namespaced_service_account(ns, doc)
            elif kind == "Role":
                self.rbac.create_namespaced_role(ns, doc)
            elif kind == "RoleBinding":
                self.rbac.create_namespaced_role_binding(ns, doc)
            else:
                raise AssertionError(f"unexpected kind {kind} in the documented RBAC")

    def service_account_token(self, ns: str, name: str) -> str:
        """A real bound token from the TokenRequest API."""
        resp = self.core.create_namespaced_service_account_token(name, ns, {"spec": {"expirationSeconds": 3600}})
        return str(resp.status.token)


def documented_rbac() -> list[dict[str, Any]]:
    """The ServiceAccount / Role / RoleBinding example of docs/operations.md."""
    text = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    for block in re.findall(r"```yaml\n(.*?)```", text, flags=re.S):
        docs = [d for d in yaml.safe_load_all(block) if d]
        if {d.get("kind") for d in docs} >= {"ServiceAccount", "Role", "RoleBinding"}:
            return docs
    raise AssertionError("docs/operations.md has no ServiceAccount/Role/RoleBinding yaml block")


class PodPublisher:
    """vLLM's side of one pod: an XPUB bound on ``tcp://ip:port`` (vLLM binds ``tcp://*:5557``);
    XPUB so the test sees the service's subscription arrive before it publishes."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], ip: str, port: int) -> None:
        self.sock = ctx.socket(zmq.XPUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.sock.bind(f"tcp://{ip}:{port}")
        self.ip = ip
        self._subscriptions = 0
        self._awaited = 0

    def subscriptions(self) -> int:
        """Subscriptions received so far (XPUB_VERBOSE: one per subscriber, repeats included)."""
        while self.sock.poll(0, zmq.POLLIN):
            if self.sock.recv()[:1] == b"\x01":
                self._subscriptions += 1
        return self._subscriptions

    def wait_subscribed(self, timeout: float = WAIT) -> None:
        """Wait for a subscription this method has not waited for yet."""
        wait_for(lambda: self.subscriptions() > self._awaited, timeout, f"a subscriber on {self.ip}")
        self._awaited += 1

    def send_all(self, messages: list[dict[str, Any]]) -> None:
        for msg in messages:
            self.sock.send_multipart(msg["frames"])

    def close(self) -> None:
        self.sock.close(linger=0)


def free_zmq_port(ips: list[str]) -> int:
    """A port free on every one of ``ips``."""
    for _ in range(50):
        port = free_port(ips[0])
        try:
            for ip in ips[1:]:
                free_port_check(ip, port)
        except OSError:
            continue
        return port
    raise RuntimeError("no common free port")


def free_port_check(ip: str, port: int) -> None:
    import socket

    with socket.socket() as s:
        s.bind((ip, port))


class Service:
    """``kvindex serve --discover`` as a real process, and an HTTP client to it."""

    def __init__(
        self,
        workdir: Path,
        kubeconfig: Path,
        namespace: str | None,
        *,
        selector: str = "app=vllm",
        zmq_port: int,
        pod_port: int = 8000,
        grace: float = 30.0,
        name: str = "kvindex",
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KVINDEX_", "KUBERNETES_"))}
        env.update(
            KUBECONFIG=str(kubeconfig),
            KVINDEX_DISCOVERY__ZMQ_PORT=str(zmq_port),
            KVINDEX_DISCOVERY__POD_PORT=str(pod_port),
            KVINDEX_DISCOVERY__UNREADY_GRACE=str(grace),
            KVINDEX_INDEX__HASH_SEED="42",
            KVINDEX_INDEX__SHARDS="2",
            KVINDEX_TOKENIZERS__LLAMA32_DEFAULTS="false",
            KVINDEX_ZMQ__RECONNECT_IVL="0.05",
        )
        cmd = [sys.executable, "-m", "kvindex_service", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--zmq-bind", "none", "--discover", "--discovery-selector", selector]  # fmt: skip
        if namespace is not None:
            cmd += ["--discovery-namespace", namespace]
        self.log_path = workdir / f"{name}-{self.port}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def log(self) -> str:
        return self.log_path.read_bytes()[-6000:].decode("utf-8", "replace")

    def wait_http(self, timeout: float = WAIT) -> None:
        """Wait until the process answers HTTP (ready or not)."""

        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"kvindex exited with {self.proc.returncode}:\n{self.log()}")
            try:
                return self.http.get("/healthz").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, timeout, "kvindex /healthz")

    def wait_ready(self, timeout: float = WAIT) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"kvindex exited with {self.proc.returncode}:\n{self.log()}")
            try:
                return self.http.get("/readyz").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, timeout, "kvindex /readyz")

    def discovery(self) -> dict[str, Any]:
        body: dict[str, Any] = self.http.get("/discovery").json()
        return body

    def pod_ids(self) -> set[str]:
        return {p["pod"] for p in self.http.get("/pods").json()["pods"] if p.get("pod")}

    def matched(self, ids: list[int], pod: str) -> int:
        body = self.http.post("/score", json={"model": MODEL, "token_ids": ids, "pods": [pod]}).json()
        return int(next((s["matched_blocks"] for s in body["scores"] if s["pod"] == pod), 0))

    def scores(self, ids: list[int]) -> list[dict[str, Any]]:
        body = self.http.post("/score", json={"model": MODEL, "token_ids": ids}).json()
        return sorted(body["scores"], key=lambda s: s["pod"])

    def last_seq(self, pod: str) -> int | None:
        resp = self.http.get(f"/pods/{pod}")
        return resp.json().get("last_seq") if resp.status_code == 200 else None

    def metric(self, series: str) -> float:
        """One sample of /metrics, e.g. ``kvindex_discovery_pods{state="subscribed"}``."""
        for line in self.http.get("/metrics").text.splitlines():
            key, _, value = line.rpartition(" ")
            if key == series:
                return float(value)
        raise AssertionError(f"metric {series} not exported")

    def stop(self) -> int:
        self.http.close()
        code = terminate(self.proc)
        self._log.close()
        return code


PICKER_RULES = [
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["inference.networking.k8s.io"], "resources": ["inferencepools"], "verbs": ["get", "list", "watch"]},
]
"""What the picker needs with ``--pool-name`` (the chart's picker Role grants exactly this)."""
