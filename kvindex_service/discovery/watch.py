"""Pod discovery's I/O: list + watch the API server, carry out the reconciler's actions.

:class:`ListWatch` is the loop every watcher here shares (the scoring service's pod
discovery, and the picker's InferencePool and pod watches in ``endpoints.py``): on its own
daemon thread, because the ``kubernetes`` client blocks, it lists (resourceVersion R), then
watches from R; a watch the server ends (``timeout_seconds``) is re-opened from the last
resourceVersion seen; 410 Gone re-lists at once (a *resync*); any other failure counts a watch
error, waits (doubling backoff, capped) and re-lists, so nothing that changed while
disconnected is missed. ``stop`` sets a flag and cuts the watch connection, so shutdown does
not wait for the server's watch timeout.

:class:`Discovery` runs one ListWatch over pods plus a timer thread
(``kvindex-discovery-timer``: :meth:`Reconciler.tick` for the unready grace and retries), and
hands the reconciler's actions to the :class:`~kvindex_service.events.Subscriber` through its
thread-safe ``add_pod`` / ``remove_pod`` (``remove_pod`` also purges the pod's blocks), one
call at a time under one lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

from kvindex_service.discovery.kube import Gone, load_api
from kvindex_service.discovery.reconcile import Action, Ports, Reconciler, Subscribe, Target, Unsubscribe

if TYPE_CHECKING:
    from kvindex_service.config import DiscoverySettings
    from kvindex_service.events import Subscriber

__all__ = ["Discovery", "ListWatch", "WatchApi", "WatchHandler"]

log = logging.getLogger(__name__)

_BACKOFF_MIN = 0.2
_BACKOFF_MAX = 30.0
_TICK_MAX = 0.5


class WatchApi(Protocol):
    """What :class:`ListWatch` needs from the API (:class:`~.kube.ObjectApi` and test fakes)."""

    def list(self, namespace: str, selector: str) -> tuple[list[dict[str, Any]], str]: ...

    def watch(self, namespace: str, selector: str, resource_version: str, timeout: int) -> Iterator[dict[str, Any]]: ...

    def interrupt(self) -> None: ...


class WatchHandler(Protocol):
    """Receives what a :class:`ListWatch` sees, one call at a time, on its thread."""

    def replace(self, objects: list[dict[str, Any]]) -> None:
        """A full list: objects missing from it are gone."""

    def upsert(self, obj: dict[str, Any]) -> None:
        """An ADDED or MODIFIED object."""

    def delete(self, obj: dict[str, Any]) -> None:
        """A DELETED object."""


class ListWatch:
    """List, then watch, one kind of object in one namespace matching ``selector``, until
    :meth:`stop`; every list and event goes to ``handler``."""

    def __init__(
        self,
        api: WatchApi,
        namespace: str,
        selector: str,
        handler: WatchHandler,
        *,
        watch_timeout: int = 300,
        name: str = "kvindex-watch",
        what: str = "objects",
    ) -> None:
        self.api = api
        self.namespace = namespace
        self.selector = selector
        self._handler = handler
        self._timeout = watch_timeout
        self._name = name
        self._what = what
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._synced = threading.Event()
        self.lists = 0
        self.resyncs = 0
        """Lists after the first one (410 Gone, reconnects)."""
        self.watch_errors = 0
        self.events = 0
        self.resource_version: str | None = None
        self.last_error: str | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.api.interrupt()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("watch thread %s did not stop within %.1fs", self._name, timeout)

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    @property
    def synced(self) -> bool:
        """The first list has been handed to the handler."""
        return self._synced.is_set()

    def wait_synced(self, timeout: float) -> bool:
        return self._synced.wait(timeout)

    def _run(self) -> None:
        backoff = _BACKOFF_MIN
        while not self._stop.is_set():
            try:
                rv = self._list()
                backoff = _BACKOFF_MIN
                while not self._stop.is_set():
                    rv = self._watch(rv)
            except Gone as exc:
                log.info("watch of %s: %s; listing again", self._what, exc)
            except Exception as exc:
                if self._stop.is_set():
                    break
                self.watch_errors += 1
                self.last_error = " ".join(str(exc).split())[:300] or type(exc).__name__
                log.warning("watch of %s failed (%s); re-listing in %.1fs", self._what, self.last_error, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)

    def _list(self) -> str:
        objects, rv = self.api.list(self.namespace, self.selector)
        if self.lists:
            self.resyncs += 1
        self.lists += 1
        if self._stop.is_set():
            return rv
        self._handler.replace(objects)
        self.resource_version = rv
        self._synced.set()
        log.debug("listed %d %s at resourceVersion %s", len(objects), self._what, rv)
        return rv

    def _watch(self, rv: str) -> str:
        """One watch request; returns the resourceVersion to continue from."""
        for event in self.api.watch(self.namespace, self.selector, rv, self._timeout):
            if self._stop.is_set():
                break
            kind = event.get("type")
            obj = event.get("object") or {}
            new_rv = (obj.get("metadata") or {}).get("resourceVersion")
            if kind in ("ADDED", "MODIFIED", "DELETED"):
                self.events += 1
                if kind == "DELETED":
                    self._handler.delete(obj)
                else:
                    self._handler.upsert(obj)
            if new_rv:
                rv = str(new_rv)
                self.resource_version = rv
        return rv


class Discovery:
    """Keep the subscriber's connect-mode subscriptions equal to the Ready pods a label
    selector finds. ``start`` raises ``ValueError`` when there is no usable Kubernetes
    configuration; the API server being unreachable is not an error at start (retried)."""

    def __init__(
        self,
        settings: DiscoverySettings,
        subscriber: Subscriber,
        *,
        api: WatchApi | None = None,
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
        self._loop: ListWatch | None = None
        self._timer_thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._api is None:
            self._api, self.namespace = load_api(self.settings.kubeconfig, self.namespace)
        elif self.namespace is None:
            self.namespace = "default"
        self._loop = ListWatch(
            self._api,
            self.namespace,
            self.selector,
            self,
            watch_timeout=self.settings.watch_timeout,
            name="kvindex-discovery",
            what="pods",
        )
        self._loop.start()
        self._timer_thread = threading.Thread(target=self._timer, name="kvindex-discovery-timer", daemon=True)
        self._timer_thread.start()
        log.info("pod discovery started: namespace=%s selector=%r", self.namespace, self.selector)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop both threads (the watch connection is cut). Subscriptions stay: the subscriber
        is stopped right after by the runtime."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        if self._loop is not None:
            self._loop.stop(timeout)
        if self._timer_thread is not None:
            self._timer_thread.join(max(0.0, deadline - time.monotonic()))

    @property
    def synced(self) -> bool:
        """The first list has been applied (every Ready pod found then is subscribed)."""
        return self._loop is not None and self._loop.synced

    def threads(self) -> list[threading.Thread]:
        """The watch and timer threads (started ones)."""
        found = [self._loop.thread if self._loop else None, self._timer_thread]
        return [t for t in found if t is not None]

    def wait_synced(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._loop is None:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return self._loop.wait_synced(max(0.0, deadline - time.monotonic()))

    # -- the loop's counters -----------------------------------------------------------------

    @property
    def lists(self) -> int:
        return self._loop.lists if self._loop else 0

    @property
    def resyncs(self) -> int:
        """Lists after the first one (410 Gone, reconnects)."""
        return self._loop.resyncs if self._loop else 0

    @property
    def watch_errors(self) -> int:
        return self._loop.watch_errors if self._loop else 0

    @property
    def events(self) -> int:
        return self._loop.events if self._loop else 0

    @property
    def resource_version(self) -> str | None:
        return self._loop.resource_version if self._loop else None

    @property
    def last_error(self) -> str | None:
        return self._loop.last_error if self._loop else None

    # -- WatchHandler (the watch thread) -----------------------------------------------------

    def replace(self, objects: list[dict[str, Any]]) -> None:
        with self._lock:
            self._apply(self.reconciler.replace(objects, time.monotonic()))

    def upsert(self, obj: dict[str, Any]) -> None:
        with self._lock:
            self._apply(self.reconciler.upsert(obj, time.monotonic()))

    def delete(self, obj: dict[str, Any]) -> None:
        with self._lock:
            self._apply(self.reconciler.delete(obj, time.monotonic()))

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
