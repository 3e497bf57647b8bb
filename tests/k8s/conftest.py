"""A real Kubernetes control plane on loopback: etcd + kube-apiserver, for the discovery tests.

etcd is Debian's ``etcd-server`` (``/usr/bin/etcd``, or ``$KVINDEX_ETCD``); kube-apiserver is
built from the ``k8s.io/kubernetes`` Go module by ``tools/k8s/build-kube-apiserver.sh``
(``$KVINDEX_KUBE_APISERVER``, else the script's cache). Both run once per session on ephemeral
ports with a temporary data dir. The API server has a self-signed serving certificate
(``openssl``), an admin token (``--token-auth-file``, group ``system:masters``), RBAC, and
service-account signing keys so the TokenRequest API issues real tokens.

Pods created through the API never run (there is no kubelet): tests patch their status
(phase, podIP, the Ready condition) through the status subresource, like a kubelet would.

Without the binaries the tests skip, unless ``KVINDEX_REQUIRE_K8S=1`` (CI), where that fails.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import terminate

KUBE_VERSION = "v1.34.4"
ADMIN_TOKEN = "kvindex-test-admin-" + uuid.uuid4().hex


def _apiserver_binary() -> Path | None:
    explicit = os.environ.get("KVINDEX_KUBE_APISERVER")
    if explicit:
        return Path(explicit) if os.access(explicit, os.X_OK) else None
    cache = Path(os.environ.get("KVINDEX_CACHE") or Path.home() / ".cache" / "kvindex")
    path = cache / f"kube-apiserver-{KUBE_VERSION}"
    return path if os.access(path, os.X_OK) else None


def _etcd_binary() -> Path | None:
    found = os.environ.get("KVINDEX_ETCD") or shutil.which("etcd") or "/usr/bin/etcd"
    return Path(found) if os.access(found, os.X_OK) else None


def _require_binaries() -> tuple[Path, Path]:
    apiserver, etcd = _apiserver_binary(), _etcd_binary()
    missing = []
    if apiserver is None:
        missing.append("kube-apiserver (run tools/k8s/build-kube-apiserver.sh or set KVINDEX_KUBE_APISERVER)")
    if etcd is None:
        missing.append("etcd (apt-get install etcd-server or set KVINDEX_ETCD)")
    if shutil.which("openssl") is None:
        missing.append("openssl")
    if missing:
        reason = "no real Kubernetes control plane: missing " + "; ".join(missing)
        if os.environ.get("KVINDEX_REQUIRE_K8S"):
            pytest.fail(reason + " (KVINDEX_REQUIRE_K8S is set)", pytrace=False)
        pytest.skip(reason)
    assert apiserver is not None and etcd is not None
    return apiserver, etcd


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


class ControlPlane:
    """The running etcd + kube-apiserver, and what tests need to talk to them."""

    def __init__(self, workdir: Path, apiserver: Path, etcd: Path) -> None:
        self.dir = workdir
        self._procs: list[tuple[subprocess.Popen[bytes], Any]] = []
        etcd_port, peer_port, self.port = free_port(), free_port(), free_port()
        self.server = f"https://127.0.0.1:{self.port}"
        self.etcd_url = f"http://127.0.0.1:{etcd_port}"
        self.ca = workdir / "serving.crt"
        key = workdir / "serving.key"
        _run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
              "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(self.ca)])  # fmt: skip
        sa_key = workdir / "sa.key"
        _run(["openssl", "genrsa", "-out", str(sa_key), "2048"])
        tokens = workdir / "tokens.csv"
        tokens.write_text(f'{ADMIN_TOKEN},admin,admin-uid,"system:masters"\n', encoding="utf-8")
        self._start(
            "etcd",
            [str(etcd), "--name", "default", "--data-dir", str(workdir / "etcd"),
             "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
             "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
             "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
             "--initial-cluster", f"default=http://127.0.0.1:{peer_port}"],
        )  # fmt: skip
        self._start(
            "kube-apiserver",
            [str(apiserver), f"--etcd-servers=http://127.0.0.1:{etcd_port}",
             "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={self.port}",
             f"--tls-cert-file={self.ca}", f"--tls-private-key-file={key}", f"--cert-dir={workdir / 'certs'}",
             f"--token-auth-file={tokens}", "--authorization-mode=RBAC",
             f"--service-account-key-file={sa_key}", f"--service-account-signing-key-file={sa_key}",
             "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
             "--disable-admission-plugins=ServiceAccount", "--service-cluster-ip-range=10.96.0.0/16",
             "--enable-priority-and-fairness=false",
             # Pods are watched straight from etcd (no watch cache), so that compacting etcd
             # makes an old resourceVersion really too old: 410 Gone (see compact()).
             "--watch-cache-sizes=pods#0"],
        )  # fmt: skip
        self._wait_ready()
        self.admin_kubeconfig = self.kubeconfig(ADMIN_TOKEN, "admin")

    def _start(self, name: str, cmd: list[str]) -> None:
        log = open(self.dir / f"{name}.log", "wb")  # noqa: SIM115 - closed in close()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._procs.append((proc, log))

    def _wait_ready(self, timeout: float = 120.0) -> None:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for proc, _ in self._procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[0]} exited ({proc.returncode}); logs:\n{self.logs()}")
            req = urllib.request.Request(self.server + "/readyz", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            try:
                with urllib.request.urlopen(req, context=ctx, timeout=5) as resp:
                    if resp.status == 200:
                        return
            except Exception as exc:
                last = str(exc)
            time.sleep(0.2)
        raise RuntimeError(f"kube-apiserver not ready after {timeout}s ({last}); logs:\n{self.logs()}")

    def compact(self) -> int:
        """Compact etcd's history up to its current revision (etcd's JSON gateway), so a watch
        from any earlier resourceVersion gets 410 Gone. Returns that revision."""
        import json

        def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
            req = urllib.request.Request(self.etcd_url + path, data=json.dumps(body).encode(), method="POST")
            with urllib.request.urlopen(req, timeout=10) as resp:
                out: dict[str, Any] = json.loads(resp.read())
                return out

        # a range over a key that does not exist answers the current revision in its header
        revision = int(post("/v3/kv/range", {"key": "AA=="})["header"]["revision"])
        post("/v3/kv/compaction", {"revision": revision, "physical": True})
        return revision

    def logs(self, tail: int = 3000) -> str:
        out = []
        for name in ("etcd", "kube-apiserver"):
            path = self.dir / f"{name}.log"
            if path.exists():
                out.append(f"--- {name}\n" + path.read_bytes()[-tail:].decode("utf-8", "replace"))
        return "\n".join(out)

    def kubeconfig(self, token: str, name: str, namespace: str | None = None) -> Path:
        """A kubeconfig file for ``token`` (context namespace ``namespace``, if given)."""
        context: dict[str, Any] = {"cluster": "test", "user": name}
        if namespace:
            context["namespace"] = namespace
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": {"server": self.server, "certificate-authority": str(self.ca)}}],
            "users": [{"name": name, "user": {"token": token}}],
            "contexts": [{"name": name, "context": context}],
            "current-context": name,
        }
        path = self.dir / f"kubeconfig-{name}-{uuid.uuid4().hex[:8]}"
        path.write_text(yaml.safe_dump(doc), encoding="utf-8")
        return path

    def close(self) -> None:
        for proc, log in reversed(self._procs):
            terminate(proc, 15)
            log.close()


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    apiserver, etcd = _require_binaries()
    plane = ControlPlane(tmp_path_factory.mktemp("k8s"), apiserver, etcd)
    try:
        yield plane
    finally:
        plane.close()


@pytest.fixture(scope="session")
def kube(control_plane: ControlPlane) -> Any:
    """An admin ``Kube`` helper (see ``helpers.py``)."""
    from tests.k8s.helpers import Kube

    return Kube.from_kubeconfig(control_plane.admin_kubeconfig)


@pytest.fixture
def namespace(kube: Any) -> Iterator[str]:
    """A fresh namespace per test, so tests never see each other's pods."""
    name = "t-" + uuid.uuid4().hex[:10]
    kube.create_namespace(name)
    yield name
    kube.delete_namespace(name)


GAIE_CRD = Path(__file__).parent / "fixtures" / "gaie-v1.5.0" / "inference.networking.k8s.io_inferencepools.yaml"
"""GAIE's own InferencePool CRD (v1.5.0, vendored unchanged; the file's header says from where)."""


def install_inference_pool_crd(kube: Any) -> None:
    """Create GAIE's InferencePool CRD (kept if it is there) and wait until it is served."""
    from kubernetes import client

    crd = yaml.safe_load(GAIE_CRD.read_text(encoding="utf-8"))
    ext = client.ApiextensionsV1Api(kube.api_client)
    try:
        ext.create_custom_resource_definition(crd)
    except client.ApiException as exc:
        if exc.status != 409:
            raise
    custom = client.CustomObjectsApi(kube.api_client)
    deadline = time.monotonic() + 60
    while True:
        got = ext.read_custom_resource_definition(crd["metadata"]["name"])
        established = any(c.type == "Established" and c.status == "True" for c in (got.status.conditions or []))
        if established:
            try:
                custom.list_namespaced_custom_object("inference.networking.k8s.io", "v1", "default", "inferencepools")
                return
            except client.ApiException:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError("the InferencePool CRD was not established within 60s")
        time.sleep(0.1)


@pytest.fixture(scope="session")
def inference_pool_crd(kube: Any) -> None:
    """GAIE's InferencePool CRD, installed once per session."""
    install_inference_pool_crd(kube)
