"""The ZMQ front of the write path: vLLM KV-event batches in, ``Indexer.submit`` out.

One background thread owns every socket (ZMQ sockets are not thread-safe) and runs one poll
loop over:

- the SUB socket bound for pods that connect to us (bind mode),
- one SUB socket per pod endpoint we connect to (connect mode),
- the DEALER of every replay in flight,
- a socketpair that other threads use to wake the loop for ``add_pod``/``remove_pod``/``stop``.

The loop only does I/O: it reads frames, hands each pod's batches to the ``Sequencer`` (which
decides apply / hold / reset / replay, see ``sequencer.py``) and carries out its decisions:
submitting to the core, sending replay requests, logging. Per-pod order is the invariant: a
pod's batches reach ``Indexer.submit`` in sequence order, the core keeps that order per pod on
its shards, and while a gap is being replayed the pod's live batches wait behind the replay
while every other pod flows on.

Memory is bounded on every path: ZMQ's receive high-water mark caps what waits in sockets (the
publisher drops beyond it), ``submit`` blocks when the pod's shard queue is full so the loop
stops reading, a message larger than ``max_message_bytes`` drops the connection, the topic cache
is capped, and a pod's held-back live batches are capped at ``rcvhwm`` (past that its replay is
abandoned and counted as unrecoverable).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from kvindex_service.events.admission import Admission, IngestBudget, PodLimitError
from kvindex_service.events.eventlog import ParentLog, Warner
from kvindex_service.events.links import Links, Reconnect
from kvindex_service.events.loop import Loop
from kvindex_service.events.progress import Progress
from kvindex_service.events.replay import ReplaySettings
from kvindex_service.events.sequencer import SEQ_COUNTERS, Sequencer
from kvindex_service.events.state import pod_records, spec_record, track_record
from kvindex_service.events.topic import PodEndpoint, TopicCache, check_pod_endpoint, validate_endpoint

if TYPE_CHECKING:
    from kvindex_service._native import Indexer

__all__ = ["Subscriber"]

log = logging.getLogger(__name__)

_TOPIC_CACHE_MAX = 4096
_COMMAND_TIMEOUT = 10.0
_STAT_KEYS = (
    "messages_received",
    "messages_applied",
    "malformed_frames",
    "malformed_seq",
    "malformed_topic",
    "malformed_replay",
    "gaps",
    "replays",
    "replayed_batches",
    "unrecoverable_gaps",
    "replay_timeouts",
    "resets",
    "pushbacks",
    "throttled",
    "submit_errors",
    "internal_errors",
    "pods_added",
    "pods_removed",
    "reconnects",
    "pods_expired",
)

_State = Literal["new", "running", "stopped"]


class Subscriber(Loop):
    """Subscribe to vLLM KV events and feed them, in per-pod order, into an ``Indexer``.

    Thread-safe: ``add_pod``, ``remove_pod``, ``pod_states``, ``stats`` and ``sync`` may be
    called from any thread while the subscriber runs.
    """

    def __init__(
        self,
        indexer: Indexer,
        *,
        bind: str | None = None,
        pods: Sequence[PodEndpoint] = (),
        topic_prefix: str = "kv@",
        rcvhwm: int = 100_000,
        replay_timeout: float = 1.0,
        replay_retries: int = 3,
        replay_backoff: float = 0.1,
        max_message_bytes: int = 64 * 1024 * 1024,
        max_pods: int = 1024,
        pod_idle_timeout: float | None = None,
        verify_peer: bool = True,
        allowed_publishers: Sequence[str] = (),
        reconnect_ivl: float = 0.1,
        reconnect_ivl_max: float = 5.0,
        pod_batch_rate: float = 0.0,
    ) -> None:
        """``max_pods``, ``pod_idle_timeout``, ``verify_peer`` and ``allowed_publishers`` are
        the edge checks of ``admission.py``; the reconnect intervals (seconds) are the
        backoff of every SUB and DEALER socket and of the explicit re-dials."""
        if bind is not None:
            validate_endpoint(bind, bind=True)
        if not isinstance(topic_prefix, str):
            raise ValueError("topic_prefix must be a string")
        self._indexer = indexer
        self._bind = bind
        self._prefix = topic_prefix
        self._prefix_bytes = topic_prefix.encode("utf-8")
        self._replay = ReplaySettings(  # validates the numbers
            timeout=replay_timeout,
            retries=replay_retries,
            backoff=replay_backoff,
            rcvhwm=rcvhwm,
            max_message_bytes=max_message_bytes,
        )
        self._seq = Sequencer(self._replay, max_held=rcvhwm)
        self._admit = Admission(max_pods=max_pods, verify_peer=verify_peer, allowed_publishers=allowed_publishers)
        self._budget = IngestBudget(pod_batch_rate, max_pods)  # batches/s per pod (admission.py)
        if pod_idle_timeout is not None and not (0 < pod_idle_timeout < math.inf):
            raise ValueError("pod_idle_timeout must be a positive number of seconds or None")
        self._idle = pod_idle_timeout
        self._next_sweep = 0.0
        self._slots: int | None = None
        """Cached ``_pod_count`` for the hot path (None: recount)."""
        if len(pods) > max_pods:
            raise ValueError(f"{len(pods)} pod endpoints configured, more than max_pods={max_pods}")

        self._lock = threading.Lock()
        """Guards the registries below (and ``_seq.tracks``) against concurrent readers;
        hot-path reads on the loop thread skip it."""
        self._specs: dict[str, PodEndpoint] = {}
        for spec in pods:
            self._register_spec(check_pod_endpoint(spec))
        self._links = Links(
            lock=self._lock,
            rcvhwm=rcvhwm,
            replay=self._replay,
            prefix=self._prefix_bytes,
            timeout=_COMMAND_TIMEOUT,
            reconnect=Reconnect(reconnect_ivl, reconnect_ivl_max),
            max_pods=max_pods,
        )
        self._conns = self._links.conns
        """Connect-mode links by endpoint (changed under ``_lock``)."""

        self._state: _State = "new"
        self._stopping = False
        self._thread: threading.Thread | None = None

        self._stats = dict.fromkeys((k for k in _STAT_KEYS if k not in SEQ_COUNTERS), 0)
        self._topics = TopicCache(topic_prefix, _TOPIC_CACHE_MAX)
        self._progress = Progress()
        self._warn = Warner(log)
        self._parents = ParentLog(log)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Bind and connect every socket, then start the loop thread.

        Sockets are created here, in the caller's thread, so that a bind failure raises to the
        caller; thread start is a full memory barrier, which is all ZMQ asks for before the
        loop thread takes them over.
        """
        with self._lock:
            if self._state != "new":
                raise RuntimeError(f"subscriber already {self._state}; create a new one")
            self._state = "running"
        try:
            self._links.open(self._bind)
            for spec in list(self._specs.values()):
                self._connect(spec)
        except BaseException:
            self._teardown()
            with self._lock:
                self._state = "stopped"
            raise
        self._thread = threading.Thread(target=self._run, name="kvindex-events", daemon=True)
        self._thread.start()
        log.info(
            "event subscriber started: bind=%s, %d pod endpoint(s), prefix=%r",
            self._links.bound_endpoint,
            len(self._specs),
            self._prefix,
        )

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop, close every socket and the context. Idempotent. Batches already
        handed to the core stay queued there (``Indexer.flush`` waits for them)."""
        with self._lock:
            if self._state != "running":
                self._state = "stopped"
                return
            self._state = "stopped"
        self._stopping = True
        self._links.mailbox.wake()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("event subscriber thread did not stop within %.1fs", timeout)
                return
        self._teardown()
        self._links.mailbox.fail_pending(RuntimeError("subscriber stopped"))
        log.info("event subscriber stopped")

    @property
    def bound_endpoint(self) -> str | None:
        return self._links.bound_endpoint

    @property
    def running(self) -> bool:
        thread = self._thread
        return self._state == "running" and thread is not None and thread.is_alive()

    # -- pods --------------------------------------------------------------------------------

    def add_pod(self, endpoint: str, *, pod_id: str | None = None, replay_endpoint: str | None = None) -> PodEndpoint:
        """Connect to one more vLLM publisher. ``ValueError`` for a malformed endpoint or one
        (or a pod id) already configured, ``PodLimitError`` past ``max_pods``,
        ``SubscribeError`` when libzmq runs out of sockets."""
        spec = check_pod_endpoint(PodEndpoint(endpoint=endpoint, pod_id=pod_id, replay_endpoint=replay_endpoint))
        with self._lock:
            if self._state == "stopped":
                raise RuntimeError("subscriber stopped")
            if self._pod_count() >= self._admit.max_pods:
                raise PodLimitError(f"already {self._admit.max_pods} pods (zmq.max_pods)")
            self._register_spec(spec)
            running = self._state == "running"
        if running:
            try:
                self._call(lambda: self._connect(spec))
            except BaseException:
                with self._lock:
                    self._specs.pop(spec.endpoint, None)
                    self._slots = None
                raise
        self._stats["pods_added"] += 1
        return spec

    def remove_pod(self, pod: str) -> bool:
        """Forget a pod, by pod id or endpoint: disconnect its endpoint (connect mode), drop its
        sequence state and remove it from the index. False if nothing matches.

        In bind mode the pod's publisher stays connected to us; if it keeps publishing it comes
        back as a new pod (a mid-stream join)."""
        with self._lock:
            known = (
                pod in self._seq.tracks
                or pod in self._specs
                or any(s.pod_id == pod for s in self._specs.values())
                or any(pod in c.pods for c in self._conns.values())
            )
            running = self._state == "running"
        if not known:
            return False
        if running:
            self._call(lambda: self._remove(pod))
        else:
            self._remove(pod)
        self._stats["pods_removed"] += 1
        return True

    def resume(self, last_seqs: dict[str, int]) -> None:
        """Before ``start``: each pod's stream continues after its seq restored from a snapshot."""
        with self._lock:
            if self._state != "new":
                raise RuntimeError("resume() must be called before start()")
            self._seq.resume.update(last_seqs)

    def endpoints(self) -> list[PodEndpoint]:
        with self._lock:
            return list(self._specs.values())

    def pod_states(self) -> list[dict[str, Any]]:
        """One merged record per known pod (see ``merge_pod_state``), sorted by pod id; then
        configured endpoints that have not published yet (``pod`` is their explicit pod id,
        or None until their first message names it)."""
        natives = {s.pod: s for s in self._indexer.pod_states()}
        with self._lock:
            linked = {endpoint: set(conn.pods) for endpoint, conn in self._conns.items()}
            return pod_records(
                list(self._seq.tracks.values()),
                list(self._specs.values()),
                linked,
                natives,
                running=self._state == "running",
            )

    def pod_state(self, pod: str) -> dict[str, Any] | None:
        """The merged record of one pod, looked up by pod id or by endpoint."""
        with self._lock:
            track = self._seq.tracks.get(pod)
            if track is None:
                spec = self._specs.get(pod)
                if spec is not None:
                    conn = self._conns.get(spec.endpoint)
                    pod_id = spec.pod_id or (min(conn.pods) if conn and conn.pods else None)
                    track = self._seq.tracks.get(pod_id) if pod_id else None
                    if track is None:
                        return spec_record(spec, pod_id, None, subscribed=self._state == "running")
        if track is None:
            return None
        return track_record(
            track, self._indexer.pod_state(track.pod), running=self._state == "running", linked=self._conns
        )

    def stats(self) -> dict[str, int]:
        """Monotonic subscriber counters (plus ``replays_in_progress``, a gauge)."""
        merged = {**self._stats, **self._seq.totals}
        out = {key: merged[key] for key in _STAT_KEYS}
        out["replays_in_progress"] = self._seq.replays_in_progress
        out["pods"] = len(self._seq.tracks)
        out.update({f"rejected_{k}": v for k, v in self._admit.rejected.items()})
        return out

    def rejections(self) -> dict[str, int]:
        """Messages refused at the edge, by reason (see ``admission.REJECT_REASONS``)."""
        return dict(self._admit.rejected)

    def sync(self, timeout: float = 5.0) -> bool:
        """Wait until every message received so far has been handed to the core (or dropped
        as malformed) and the core has applied it. False on timeout. Messages still in ZMQ
        queues are not "received" yet."""
        deadline = time.monotonic() + timeout
        if not self._progress.wait_for(self._progress.received, deadline, lambda: self.running):
            return False
        return self._indexer.flush(max(0.0, deadline - time.monotonic()))

    # -- caller-thread helpers ---------------------------------------------------------------

    def _register_spec(self, spec: PodEndpoint) -> None:
        """Record a new endpoint; the caller holds ``_lock`` (or is the constructor)."""
        if spec.endpoint in self._specs:
            raise ValueError(f"endpoint {spec.endpoint} is already subscribed")
        if spec.pod_id is not None and any(s.pod_id == spec.pod_id for s in self._specs.values()):
            raise ValueError(f"pod id {spec.pod_id!r} is already subscribed")
        self._specs[spec.endpoint] = spec
        self._slots = None

    def _call(self, fn: Any) -> Any:
        """Run ``fn`` on the loop thread (which owns the sockets) and return its result."""
        return self._links.mailbox.call(fn, self._thread)
