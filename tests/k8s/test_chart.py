"""The Helm chart (deploy/helm/kvindex): ``helm lint`` and ``helm template`` pass, the rendered
objects say what the chart promises, and a real kube-apiserver accepts every rendered object with
``dryRun=All`` (strict field validation; minimal CRDs are installed for the optional kinds).

helm is built from its Go module by ``tools/helm/build-helm.sh`` (``$KVINDEX_HELM``, else the
script's cache). Without it (or without the control plane) the tests skip, unless
``KVINDEX_REQUIRE_K8S=1``, where that fails, like the rest of tests/k8s.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.k8s.conftest import ADMIN_TOKEN, GAIE_CRD, ControlPlane
from tests.k8s.helpers import PICKER_RULES, wait_for

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "kvindex"
HELM_VERSION = "v4.3.2"
RELEASE = "rel"
VALUES = {
    "default": None,
    "all-options": CHART / "ci" / "all-options-values.yaml",
    "replicas": CHART / "ci" / "replicas-values.yaml",
}
# Built-in kinds the chart may render: the API path segment and whether they are namespaced.
BUILTIN = {
    ("v1", "ServiceAccount"): "serviceaccounts",
    ("v1", "Service"): "services",
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Secret"): "secrets",
    ("v1", "PersistentVolumeClaim"): "persistentvolumeclaims",
    ("apps/v1", "Deployment"): "deployments",
    ("rbac.authorization.k8s.io/v1", "Role"): "roles",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "rolebindings",
    ("policy/v1", "PodDisruptionBudget"): "poddisruptionbudgets",
    ("networking.k8s.io/v1", "NetworkPolicy"): "networkpolicies",
}
CUSTOM = {
    ("inference.networking.k8s.io/v1", "InferencePool"): "inferencepools",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitors",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrules",
}


def _helm_binary() -> Path | None:
    explicit = os.environ.get("KVINDEX_HELM")
    if explicit:
        return Path(explicit) if os.access(explicit, os.X_OK) else None
    cache = Path(os.environ.get("KVINDEX_CACHE") or Path.home() / ".cache" / "kvindex")
    path = cache / f"helm-{HELM_VERSION}"
    if os.access(path, os.X_OK):
        return path
    found = shutil.which("helm")
    return Path(found) if found else None


@pytest.fixture(scope="session")
def helm() -> Path:
    path = _helm_binary()
    if path is None:
        reason = "no helm: run tools/helm/build-helm.sh or set KVINDEX_HELM"
        if os.environ.get("KVINDEX_REQUIRE_K8S"):
            pytest.fail(reason + " (KVINDEX_REQUIRE_K8S is set)", pytrace=False)
        pytest.skip(reason)
    return path


def run_helm(helm: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    # HELM_* dirs in a throwaway place: no user config, cache or plugins leak in or out
    home = Path(os.environ.get("TMPDIR", "/tmp")) / "kvindex-helm-home"
    env = {
        **os.environ,
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_DATA_HOME": str(home / "data"),
    }
    proc = subprocess.run([str(helm), *args], capture_output=True, text=True, env=env, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def render(helm: Path, values: Path | None = None, namespace: str = "llm", *sets: str) -> list[dict[str, Any]]:
    args = ["template", RELEASE, str(CHART), "--namespace", namespace]
    if values is not None:
        args += ["-f", str(values)]
    for s in sets:
        args += ["--set", s]
    out = run_helm(helm, *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name}, got {[d['metadata']['name'] for d in find(docs, kind)]}"
    return found[0]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


# --- helm lint / template -----------------------------------------------------------------------


def test_app_version_is_the_crate_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    cargo = tomllib.loads((ROOT / "Cargo.toml").read_text(encoding="utf-8"))
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == cargo["package"]["version"]


@pytest.mark.parametrize("values", sorted(VALUES))
def test_helm_lint(helm: Path, values: str) -> None:
    args = ["lint", "--strict", str(CHART)]
    if VALUES[values] is not None:
        args += ["-f", str(VALUES[values])]
    out = run_helm(helm, *args)
    assert "0 chart(s) failed" in out.stdout, out.stdout


@pytest.mark.parametrize("values", sorted(VALUES))
def test_helm_template_renders(helm: Path, values: str) -> None:
    docs = render(helm, VALUES[values])
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ServiceAccount"} <= kinds
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}
    for d in docs:
        assert d["metadata"]["namespace"] == "llm", d["metadata"]["name"]
        assert d["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE


def test_default_objects(helm: Path) -> None:
    docs = render(helm)
    names = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    assert names == [
        ("Deployment", "rel-kvindex"),
        ("Deployment", "rel-kvindex-picker"),
        ("PodDisruptionBudget", "rel-kvindex"),
        ("Role", "rel-kvindex-pod-discovery"),
        ("RoleBinding", "rel-kvindex-pod-discovery"),
        ("Service", "rel-kvindex"),
        ("Service", "rel-kvindex-picker"),
        ("ServiceAccount", "rel-kvindex"),
        ("ServiceAccount", "rel-kvindex-picker"),
    ]


def test_all_options_objects(helm: Path) -> None:
    docs = render(helm, VALUES["all-options"])
    kinds = {d["kind"] for d in docs}
    assert kinds == {k for _, k in BUILTIN} | {k for _, k in CUSTOM}


def test_discovery_args(helm: Path) -> None:
    docs = render(helm, None, "llm", "vllm.podLabels.app=llama", "discovery.dpSize=2", "discovery.unreadyGrace=5")
    c = container(one(docs, "Deployment", "rel-kvindex"))
    assert c["command"] == ["kvindex", "serve"]
    args = c["args"]
    assert "--discover" in args
    assert "--discovery-selector=app=llama" in args
    assert "--discovery-namespace=llm" in args
    assert "--zmq-bind=none" in args  # discovery connects; nothing binds
    env = env_of(c)
    assert env["KVINDEX_DISCOVERY__ZMQ_PORT"] == "5557"
    assert env["KVINDEX_DISCOVERY__REPLAY_PORT"] == "5558"
    assert env["KVINDEX_DISCOVERY__POD_PORT"] == "8000"
    assert env["KVINDEX_DISCOVERY__DP_SIZE"] == "2"
    assert env["KVINDEX_DISCOVERY__UNREADY_GRACE"] == "5"
    # an explicit selector string wins; no replay port, no variable
    docs = render(helm, VALUES["replicas"])
    c = container(one(docs, "Deployment", "rel-kvindex"))
    assert "--discovery-selector=app in (vllm-a,vllm-b)" in c["args"]
    assert "KVINDEX_DISCOVERY__REPLAY_PORT" not in env_of(c)
    assert one(docs, "Deployment", "rel-kvindex")["spec"]["replicas"] == 3


def test_the_rendered_args_are_real_flags(helm: Path) -> None:
    """Every flag the chart passes exists in `kvindex serve|extproc --help`."""
    import sys

    docs = render(helm, VALUES["all-options"])
    for name, command in (("rel-kvindex", "serve"), ("rel-kvindex-picker", "extproc")):
        help_text = subprocess.run(
            [sys.executable, "-m", "kvindex_service", command, "--help"],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
            timeout=60,
        ).stdout
        c = container(one(docs, "Deployment", name))
        assert c["command"] == ["kvindex", command]
        for arg in c["args"]:
            flag = arg.split("=", 1)[0]
            assert f"{flag} " in help_text or f"{flag}\n" in help_text or f"{flag}]" in help_text, (command, flag)


def test_discovery_off_means_no_rbac_and_no_token(helm: Path) -> None:
    docs = render(helm, None, "llm", "discovery.enabled=false", "zmq.bind.enabled=true", "replicaCount=1")
    assert not find(docs, "Role") and not find(docs, "RoleBinding")
    pod = one(docs, "Deployment", "rel-kvindex")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert one(docs, "ServiceAccount", "rel-kvindex")["automountServiceAccountToken"] is False
    c = container(one(docs, "Deployment", "rel-kvindex"))
    assert "--discover" not in c["args"] and "--zmq-bind=tcp://0.0.0.0:5557" in c["args"]
    ports = {p["name"]: p["port"] for p in one(docs, "Service", "rel-kvindex")["spec"]["ports"]}
    assert ports == {"http": 8080, "zmq": 5557}


def test_role_is_pod_read_only(helm: Path) -> None:
    docs = render(helm)
    role = one(docs, "Role", "rel-kvindex-pod-discovery")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    binding = one(docs, "RoleBinding", "rel-kvindex-pod-discovery")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "rel-kvindex", "namespace": "llm"}]
    pod = one(docs, "Deployment", "rel-kvindex")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "rel-kvindex" and pod["automountServiceAccountToken"] is True
    picker = one(docs, "Deployment", "rel-kvindex-picker")["spec"]["template"]["spec"]
    assert picker["serviceAccountName"] == "rel-kvindex-picker" and picker["automountServiceAccountToken"] is False


@pytest.mark.parametrize("values", sorted(VALUES))
def test_security_context(helm: Path, values: str) -> None:
    docs = render(helm, VALUES[values])
    for dep in find(docs, "Deployment"):
        pod = dep["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        c = container(dep)
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["runAsNonRoot"] is True
        assert sc["capabilities"] == {"drop": ["ALL"]}
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]


def test_probes(helm: Path) -> None:
    c = container(one(render(helm), "Deployment", "rel-kvindex"))
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    # the picker: GAIE's probes, grpc.health.v1 on the health port with service names
    picker = container(one(render(helm), "Deployment", "rel-kvindex-picker"))
    assert picker["livenessProbe"]["grpc"] == {"port": 9003, "service": "liveness"}
    assert picker["readinessProbe"]["grpc"] == {"port": 9003, "service": "readiness"}
    assert "--health-port=9003" in picker["args"]
    assert {"name": "grpc-health", "containerPort": 9003, "protocol": "TCP"} in picker["ports"]
    # with TLS the service's probes speak HTTPS; the picker's health port stays plaintext gRPC
    docs = render(helm, VALUES["all-options"])
    c = container(one(docs, "Deployment", "rel-kvindex"))
    assert c["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http", "scheme": "HTTPS"}
    picker = container(one(docs, "Deployment", "rel-kvindex-picker"))
    assert picker["readinessProbe"]["grpc"] == {"port": 9003, "service": "readiness"}


def test_auth_tls_and_picker_wiring(helm: Path) -> None:
    docs = render(helm, VALUES["all-options"])
    secret = one(docs, "Secret", "rel-kvindex-auth")
    ref = {"secretKeyRef": {"name": "rel-kvindex-auth", "key": "token"}}
    c = container(one(docs, "Deployment", "rel-kvindex"))
    assert env_of(c)["KVINDEX_HTTP__AUTH_TOKEN"] == ref
    assert "--tls-cert=/etc/kvindex/tls/tls.crt" in c["args"] and "--tls-key=/etc/kvindex/tls/tls.key" in c["args"]
    assert "--warm-from=https://rel-kvindex.llm.svc:8080" in c["args"]
    assert secret["type"] == "Opaque" and set(secret["data"]) == {"token"}
    p = container(one(docs, "Deployment", "rel-kvindex-picker"))
    assert env_of(p)["KVINDEX_SCORER_TOKEN"] == ref
    args = p["args"]
    assert "--scorer-url=https://rel-kvindex.llm.svc:8080" in args
    assert "--scorer-ca-file=/etc/kvindex/scorer-ca/ca.crt" in args
    assert {"--tls-cert=/etc/kvindex/picker-tls/tls.crt", "--tls-key=/etc/kvindex/picker-tls/tls.key"} <= set(args)
    assert "--tls-client-ca=/etc/kvindex/picker-client-ca/ca.crt" in args
    # the pool's endpoint picker: the pool's pods, no static list
    assert {"--pool-name=vllm-llama3", "--pool-namespace=llm", "--ready-without-scorer"} <= set(args)
    assert not [a for a in args if a.startswith("--endpoint")]
    assert "--max-inflight=64" in args and "--metrics-port=9090" in args
    # an existing Secret: referenced, not rendered
    docs = render(helm, VALUES["replicas"])
    assert not find(docs, "Secret")
    c = container(one(docs, "Deployment", "rel-kvindex"))
    assert env_of(c)["KVINDEX_HTTP__AUTH_TOKEN"] == {"secretKeyRef": {"name": "kvindex-token", "key": "token"}}
    assert (
        "--scorer-url=http://rel-kvindex.llm.svc:8080"
        in container(one(docs, "Deployment", "rel-kvindex-picker"))["args"]
    )
    args = container(one(docs, "Deployment", "rel-kvindex-picker"))["args"]
    assert [a for a in args if a.startswith("--endpoint")] == ["--endpoint=10.0.0.1:8000", "--endpoint=10.0.0.2:8000"]
    assert not [a for a in args if a.startswith("--pool")]


def test_picker_reads_its_pool_with_its_own_role(helm: Path) -> None:
    """As the pool's endpoint picker, the picker gets a token and a Role that grants exactly
    get/list/watch on pods and inferencepools (the rules tests/k8s/test_gaie_picker.py runs
    the real picker with)."""
    docs = render(helm, None, "llm", "inferencePool.enabled=true")
    role = one(docs, "Role", "rel-kvindex-picker-endpoints")
    assert role["rules"] == PICKER_RULES
    binding = one(docs, "RoleBinding", "rel-kvindex-picker-endpoints")
    assert binding["roleRef"]["name"] == "rel-kvindex-picker-endpoints"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "rel-kvindex-picker", "namespace": "llm"}]
    picker = one(docs, "Deployment", "rel-kvindex-picker")["spec"]["template"]["spec"]
    assert picker["automountServiceAccountToken"] is True
    assert one(docs, "ServiceAccount", "rel-kvindex-picker")["automountServiceAccountToken"] is True
    pool = one(docs, "InferencePool", "rel-kvindex")
    assert {"--pool-name=rel-kvindex", "--pool-namespace=llm"} <= set(
        container(one(docs, "Deployment", "rel-kvindex-picker"))["args"]
    )
    assert pool["spec"]["endpointPickerRef"]["name"] == "rel-kvindex-picker"
    # GAIE's standalone mode: a selector, pods only
    docs = render(helm, None, "llm", "picker.endpointSelector=app=vllm", "picker.endpointTargetPorts={8000}")
    assert one(docs, "Role", "rel-kvindex-picker-endpoints")["rules"] == PICKER_RULES[:1]
    args = container(one(docs, "Deployment", "rel-kvindex-picker"))["args"]
    assert {"--endpoint-selector=app=vllm", "--endpoint-target-ports=8000"} <= set(args)
    # without either: no token, no Role
    docs = render(helm)
    assert not [d for d in find(docs, "Role") if d["metadata"]["name"] == "rel-kvindex-picker-endpoints"]


def test_snapshot_volume(helm: Path) -> None:
    docs = render(helm, VALUES["replicas"])
    dep = one(docs, "Deployment", "rel-kvindex")
    c = container(dep)
    assert "--snapshot-file=/var/lib/kvindex/kvindex.snapshot" in c["args"]
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes["snapshot"]
    assert "strategy" not in dep["spec"]
    docs = render(helm, VALUES["all-options"])
    dep = one(docs, "Deployment", "rel-kvindex")
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["snapshot"]["persistentVolumeClaim"] == {"claimName": "rel-kvindex-snapshot"}
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    pvc = one(docs, "PersistentVolumeClaim", "rel-kvindex-snapshot")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "8Gi"
    assert env_of(container(dep))["KVINDEX_SNAPSHOT__INTERVAL"] == "120"


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["zmq.bind.enabled=true"], "zmq.bind.enabled needs replicaCount 1"),
        (["snapshot.file.enabled=true", "snapshot.file.volumeType=persistentVolumeClaim"], "needs replicaCount 1"),
        (["tls.enabled=true"], "tls.enabled needs tls.secretName"),
        (["picker.enabled=false", "inferencePool.enabled=true"], "inferencePool.enabled needs picker.enabled"),
        (["inferencePool.enabled=true", "picker.endpoints={10.0.0.1:8000}"], "picker.endpoints is for a static list"),
        (["picker.endpointSelector=app=x"], "picker.endpointSelector needs picker.endpointTargetPorts"),
        (["replicaCount=-1"], "replicaCount"),
    ],
)
def test_inconsistent_values_are_refused(helm: Path, sets: list[str], message: str) -> None:
    args = ["template", RELEASE, str(CHART)]
    for s in sets:
        args += ["--set", s]
    proc = run_helm(helm, *args, check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


def test_network_policies(helm: Path) -> None:
    docs = render(helm, VALUES["all-options"])
    own = one(docs, "NetworkPolicy", "rel-kvindex")["spec"]
    zmq_rule = [r for r in own["ingress"] if r["ports"][0]["port"] == 5557]
    assert zmq_rule == [
        {
            "ports": [{"port": 5557, "protocol": "TCP"}],
            "from": [{"podSelector": {"matchLabels": {"app": "vllm", "model": "llama-3-2-3b"}}}],
        }
    ]
    vllm = one(docs, "NetworkPolicy", "rel-kvindex-vllm")["spec"]
    assert vllm["podSelector"] == {"matchLabels": {"app": "vllm", "model": "llama-3-2-3b"}}
    events = vllm["ingress"][0]
    assert events["ports"] == [
        {"port": 5557, "endPort": 5558, "protocol": "TCP"},  # dpSize 2: rank 1 on port + 1
        {"port": 5558, "endPort": 5559, "protocol": "TCP"},
    ]
    assert events["from"] == [
        {
            "podSelector": {
                "matchLabels": {
                    "app.kubernetes.io/name": "kvindex",
                    "app.kubernetes.io/instance": RELEASE,
                    "app.kubernetes.io/component": "scorer",
                }
            }
        }
    ]
    # the policy's source selector matches the service's pods
    pod_labels = one(docs, "Deployment", "rel-kvindex")["spec"]["template"]["metadata"]["labels"]
    assert events["from"][0]["podSelector"]["matchLabels"].items() <= pod_labels.items()


def test_monitoring_objects_come_from_deploy_files(helm: Path) -> None:
    docs = render(helm, VALUES["all-options"])
    alerts = ROOT / "deploy" / "prometheus" / "alerts.yaml"
    rule = one(docs, "PrometheusRule", "rel-kvindex")
    assert rule["spec"] == yaml.safe_load(alerts.read_text(encoding="utf-8"))
    dashboard = ROOT / "deploy" / "grafana" / "kvindex.json"
    cm = one(docs, "ConfigMap", "rel-kvindex-dashboard")
    assert json.loads(cm["data"]["kvindex.json"]) == json.loads(dashboard.read_text(encoding="utf-8"))
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    monitors = {m["metadata"]["name"]: m["spec"] for m in find(docs, "ServiceMonitor")}
    assert set(monitors) == {"rel-kvindex", "rel-kvindex-picker"}
    scorer = monitors["rel-kvindex"]["endpoints"][0]
    assert scorer["honorLabels"] is True and scorer["scheme"] == "https"
    assert scorer["authorization"] == {"type": "Bearer", "credentials": {"name": "rel-kvindex-auth", "key": "token"}}
    pool = one(docs, "InferencePool", "vllm-llama3")["spec"]
    assert pool["endpointPickerRef"] == {
        "kind": "Service",
        "name": "rel-kvindex-picker",
        "port": {"number": 9002},
        "failureMode": "FailOpen",
    }
    assert pool["targetPorts"] == [{"number": 8000}]


# --- against the real API server ----------------------------------------------------------------

_MINIMAL_CRDS: list[dict[str, Any]] = []


def _crd(group: str, kind: str, plural: str, spec_schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{group}",
            # *.k8s.io groups are protected: the upstream CRD carries this annotation too
            "annotations": {
                "api-approved.kubernetes.io": "https://github.com/kubernetes-sigs/gateway-api-inference-extension"
            }
            if group.endswith(".k8s.io")
            else {},
        },
        "spec": {
            "group": group,
            "names": {"kind": kind, "plural": plural, "singular": kind.lower(), "listKind": kind + "List"},
            "scope": "Namespaced",
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                            },
                            "required": ["spec"],
                        }
                    },
                }
            ],
        },
    }


# InferencePool v1 is GAIE's own CRD (v1.5.0, vendored in tests/k8s/fixtures), so strict
# validation catches a misspelt or misplaced field exactly as a cluster running GAIE would.
INFERENCE_POOL_CRD: dict[str, Any] = yaml.safe_load(GAIE_CRD.read_text(encoding="utf-8"))
# prometheus-operator's CRDs are large; these check only the object's envelope and spec's type.
SERVICE_MONITOR_CRD = _crd(
    "monitoring.coreos.com",
    "ServiceMonitor",
    "servicemonitors",
    {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
)
PROMETHEUS_RULE_CRD = _crd(
    "monitoring.coreos.com",
    "PrometheusRule",
    "prometheusrules",
    {
        "type": "object",
        "properties": {
            "groups": {"type": "array", "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}
        },
        "required": ["groups"],
    },
)


class Api:
    """Raw REST access as the admin, to POST any kind with query parameters."""

    def __init__(self, plane: ControlPlane) -> None:
        ctx = ssl.create_default_context(cafile=str(plane.ca))
        self.http = httpx.Client(
            base_url=plane.server, verify=ctx, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30
        )

    def post(self, path: str, body: dict[str, Any], **params: str) -> httpx.Response:
        return self.http.post(path, json=body, params=params)

    def get(self, path: str) -> httpx.Response:
        return self.http.get(path)


def _path(api_version: str, plural: str, namespace: str) -> str:
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{base}/namespaces/{namespace}/{plural}"


@pytest.fixture(scope="module")
def api(control_plane: ControlPlane) -> Iterator[Api]:
    client = Api(control_plane)
    try:
        _install_crds(client)
        yield client
    finally:
        client.http.close()


def _install_crds(client: Api) -> None:
    for crd in (INFERENCE_POOL_CRD, SERVICE_MONITOR_CRD, PROMETHEUS_RULE_CRD):
        resp = client.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
        assert resp.status_code in (201, 409), resp.text
    for crd in (INFERENCE_POOL_CRD, SERVICE_MONITOR_CRD, PROMETHEUS_RULE_CRD):
        name = crd["metadata"]["name"]
        group, version, plural = crd["spec"]["group"], "v1", crd["spec"]["names"]["plural"]

        def established(name: str = name, group: str = group, plural: str = plural) -> bool:
            got = client.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}").json()
            conditions = (got.get("status") or {}).get("conditions") or []  # null until the controller runs
            served = client.get(f"/apis/{group}/{version}").status_code == 200
            return served and any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

        wait_for(established, what=f"CRD {name} established")


@pytest.mark.parametrize("values", sorted(VALUES))
def test_apiserver_accepts_every_object(helm: Path, api: Api, namespace: str, values: str) -> None:
    docs = render(helm, VALUES[values], namespace)
    checked = []
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        plural = BUILTIN.get(key) or CUSTOM.get(key)
        assert plural, f"the chart rendered a kind this test does not know: {key}"
        ns = doc["metadata"].get("namespace", namespace)
        resp = api.post(_path(doc["apiVersion"], plural, ns), doc, dryRun="All", fieldValidation="Strict")
        assert resp.status_code == 201, f"{doc['kind']} {doc['metadata']['name']}: {resp.status_code} {resp.text}"
        assert resp.headers.get("warning") is None, resp.headers.get("warning")
        checked.append(doc["kind"])
    # dry run: nothing was stored
    listed = api.get(_path("apps/v1", "deployments", namespace)).json()
    assert listed["items"] == []
    assert "Deployment" in checked


def test_role_grants_exactly_pod_reads(helm: Path, api: Api, kube: Any, namespace: str) -> None:
    """Create the rendered RBAC for real, then ask the authorizer what the account may do."""
    docs = render(helm, None, namespace)
    for doc in docs:
        if doc["kind"] in {"ServiceAccount", "Role", "RoleBinding"}:
            plural = BUILTIN[(doc["apiVersion"], doc["kind"])]
            resp = api.post(_path(doc["apiVersion"], plural, namespace), doc)
            assert resp.status_code == 201, resp.text
    other = "t-" + uuid.uuid4().hex[:10]
    kube.create_namespace(other)
    user = f"system:serviceaccount:{namespace}:rel-kvindex"

    def allowed(verb: str, resource: str, ns: str, group: str = "", sub: str = "") -> bool:
        review = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": user,
                "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"],
                "resourceAttributes": {
                    "namespace": ns,
                    "verb": verb,
                    "group": group,
                    "resource": resource,
                    "subresource": sub,
                },
            },
        }
        resp = api.post("/apis/authorization.k8s.io/v1/subjectaccessreviews", review)
        assert resp.status_code == 201, resp.text
        return bool(resp.json()["status"].get("allowed"))

    try:
        for verb in ("get", "list", "watch"):
            assert allowed(verb, "pods", namespace), verb
        for verb in ("create", "update", "patch", "delete", "deletecollection"):
            assert not allowed(verb, "pods", namespace), verb
        assert not allowed("get", "pods", namespace, sub="log")
        assert not allowed("create", "pods", namespace, sub="exec")
        assert not allowed("patch", "pods", namespace, sub="status")
        for resource, group in (("secrets", ""), ("configmaps", ""), ("services", ""), ("deployments", "apps")):
            assert not allowed("list", resource, namespace, group), resource
        assert not allowed("list", "pods", other)
        assert not allowed("list", "pods", "")  # all namespaces
    finally:
        kube.delete_namespace(other)


def test_the_dry_run_check_bites(helm: Path, api: Api, namespace: str) -> None:
    """Negative control: the same dry run refuses a misspelt field, a bad enum in the
    InferencePool and an invalid built-in object, so the acceptance above means something."""
    docs = render(helm, VALUES["all-options"], namespace)
    dep = json.loads(json.dumps(one(docs, "Deployment", "rel-kvindex")))
    dep["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFileSystem"] = True  # capital S
    pool = json.loads(json.dumps(one(docs, "InferencePool", "vllm-llama3")))
    pool["spec"]["endpointPickerRef"]["failureMode"] = "FailSometimes"
    role = json.loads(json.dumps(one(docs, "Role", "rel-kvindex-pod-discovery")))
    role["rules"][0]["verbs"] = []
    for doc, code in ((dep, 400), (pool, 422), (role, 422)):
        plural = BUILTIN.get((doc["apiVersion"], doc["kind"])) or CUSTOM[(doc["apiVersion"], doc["kind"])]
        resp = api.post(_path(doc["apiVersion"], plural, namespace), doc, dryRun="All", fieldValidation="Strict")
        assert resp.status_code == code, f"{doc['kind']}: {resp.status_code} {resp.text}"
