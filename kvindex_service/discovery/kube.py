"""Talking to the Kubernetes API server: client configuration, namespace, list and watch.

Only I/O lives here; the decisions are in ``reconcile.py`` (pods) and ``endpoints.py`` (a GAIE
``InferencePool``). Objects travel as the API server's JSON (plain dicts), never as the
client's generated models: cheaper, and the unit tests feed the same shapes. One
:class:`ObjectApi` lists and watches one kind of object; :class:`PodApi` (pods by label
selector) and :func:`pool_api` (InferencePools by name) are the two kinds kvindex watches.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "POOL_GROUP",
    "POOL_PLURAL",
    "POOL_VERSION",
    "SA_NAMESPACE_FILE",
    "Gone",
    "KubeError",
    "ObjectApi",
    "PodApi",
    "load_api",
    "load_client",
    "pool_api",
]

SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
_CONNECT_TIMEOUT = 5.0
POOL_GROUP = "inference.networking.k8s.io"
POOL_VERSION = "v1"
POOL_PLURAL = "inferencepools"


class KubeError(Exception):
    """The API server answered with an error (or not at all)."""


class Gone(KubeError):
    """410 Gone: the resourceVersion is too old to watch from; list again."""


def _in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and SA_NAMESPACE_FILE.parent.is_dir()


def load_api(kubeconfig: str | None, namespace: str | None) -> tuple[PodApi, str]:
    """A pod API client and the namespace to watch (see :func:`load_client`)."""
    from kubernetes import client

    api_client, ns = load_client(kubeconfig, namespace)
    return PodApi(client.CoreV1Api(api_client)), ns


def load_client(kubeconfig: str | None, namespace: str | None) -> tuple[Any, str]:
    """A ``kubernetes.client.ApiClient`` and the namespace to watch.

    Configuration: the in-cluster service account when running in a pod (and no
    ``kubeconfig`` is given), else ``kubeconfig`` or ``$KUBECONFIG`` or ``~/.kube/config``.
    Namespace: ``namespace``, else the pod's own (service account), else the kubeconfig
    context's, else ``default``. Raises ``ValueError`` with a one-line reason.
    """
    from kubernetes import client
    from kubernetes import config as _config

    config: Any = _config  # the client's loaders carry no annotations
    cfg = client.Configuration()
    ns = namespace
    try:
        if kubeconfig is None and _in_cluster():
            config.load_incluster_config(client_configuration=cfg)
            if ns is None:
                ns = SA_NAMESPACE_FILE.read_text(encoding="utf-8").strip() or None
        else:
            path = kubeconfig or os.environ.get("KUBECONFIG") or None
            config.load_kube_config(config_file=path, client_configuration=cfg)
            if ns is None:
                _, active = config.list_kube_config_contexts(config_file=path)
                ns = (active or {}).get("context", {}).get("namespace") or None
    except (config.ConfigException, OSError, ValueError, TypeError, KeyError) as exc:
        where = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config (not in a cluster)"
        raise ValueError(f"no Kubernetes configuration ({where}): {' '.join(str(exc).split())}") from None
    return client.ApiClient(cfg), ns or "default"


def _body(resp: Any) -> Any:
    status = int(getattr(resp, "status", 0) or 0)
    data = resp.data
    if not 200 <= status <= 299:
        message = ""
        try:
            message = json.loads(data).get("message", "")
        except (ValueError, AttributeError):
            message = data[:200].decode("utf-8", "replace") if isinstance(data, bytes) else ""
        if status == 410:
            raise Gone(f"410 Gone: {message}")
        raise KubeError(f"HTTP {status}: {message}")
    return json.loads(data)


def _lines(resp: Any) -> Iterator[bytes]:
    """The newline-delimited JSON lines of a streaming response, as they arrive."""
    buffer = b""
    for chunk in resp.stream(amt=None, decode_content=False):
        buffer += chunk if isinstance(chunk, bytes) else str(chunk).encode("utf-8")
        *lines, buffer = buffer.split(b"\n")
        yield from lines
    if buffer:
        yield buffer


class ObjectApi:
    """List and watch the objects of one kind in one namespace matching a selector.

    ``list_call(namespace, **kwargs)`` is the client's list method for the kind (it takes
    ``watch``, ``resource_version``, ``label_selector`` / ``field_selector``...); ``selector``
    arguments go to ``selector_arg``."""

    def __init__(self, list_call: Callable[..., Any], selector_arg: str = "label_selector") -> None:
        self._call = list_call
        self._selector_arg = selector_arg
        self._resp: Any = None

    def list(self, namespace: str, selector: str) -> tuple[list[dict[str, Any]], str]:
        """Every matching object and the list's resourceVersion."""
        from kubernetes.client.exceptions import ApiException

        try:
            resp = self._call(
                namespace,
                **{self._selector_arg: selector},
                _preload_content=False,
                _request_timeout=(_CONNECT_TIMEOUT, 60.0),
            )
        except ApiException as exc:
            if exc.status == 410:
                raise Gone(str(exc.reason)) from None
            raise KubeError(f"HTTP {exc.status}: {exc.reason}") from None
        body = _body(resp)
        items = body.get("items") or []
        return list(items), str(body["metadata"]["resourceVersion"])

    def watch(self, namespace: str, selector: str, resource_version: str, timeout: int) -> Iterator[dict[str, Any]]:
        """Watch events (``{"type", "object"}``) after ``resource_version``, until the server
        ends the watch (``timeout`` seconds) or :meth:`interrupt`. ``Gone`` on 410."""
        from kubernetes.client.exceptions import ApiException

        try:
            resp = self._call(
                namespace,
                **{self._selector_arg: selector},
                watch=True,
                resource_version=resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=timeout,
                _preload_content=False,
                _request_timeout=(_CONNECT_TIMEOUT, timeout + 30.0),
            )
        except ApiException as exc:
            if exc.status == 410:
                raise Gone(str(exc.reason)) from None
            raise KubeError(f"HTTP {exc.status}: {exc.reason}") from None
        self._resp = resp
        try:
            status = int(getattr(resp, "status", 0) or 0)
            if not 200 <= status <= 299:
                _body(resp)
            for line in _lines(resp):
                if not line.strip():
                    continue
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    obj = event.get("object") or {}
                    if obj.get("code") == 410:
                        raise Gone(f"410 Gone: {obj.get('message', '')}")
                    raise KubeError(f"watch error {obj.get('code')}: {obj.get('message', '')}")
                yield event
        finally:
            self._resp = None
            resp.close()
            resp.release_conn()

    def interrupt(self) -> None:
        """Unblock a watch read from another thread (shutdown)."""
        resp = self._resp
        sock = getattr(getattr(resp, "connection", None), "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class PodApi(ObjectApi):
    """Pods of one namespace matching a label selector (``core`` is a ``CoreV1Api``)."""

    def __init__(self, core: Any) -> None:
        super().__init__(core.list_namespaced_pod)
        self._core = core

    def fork(self) -> PodApi:
        """Another PodApi on the same client (one watch connection each)."""
        return PodApi(self._core)


def pool_api(api_client: Any) -> ObjectApi:
    """GAIE ``InferencePool`` objects (``inference.networking.k8s.io/v1``); the selector is a
    field selector such as ``metadata.name=NAME``."""
    from kubernetes import client

    custom = client.CustomObjectsApi(api_client)

    def call(namespace: str, **kwargs: Any) -> Any:
        return custom.list_namespaced_custom_object(POOL_GROUP, POOL_VERSION, namespace, POOL_PLURAL, **kwargs)

    return ObjectApi(call, "field_selector")
