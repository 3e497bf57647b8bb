"""Pod discovery's decisions, without sockets or an API server: pod objects in, actions out.

The watch loop (``watch.py``) feeds every pod it lists or watches to a :class:`Reconciler`
as the API server's JSON (``metadata``/``status`` dicts, camelCase keys) and carries out the
:class:`Subscribe` / :class:`Unsubscribe` actions it returns, in order. Rules:

* a pod is wanted when it is Ready (condition ``Ready`` is ``"True"``), has a ``podIP`` and is
  not being deleted; a wanted pod that is not subscribed is subscribed, one
  :class:`~kvindex_service.events.PodEndpoint` per data-parallel rank;
* a subscribed pod that is deleted, or loses its IP, is unsubscribed at once (the subscriber
  purges its blocks);
* a subscribed pod that turns unready keeps its subscription for ``unready_grace`` seconds
  (:meth:`Reconciler.tick` drops it after that) and keeps it for good if it is Ready again in
  time;
* a pod whose IP (or uid: deleted and re-created under the same name) changes is a new pod:
  the old subscription goes, then the new one comes;
* a full list (:meth:`Reconciler.replace`, after a resync) forgets the pods it no longer holds;
* new ports (:meth:`Reconciler.set_ports`: an InferencePool's ``targetPorts`` changed) re-make
  every target whose endpoints they change.

What a pod's IP becomes is the ``ports`` object's business (an :class:`EndpointMap`):
:class:`Ports` makes vLLM publisher endpoints (the scoring service), :class:`TargetPorts` makes
serving endpoints ``podIP:port`` (the picker, from a GAIE InferencePool).

Every method takes ``now`` (monotonic seconds) from the caller, so tests drive the clock.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from kvindex_service.events import PodEndpoint

__all__ = [
    "POD_STATES",
    "Action",
    "EndpointMap",
    "Ports",
    "Reconciler",
    "Subscribe",
    "Target",
    "TargetPorts",
    "Unsubscribe",
    "pod_ip",
    "pod_ready",
]

PodStateName = Literal["subscribed", "unready", "pending", "failed"]
POD_STATES: tuple[PodStateName, ...] = ("subscribed", "unready", "pending", "failed")
"""``subscribed``: Ready and subscribed; ``unready``: subscribed, not Ready, within the grace;
``pending``: seen but not Ready or without an IP; ``failed``: wanted, but subscribing failed
(retried)."""

_RETRY_SECONDS = 5.0


class EndpointMap(Protocol):
    """What a Ready pod's IP becomes."""

    def endpoints(self, ip: str) -> tuple[PodEndpoint, ...]: ...


@dataclass(frozen=True)
class TargetPorts:
    """Serving endpoints ``podIP:port``, one per port (a GAIE InferencePool's ``targetPorts``);
    ``endpoint`` and ``pod_id`` are both that string."""

    ports: tuple[int, ...]

    def endpoints(self, ip: str) -> tuple[PodEndpoint, ...]:
        host = f"[{ip}]" if ":" in ip else ip
        return tuple(PodEndpoint(endpoint=f"{host}:{p}", pod_id=f"{host}:{p}") for p in self.ports)


@dataclass(frozen=True)
class Ports:
    """How a pod's address maps to publisher endpoints and pod ids."""

    zmq_port: int = 5557
    replay_port: int | None = None
    pod_port: int = 8000
    dp_size: int = 1

    def endpoints(self, ip: str) -> tuple[PodEndpoint, ...]:
        """One endpoint per data-parallel rank N: ``tcp://ip:zmq_port+N`` (replay on
        ``replay_port+N``), pod id ``ip:pod_port+N`` (``ip:pod_port`` for rank 0)."""
        host = f"[{ip}]" if ":" in ip else ip
        return tuple(
            PodEndpoint(
                endpoint=f"tcp://{host}:{self.zmq_port + rank}",
                pod_id=f"{host}:{self.pod_port + rank}",
                replay_endpoint=None if self.replay_port is None else f"tcp://{host}:{self.replay_port + rank}",
            )
            for rank in range(self.dp_size)
        )


@dataclass(frozen=True)
class Target:
    """One subscribed incarnation of a pod: a name, a uid and an IP."""

    name: str
    uid: str
    ip: str
    endpoints: tuple[PodEndpoint, ...]

    @property
    def pod_ids(self) -> list[str]:
        return [e.pod_id for e in self.endpoints if e.pod_id is not None]


@dataclass(frozen=True)
class Subscribe:
    target: Target


@dataclass(frozen=True)
class Unsubscribe:
    target: Target
    reason: str


Action = Subscribe | Unsubscribe


@dataclass
class _Pod:
    name: str
    uid: str = ""
    ip: str | None = None
    ready: bool = False
    deleting: bool = False
    target: Target | None = None
    """The live subscription (None: not subscribed)."""
    unready_since: float | None = None
    failed_at: float | None = None
    error: str | None = None
    phase: str | None = None


def pod_ready(pod: Mapping[str, Any]) -> bool:
    """The pod's ``Ready`` condition is ``"True"``."""
    status = pod.get("status") or {}
    for cond in status.get("conditions") or ():
        if isinstance(cond, Mapping) and cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


def pod_ip(pod: Mapping[str, Any]) -> str | None:
    ip = (pod.get("status") or {}).get("podIP")
    return ip if isinstance(ip, str) and ip else None


def _meta(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = pod.get("metadata")
    if not isinstance(meta, Mapping) or not isinstance(meta.get("name"), str):
        raise ValueError("pod object without metadata.name")
    return meta


class Reconciler:
    """Desired subscriptions (from pod objects) against current ones. Not thread-safe: the
    caller serialises calls and applies each call's actions before the next call."""

    def __init__(self, ports: EndpointMap, *, unready_grace: float = 30.0, retry: float = _RETRY_SECONDS) -> None:
        if not (0 <= unready_grace < math.inf):
            raise ValueError("unready_grace must be a non-negative number of seconds")
        self.ports = ports
        self.grace = unready_grace
        self.retry = retry
        self._pods: dict[str, _Pod] = {}

    # -- inputs ------------------------------------------------------------------------------

    def upsert(self, pod: Mapping[str, Any], now: float) -> list[Action]:
        """An ADDED or MODIFIED pod (or one pod of a list)."""
        meta = _meta(pod)
        name = meta["name"]
        st = self._pods.get(name)
        if st is None:
            st = self._pods[name] = _Pod(name)
        st.uid = str(meta.get("uid") or "")
        st.ip = pod_ip(pod)
        st.ready = pod_ready(pod)
        st.deleting = meta.get("deletionTimestamp") is not None
        st.phase = (pod.get("status") or {}).get("phase")
        return self._settle(st, now)

    def delete(self, pod: Mapping[str, Any], now: float) -> list[Action]:
        """A DELETED pod."""
        st = self._pods.pop(_meta(pod)["name"], None)
        if st is None or st.target is None:
            return []
        return [Unsubscribe(st.target, "deleted")]

    def replace(self, pods: Iterable[Mapping[str, Any]], now: float) -> list[Action]:
        """A full list: pods missing from it are gone. Removals come before additions, so an
        IP handed from a deleted pod to a new one is released first."""
        pods = list(pods)
        listed = {_meta(p)["name"] for p in pods}
        actions: list[Action] = []
        for name in [n for n in self._pods if n not in listed]:
            st = self._pods.pop(name)
            if st.target is not None:
                actions.append(Unsubscribe(st.target, "deleted"))
        for pod in pods:
            actions.extend(self.upsert(pod, now))
        actions.sort(key=lambda a: isinstance(a, Subscribe))
        return actions

    def set_ports(self, ports: EndpointMap, now: float) -> list[Action]:
        """Map IPs with ``ports`` from now on: targets whose endpoints change are dropped, then
        made again (removals first, as in :meth:`replace`)."""
        self.ports = ports
        actions: list[Action] = []
        for st in self._pods.values():
            if st.target is not None and st.target.endpoints != ports.endpoints(st.target.ip):
                actions.append(Unsubscribe(st.target, "ports changed"))
                st.target = None
        for st in self._pods.values():
            actions.extend(self._settle(st, now))
        actions.sort(key=lambda a: isinstance(a, Subscribe))
        return actions

    def tick(self, now: float) -> list[Action]:
        """Drop pods unready past the grace; retry failed subscriptions."""
        actions: list[Action] = []
        for st in list(self._pods.values()):
            actions.extend(self._settle(st, now))
        return actions

    def failed(self, target: Target, error: str, now: float) -> None:
        """The caller could not subscribe ``target``: retried after ``retry`` seconds."""
        st = self._pods.get(target.name)
        if st is not None and st.target == target:
            st.target = None
            st.failed_at = now
            st.error = error

    # -- the rule ----------------------------------------------------------------------------

    def _settle(self, st: _Pod, now: float) -> list[Action]:
        actions: list[Action] = []
        cur = st.target
        if cur is not None and (st.ip != cur.ip or st.uid != cur.uid):
            reason = "lost its IP" if st.ip is None else ("IP changed" if st.ip != cur.ip else "re-created")
            actions.append(Unsubscribe(cur, reason))
            st.target = cur = None
            st.unready_since = None
        wanted = st.ready and st.ip is not None and not st.deleting
        if cur is not None:
            if wanted:
                st.unready_since = None
            else:
                if st.unready_since is None:
                    st.unready_since = now
                if now - st.unready_since >= self.grace:
                    actions.append(Unsubscribe(cur, "being deleted" if st.deleting else "unready past the grace"))
                    st.target = None
                    st.unready_since = None
            return actions
        st.unready_since = None
        if not wanted or st.ip is None:
            st.failed_at = None
            st.error = None
            return actions
        if st.failed_at is not None and now - st.failed_at < self.retry:
            return actions
        st.failed_at = None
        st.error = None
        st.target = Target(st.name, st.uid, st.ip, self.ports.endpoints(st.ip))
        actions.append(Subscribe(st.target))
        return actions

    # -- state -------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When :meth:`tick` next has something to do (None: nothing pending)."""
        times = [st.unready_since + self.grace for st in self._pods.values() if st.unready_since is not None]
        times += [st.failed_at + self.retry for st in self._pods.values() if st.failed_at is not None]
        return min(times) if times else None

    def state_of(self, name: str) -> PodStateName | None:
        st = self._pods.get(name)
        return None if st is None else self._state(st)

    @staticmethod
    def _state(st: _Pod) -> PodStateName:
        if st.target is not None:
            return "unready" if st.unready_since is not None else "subscribed"
        return "failed" if st.failed_at is not None else "pending"

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = dict.fromkeys(POD_STATES, 0)
        for st in self._pods.values():
            out[self._state(st)] += 1
        return out

    def targets(self) -> list[Target]:
        return [st.target for st in self._pods.values() if st.target is not None]

    def snapshot(self, now: float) -> list[dict[str, Any]]:
        """One record per known pod, sorted by name (for ``GET /discovery``)."""
        out = []
        for name in sorted(self._pods):
            st = self._pods[name]
            rec: dict[str, Any] = {
                "name": name,
                "uid": st.uid,
                "ip": st.ip,
                "phase": st.phase,
                "ready": st.ready,
                "deleting": st.deleting,
                "state": self._state(st),
                "pod_ids": st.target.pod_ids if st.target is not None else [],
            }
            if st.unready_since is not None:
                rec["unready_for_seconds"] = round(now - st.unready_since, 3)
            if st.error is not None:
                rec["error"] = st.error
            out.append(rec)
        return out
