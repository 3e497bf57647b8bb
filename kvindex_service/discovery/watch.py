"""Pod discovery's I/O: list + watch the API server, carry out the reconciler's actions.

Two daemon threads, because the ``kubernetes`` client blocks:

* ``kvindex-discovery``: list (resourceVersion R), then watch from R; a watch the server ends
  (``timeout_seconds``) is re-opened from the last resourceVersion seen; 410 Gone re-lists at
  once (a *resync*); any other failure counts a watch error, waits (doubling backoff, capped)
  and re-lists, so nothing that changed while disconnected is missed;
* ``kvindex-discovery-timer``: runs :meth:`Reconciler.tick` for the unready grace and retries.

Both hand the reconciler's actions to the :class:`~kvindex_service.events.Subscriber` through
its thread-safe ``add_pod`` / ``remove_pod`` (``remove_pod`` also purges the pod's blocks), one
call at a time under one lock. ``stop`` sets a flag and cuts the watch connection, so shutdown
does not wait for the server's watch timeout.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from kvindex_service.discovery.kube import Gone, PodApi, load_api
from kvindex_service.discovery.reconcile import Action, Ports, Reconciler, Subscribe, Target, Unsubscribe

if TYPE_CHECKING:
    from kvindex_service.config import DiscoverySettings
    from kvindex_service.events import Subscriber

__all__ = ["Discovery"]

log = logging.getLogger(__name__)

_BACKOFF_MIN = 0.2
_BACKOFF_MAX = 30.0
_TICK_MAX = 0.5


class Discovery:
    """Keep the subscriber's connect-mode subscriptions equal to the Ready pods a label
    selector finds. ``start`` raises ``ValueError`` when there is no usable Kubernetes
    configuration; the API server being unreachable is not an error at start (retried)."""

    def __init__(
        self,
        settings: DiscoverySettings,
        subscriber: Subscriber,
        *,
        api: PodApi | None = None,
        namespace: str | None = None,
    ) -> None:
        if not settings.label_selector:
            raise ValueError("discovery.label_selector is required when discovery is enabled")
        self.settings = settings
        self.selector = settings.label_selector
        self._sub = subscriber
        self._api = api
        self.namespace = namespace or settings.namespace
        self.reconciler = Reconciler(
            Ports(
                zmq_port=settings.zmq_port,
                replay_port=settings.replay_port,
                pod_port=settings.pod_port,
                dp_size=settings.dp_size,
            ),
            unready_grace=settings.unready_grace,
        )
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.resyncs = 0
        """Lists after the first one (410 Gone, reconnects)."""
        self.watch_errors = 0
        self.lists = 0
        self.events = 0
        self.resource_version: str | None = None
        self.last_error: str | None = None
        self._synced = threading.Event()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._api is None:
            self._api, self.namespace = load_api(self.settings.kubeconfig, self.namespace)
        elif self.namespace is None:
            self.namespace = "default"
        for target, name in ((self._run, "kvindex-discovery"), (self._timer, "kvindex-discovery-timer")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("pod discovery started: namespace=%s selector=%r", self.namespace, self.selector)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop both threads (the watch connection is cut). Subscriptions stay: the subscriber
        is stopped right after by the runtime."""
        self._stop.set()
        if self._api is not None:
            self._api.interrupt()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("discovery thread %s did not stop within %.1fs", thread.name, timeout)

    @property
    def synced(self) -> bool:
        """The first list has been applied (every Ready pod found then is subscribed)."""
        return self._synced.is_set()

    def wait_synced(self, timeout: float) -> bool:
        return self._synced.wait(timeout)

    # -- the watch thread --------------------------------------------------------------------

    def _run(self) -> None:
        backoff = _BACKOFF_MIN
        while not self._stop.is_set():
            try:
                rv = self._list()
                backoff = _BACKOFF_MIN
                while not self._stop.is_set():
                    rv = self._watch(rv)
            except Gone as exc:
                log.info("discovery: %s; listing again", exc)
            except Exception as exc:
                if self._stop.is_set():
                    break
                self.watch_errors += 1
                self.last_error = " ".join(str(exc).split())[:300] or type(exc).__name__
                log.warning("discovery: watch failed (%s); re-listing in %.1fs", self.last_error, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)

    def _list(self) -> str:
        assert self._api is not None and self.namespace is not None
        pods, rv = self._api.list(self.namespace, self.selector)
        if self.lists:
            self.resyncs += 1
        self.lists += 1
        with self._lock:
            self._apply(self.reconciler.replace(pods, time.monotonic()))
            self.resource_version = rv
        self._synced.set()
        log.debug("discovery: listed %d pod(s) at resourceVersion %s", len(pods), rv)
        return rv

    def _watch(self, rv: str) -> str:
        """One watch request; returns the resourceVersion to continue from."""
        assert self._api is not None and self.namespace is not None
        timeout = self.settings.watch_timeout
        for event in self._api.watch(self.namespace, self.selector, rv, timeout):
            if self._stop.is_set():
                break
            kind = event.get("type")
            obj = event.get("object") or {}
            new_rv = (obj.get("metadata") or {}).get("resourceVersion")
            if kind in ("ADDED", "MODIFIED", "DELETED"):
                self.events += 1
                now = time.monotonic()
                with self._lock:
                    if kind == "DELETED":
                        self._apply(self.reconciler.delete(obj, now))
                    else:
                        self._apply(self.reconciler.upsert(obj, now))
            if new_rv:
                rv = str(new_rv)
                self.resource_version = rv
        return rv

    # -- the timer thread --------------------------------------------------------------------

    def _timer(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            with self._lock:
                self._apply(self.reconciler.tick(now))
                deadline = self.reconciler.next_deadline()
            wait = _TICK_MAX if deadline is None else min(_TICK_MAX, max(0.01, deadline - now))
            self._stop.wait(wait)

    # -- actions (caller holds _lock) --------------------------------------------------------

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            if self._stop.is_set():
                return
            if isinstance(action, Unsubscribe):
                self._unsubscribe(action.target, action.reason)
            elif isinstance(action, Subscribe):
                self._subscribe(action.target)

    def _subscribe(self, target: Target) -> None:
        added: list[str] = []
        try:
            for ep in target.endpoints:
                self._sub.add_pod(ep.endpoint, pod_id=ep.pod_id, replay_endpoint=ep.replay_endpoint)
                added.append(ep.endpoint)
        except Exception as exc:
            error = " ".join(str(exc).split()) or type(exc).__name__
            log.warning("discovery: cannot subscribe to pod %s (%s): %s", target.name, target.ip, error)
            for endpoint in added:
                self._remove(endpoint)
            self.reconciler.failed(target, error, time.monotonic())
            return
        log.info("discovery: subscribed to pod %s at %s (%s)", target.name, target.ip, ", ".join(target.pod_ids))

    def _unsubscribe(self, target: Target, reason: str) -> None:
        for ep in target.endpoints:
            self._remove(ep.endpoint)
        log.info("discovery: dropped pod %s at %s (%s)", target.name, target.ip, reason)

    def _remove(self, endpoint: str) -> None:
        try:
            self._sub.remove_pod(endpoint)
        except Exception as exc:
            log.warning("discovery: cannot remove %s: %s", endpoint, exc)

    # -- state -------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        with self._lock:
            return self.reconciler.counts()

    def status(self) -> dict[str, Any]:
        """Everything ``GET /discovery`` shows."""
        with self._lock:
            pods = self.reconciler.snapshot(time.monotonic())
            counts = self.reconciler.counts()
        return {
            "enabled": True,
            "namespace": self.namespace,
            "label_selector": self.selector,
            "synced": self.synced,
            "resource_version": self.resource_version,
            "lists": self.lists,
            "resyncs": self.resyncs,
            "watch_errors": self.watch_errors,
            "last_error": self.last_error,
            "watch_events": self.events,
            "counts": counts,
            "pods": pods,
        }
