"""Serving endpoints from Kubernetes, for the endpoint picker: the Ready pods of a GAIE
``InferencePool`` (or of a label selector, GAIE's standalone mode), each ``podIP:targetPort``.

Two :class:`~.watch.ListWatch` loops, the same code the scoring service's pod discovery runs:

* with a pool, one watches the ``InferencePool`` by name (``inference.networking.k8s.io/v1``)
  and reads ``spec.selector.matchLabels`` and ``spec.targetPorts[].number``; when those change,
  the pod watch restarts on the new selector and the targets take the new ports; when the pool
  is deleted, nothing is eligible until it comes back;
* the other watches the pods and feeds a :class:`~.reconcile.Reconciler` with no unready grace
  (a pod that is not Ready, is being deleted or is gone is dropped at once).

Every change hands the whole endpoint list to ``on_change`` (from a watch thread, under the
watch's lock, so calls never cross).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kvindex_service.discovery.kube import PodApi, load_client, pool_api
from kvindex_service.discovery.reconcile import Action, Reconciler, Subscribe, TargetPorts, Unsubscribe
from kvindex_service.discovery.watch import ListWatch, WatchApi

__all__ = ["EndpointWatch", "PoolSpec", "pool_spec"]

log = logging.getLogger(__name__)

_MAX_PORTS = 8  # the CRD allows 8 targetPorts


@dataclass(frozen=True)
class PoolSpec:
    """What the picker reads from an InferencePool: a label selector and the target ports."""

    selector: str
    ports: tuple[int, ...]


def selector_string(labels: Mapping[str, str]) -> str:
    """``{"app": "vllm", "tier": "a"}`` -> ``app=vllm,tier=a`` (sorted)."""
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def pool_spec(pool: Mapping[str, Any]) -> PoolSpec:
    """Read an InferencePool object (the API server's JSON); ``ValueError`` names what is
    missing. An empty ``matchLabels`` would select every pod of the namespace: refused."""
    spec = pool.get("spec")
    if not isinstance(spec, Mapping):
        raise ValueError("InferencePool without spec")
    labels = (spec.get("selector") or {}).get("matchLabels")
    if not isinstance(labels, Mapping) or not labels:
        raise ValueError("InferencePool spec.selector.matchLabels is empty")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise ValueError("InferencePool spec.selector.matchLabels must map strings to strings")
    ports: list[int] = []
    for entry in spec.get("targetPorts") or ():
        number = entry.get("number") if isinstance(entry, Mapping) else None
        if isinstance(number, int) and not isinstance(number, bool) and 0 < number < 65536 and number not in ports:
            ports.append(number)
    if not ports:
        raise ValueError("InferencePool spec.targetPorts has no port number")
    return PoolSpec(selector_string(labels), tuple(ports[:_MAX_PORTS]))


class _PodHandler:
    """Pod events -> the reconciler -> the endpoint list (under the watch's lock)."""

    def __init__(self, owner: EndpointWatch) -> None:
        self._owner = owner
        self.active = True
        """False once the pod watch it belongs to is replaced: late events are ignored."""

    def replace(self, objects: list[dict[str, Any]]) -> None:
        self._owner._apply(lambda r, now: r.replace(objects, now), self)

    def upsert(self, obj: dict[str, Any]) -> None:
        self._owner._apply(lambda r, now: r.upsert(obj, now), self)

    def delete(self, obj: dict[str, Any]) -> None:
        self._owner._apply(lambda r, now: r.delete(obj, now), self)


class _PoolHandler:
    """InferencePool events (one object, listed by name) -> the pod watch's selector and ports."""

    def __init__(self, owner: EndpointWatch) -> None:
        self._owner = owner

    def replace(self, objects: list[dict[str, Any]]) -> None:
        self._owner._pool(objects[0] if objects else None)

    def upsert(self, obj: dict[str, Any]) -> None:
        self._owner._pool(obj)

    def delete(self, obj: dict[str, Any]) -> None:
        self._owner._pool(None)


class EndpointWatch:
    """Keep ``on_change(endpoints)`` told of the Ready pods of a pool (``pool_name``) or of a
    label ``selector`` with fixed ``ports``. ``start`` raises ``ValueError`` when there is no
    usable Kubernetes configuration; an unreachable API server is retried, not an error."""

    def __init__(
        self,
        on_change: Callable[[list[str]], None],
        *,
        namespace: str | None = None,
        pool_name: str | None = None,
        selector: str | None = None,
        ports: tuple[int, ...] = (),
        kubeconfig: str | None = None,
        watch_timeout: int = 300,
        pod_api: Callable[[], WatchApi] | None = None,
        pool_api_factory: Callable[[], WatchApi] | None = None,
    ) -> None:
        if (pool_name is None) == (selector is None):
            raise ValueError("give either an InferencePool name or a label selector")
        if selector is not None and not ports:
            raise ValueError("a label selector needs target ports")
        self.on_change = on_change
        self.namespace = namespace
        self.pool_name = pool_name
        self.kubeconfig = kubeconfig
        self._timeout = watch_timeout
        self._pod_api = pod_api
        self._pool_api = pool_api_factory
        self._lock = threading.RLock()
        self._stopped = False
        self.reconciler = Reconciler(TargetPorts(ports), unready_grace=0.0)
        self.spec: PoolSpec | None = None if pool_name else PoolSpec(str(selector), ports)
        self.pool_error: str | None = None
        self._pods: ListWatch | None = None
        self._pod_handler: _PodHandler | None = None
        self._pool_loop: ListWatch | None = None
        self._endpoints: list[str] = []
        self._published = False

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._pod_api is None or (self.pool_name and self._pool_api is None):
            api_client, ns = load_client(self.kubeconfig, self.namespace)
            self.namespace = ns
            if self._pod_api is None:
                from kubernetes import client

                core = client.CoreV1Api(api_client)
                self._pod_api = lambda: PodApi(core)
            if self._pool_api is None:
                self._pool_api = lambda: pool_api(api_client)
        self.namespace = self.namespace or "default"
        with self._lock:
            if self.pool_name:
                assert self._pool_api is not None
                self._pool_loop = ListWatch(
                    self._pool_api(),
                    self.namespace,
                    f"metadata.name={self.pool_name}",
                    _PoolHandler(self),
                    watch_timeout=self._timeout,
                    name="kvindex-pool-watch",
                    what=f"InferencePool {self.pool_name}",
                )
                self._pool_loop.start()
            else:
                self._restart_pods()
        log.info(
            "endpoint discovery started: namespace=%s %s",
            self.namespace,
            f"pool={self.pool_name}" if self.pool_name else f"selector={self.spec.selector if self.spec else ''!r}",
        )

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._stopped = True
            loops = [x for x in (self._pool_loop, self._pods) if x is not None]
        for loop in loops:
            loop.stop(timeout)

    @property
    def synced(self) -> bool:
        """The pool (if any) and then its pods have been listed."""
        with self._lock:
            pods = self._pods
        return pods is not None and pods.synced

    def endpoints(self) -> list[str]:
        with self._lock:
            return list(self._endpoints)

    def counters(self) -> dict[str, int]:
        loops = [x for x in (self._pool_loop, self._pods) if x is not None]
        return {
            "lists": sum(x.lists for x in loops),
            "resyncs": sum(x.resyncs for x in loops),
            "watch_errors": sum(x.watch_errors for x in loops),
        }

    # -- the pool ----------------------------------------------------------------------------

    def _pool(self, obj: dict[str, Any] | None) -> None:
        spec: PoolSpec | None = None
        if obj is None:
            self.pool_error = f"InferencePool {self.namespace}/{self.pool_name} not found"
        else:
            try:
                spec = pool_spec(obj)
                self.pool_error = None
            except ValueError as exc:
                self.pool_error = f"InferencePool {self.namespace}/{self.pool_name}: {exc}"
        if self.pool_error:
            log.warning("%s: no endpoint is eligible", self.pool_error)
        with self._lock:
            if self._stopped or spec == self.spec:
                return
            old, self.spec = self.spec, spec
            if spec is None:
                self._stop_pods()
                self._apply(lambda r, now: r.replace([], now))
            elif old is None or old.selector != spec.selector:
                self._apply(lambda r, now: r.set_ports(TargetPorts(spec.ports), now))
                self._restart_pods()
            else:
                self._apply(lambda r, now: r.set_ports(TargetPorts(spec.ports), now))
            log.info(
                "InferencePool %s: selector %r, ports %s", self.pool_name, spec and spec.selector, spec and spec.ports
            )

    def _stop_pods(self) -> None:
        if self._pod_handler is not None:
            self._pod_handler.active = False
        if self._pods is not None:
            self._pods.stop(timeout=0.0)
            self._pods = None

    def _restart_pods(self) -> None:
        """(Re)start the pod watch on ``self.spec.selector`` (caller holds the lock)."""
        self._stop_pods()
        assert self.spec is not None and self._pod_api is not None and self.namespace is not None
        self._pod_handler = _PodHandler(self)
        self._pods = ListWatch(
            self._pod_api(),
            self.namespace,
            self.spec.selector,
            self._pod_handler,
            watch_timeout=self._timeout,
            name="kvindex-endpoint-watch",
            what="pods",
        )
        self._pods.start()

    # -- the pods ----------------------------------------------------------------------------

    def _apply(self, decide: Callable[[Reconciler, float], list[Action]], source: _PodHandler | None = None) -> None:
        """Run one reconciler call and publish the endpoint list if it changed (``source``: the
        pod watch it comes from, ignored once replaced)."""
        with self._lock:
            if self._stopped or (source is not None and not source.active):
                return
            actions = decide(self.reconciler, time.monotonic())
            for action in actions:
                verb = "added" if isinstance(action, Subscribe) else "dropped"
                why = f" ({action.reason})" if isinstance(action, Unsubscribe) else ""
                log.info("endpoint pod %s %s: %s%s", action.target.name, verb, ", ".join(action.target.pod_ids), why)
            endpoints = sorted(ep for t in self.reconciler.targets() for ep in t.pod_ids)
            if endpoints != self._endpoints or not self._published:
                self._endpoints = endpoints
                self._published = True
                self.on_change(list(endpoints))
