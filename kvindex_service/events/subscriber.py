"""The ZMQ front of the write path: vLLM KV-event batches in, ``Indexer.submit`` out.

One background thread owns every socket (ZMQ sockets are not thread-safe) and runs one poll
loop over:

- the SUB socket bound for pods that connect to us (bind mode),
- one SUB socket per pod endpoint we connect to (connect mode),
- the DEALER of every replay in flight,
- a socketpair that other threads use to wake the loop for ``add_pod``/``remove_pod``/``stop``.

Per-pod order is the loop's invariant: a pod's batches reach ``Indexer.submit`` in sequence
order, the core keeps that order per pod on its shards, and while a gap is being replayed the
pod's live batches wait behind the replay while every other pod flows on.

Memory is bounded on every path: ZMQ's receive high-water mark caps what waits in sockets (the
publisher drops beyond it), ``submit`` blocks when the pod's shard queue is full so the loop
stops reading, a message larger than ``max_message_bytes`` drops the connection, the topic cache
is capped, and a pod's held-back live batches are capped at ``rcvhwm`` (past that its replay is
abandoned and counted as unrecoverable).
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import zmq
from zmq.utils.monitor import parse_monitor_message

from kvindex_service._native import KvIndexError
from kvindex_service.events.replay import (
    LiveBatch,
    ReplayJob,
    ReplaySettings,
    parse_reply,
)
from kvindex_service.events.sequence import classify
from kvindex_service.events.state import Mode, PodTrack, merge_pod_state
from kvindex_service.events.topic import PodEndpoint, parse_topic, validate_endpoint

if TYPE_CHECKING:
    from kvindex_service._native import Indexer

__all__ = ["Subscriber"]

log = logging.getLogger(__name__)

_BURST = 512
"""Messages read from one socket before the loop looks at the others (fairness)."""
_TOPIC_CACHE_MAX = 4096
_COMMAND_TIMEOUT = 10.0
_LOG_EVERY = 10.0
"""Seconds between WARNING lines for the same (what, pod); repeats in between go to DEBUG."""
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
    "submit_errors",
    "internal_errors",
    "pods_added",
    "pods_removed",
    "reconnects",
)
_INVALID_TOPIC = ("", "")
"""Cached marker for a topic that failed to parse (a real topic never has an empty pod)."""

_State = Literal["new", "running", "stopped"]


@dataclass(eq=False, slots=True)
class _Conn:
    """A connect-mode SUB socket and the pod ids seen through it."""

    spec: PodEndpoint
    socket: zmq.Socket[bytes] | None = None
    monitor: zmq.Socket[bytes] | None = None
    """PAIR receiving the SUB's disconnect events (see ``Subscriber._on_disconnect``)."""
    pods: set[str] = field(default_factory=set)


@dataclass(eq=False, slots=True)
class _Monitor:
    conn: _Conn


class Subscriber:
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
    ) -> None:
        if bind is not None:
            validate_endpoint(bind, bind=True)
        if not isinstance(topic_prefix, str):
            raise ValueError("topic_prefix must be a string")
        if rcvhwm < 1:
            raise ValueError("rcvhwm must be >= 1 (0 would mean unbounded)")
        if not replay_timeout > 0 or not math.isfinite(replay_timeout):
            raise ValueError("replay_timeout must be a positive number of seconds")
        if replay_retries < 0:
            raise ValueError("replay_retries must be >= 0")
        if not replay_backoff >= 0 or not math.isfinite(replay_backoff):
            raise ValueError("replay_backoff must be >= 0 seconds")
        if max_message_bytes < 1:
            raise ValueError("max_message_bytes must be >= 1")
        self._indexer = indexer
        self._bind = bind
        self._prefix = topic_prefix
        self._prefix_bytes = topic_prefix.encode("utf-8")
        self._rcvhwm = rcvhwm
        self._max_message_bytes = max_message_bytes
        self._replay = ReplaySettings(
            timeout=replay_timeout,
            retries=replay_retries,
            backoff=replay_backoff,
            rcvhwm=rcvhwm,
            max_message_bytes=max_message_bytes,
        )

        self._lock = threading.Lock()
        """Guards the registries below against concurrent readers; hot-path reads skip it."""
        self._specs: dict[str, PodEndpoint] = {}
        self._conns: dict[str, _Conn] = {}
        self._pods: dict[str, PodTrack] = {}
        self._jobs: dict[str, ReplayJob] = {}
        for spec in pods:
            self._register_spec(self._check_spec(spec))

        self._state: _State = "new"
        self._stopping = False
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._bind_socket: zmq.Socket[bytes] | None = None
        self._bound_endpoint: str | None = None
        self._poller = zmq.Poller()
        self._owners: dict[Any, _Conn | _Monitor | ReplayJob | None] = {}
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._wake_fd = -1
        """zmq.Poller reports plain sockets by file descriptor."""
        self._thread: threading.Thread | None = None
        self._commands: list[tuple[Callable[[], Any], Future[Any]]] = []
        self._commands_lock = threading.Lock()

        self._stats = dict.fromkeys(_STAT_KEYS, 0)
        self._topic_cache: dict[bytes, tuple[str, str]] = {}
        self._received = 0
        self._settled = 0
        """Every message with receive index <= this has been handed to the core or dropped."""
        self._settled_cond = threading.Condition()
        self._sync_waiters = 0
        self._last_log: dict[tuple[str, str], float] = {}

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
            self._ctx = zmq.Context()
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._wake_fd = self._wake_r.fileno()
            self._wake_w.setblocking(False)
            self._poller.register(self._wake_r, zmq.POLLIN)
            if self._bind is not None:
                sock = self._sub_socket()
                try:
                    sock.bind(self._bind)
                except zmq.ZMQError as exc:
                    sock.close(linger=0)
                    raise OSError(exc.errno, f"cannot bind {self._bind}: {exc}") from exc
                self._bind_socket = sock
                self._bound_endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
                self._poller.register(sock, zmq.POLLIN)
                self._owners[sock] = None
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
            self._bound_endpoint,
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
        self._wake()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("event subscriber thread did not stop within %.1fs", timeout)
                return
        self._teardown()
        self._fail_commands(RuntimeError("subscriber stopped"))
        log.info("event subscriber stopped")

    @property
    def bound_endpoint(self) -> str | None:
        return self._bound_endpoint

    @property
    def running(self) -> bool:
        thread = self._thread
        return self._state == "running" and thread is not None and thread.is_alive()

    # -- pods --------------------------------------------------------------------------------

    def add_pod(self, endpoint: str, *, pod_id: str | None = None, replay_endpoint: str | None = None) -> PodEndpoint:
        """Connect to one more vLLM publisher. ``ValueError`` for a malformed endpoint or one
        (or a pod id) already configured."""
        spec = self._check_spec(PodEndpoint(endpoint=endpoint, pod_id=pod_id, replay_endpoint=replay_endpoint))
        with self._lock:
            if self._state == "stopped":
                raise RuntimeError("subscriber stopped")
            self._register_spec(spec)
            running = self._state == "running"
        if running:
            try:
                self._call(lambda: self._connect(spec))
            except BaseException:
                with self._lock:
                    self._specs.pop(spec.endpoint, None)
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
                pod in self._pods
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

    def endpoints(self) -> list[PodEndpoint]:
        with self._lock:
            return list(self._specs.values())

    def pod_states(self) -> list[dict[str, Any]]:
        """One merged record per known pod (see ``merge_pod_state``), sorted by pod id; then
        configured endpoints that have not published yet (``pod`` is their explicit pod id,
        or None until their first message names it)."""
        natives = {s.pod: s for s in self._indexer.pod_states()}
        with self._lock:
            tracks = sorted(self._pods.values(), key=lambda t: t.pod)
            waiting: list[tuple[str | None, PodEndpoint]] = []
            for spec in self._specs.values():
                conn = self._conns.get(spec.endpoint)
                if spec.pod_id is not None:
                    if spec.pod_id not in self._pods:
                        waiting.append((spec.pod_id, spec))
                elif conn is None or not conn.pods:
                    waiting.append((None, spec))
            running = self._state == "running"
        out = [self._merge(t, natives.get(t.pod)) for t in tracks]
        out.extend(
            merge_pod_state(
                None,
                natives.get(pod) if pod else None,
                pod=pod,
                mode="connect",
                endpoint=spec.endpoint,
                replay_endpoint=spec.replay_endpoint,
                subscribed=running and spec.endpoint in self._conns,
            )
            for pod, spec in waiting
        )
        return out

    def pod_state(self, pod: str) -> dict[str, Any] | None:
        """The merged record of one pod, looked up by pod id or by endpoint."""
        with self._lock:
            track = self._pods.get(pod)
            if track is None:
                spec = self._specs.get(pod)
                if spec is not None:
                    conn = self._conns.get(spec.endpoint)
                    pod_id = spec.pod_id or (min(conn.pods) if conn and conn.pods else None)
                    track = self._pods.get(pod_id) if pod_id else None
                    if track is None:
                        return merge_pod_state(
                            None,
                            None,
                            pod=pod_id,
                            mode="connect",
                            endpoint=spec.endpoint,
                            replay_endpoint=spec.replay_endpoint,
                            subscribed=self._state == "running",
                        )
        if track is None:
            return None
        return self._merge(track, self._indexer.pod_state(track.pod))

    def stats(self) -> dict[str, int]:
        """Monotonic subscriber counters (plus ``replays_in_progress``, a gauge)."""
        out = dict(self._stats)
        out["replays_in_progress"] = len(self._jobs)
        return out

    def sync(self, timeout: float = 5.0) -> bool:
        """Wait until every message received so far has been handed to the core (or dropped
        as malformed) and the core has applied it. False on timeout. Messages still in ZMQ
        queues are not "received" yet."""
        deadline = time.monotonic() + timeout
        target = self._received
        with self._settled_cond:
            self._sync_waiters += 1
            try:
                while self._settled < target:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not self.running:
                        return False
                    self._settled_cond.wait(min(remaining, 0.5))
            finally:
                self._sync_waiters -= 1
        return self._indexer.flush(max(0.0, deadline - time.monotonic()))

    # -- caller-thread helpers ---------------------------------------------------------------

    @staticmethod
    def _check_spec(spec: PodEndpoint) -> PodEndpoint:
        if not isinstance(spec, PodEndpoint):
            raise ValueError(f"expected a PodEndpoint, got {type(spec).__name__}")
        validate_endpoint(spec.endpoint)
        if spec.replay_endpoint is not None:
            validate_endpoint(spec.replay_endpoint)
        if spec.pod_id is not None and (not isinstance(spec.pod_id, str) or not spec.pod_id):
            raise ValueError("pod_id must be a non-empty string or None")
        return spec

    def _register_spec(self, spec: PodEndpoint) -> None:
        """Record a new endpoint; the caller holds ``_lock`` (or is the constructor)."""
        if spec.endpoint in self._specs:
            raise ValueError(f"endpoint {spec.endpoint} is already subscribed")
        if spec.pod_id is not None and any(s.pod_id == spec.pod_id for s in self._specs.values()):
            raise ValueError(f"pod id {spec.pod_id!r} is already subscribed")
        self._specs[spec.endpoint] = spec

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the loop thread (which owns the sockets) and return its result."""
        if threading.current_thread() is self._thread:
            return fn()
        fut: Future[Any] = Future()
        with self._commands_lock:
            self._commands.append((fn, fut))
        self._wake()
        try:
            return fut.result(_COMMAND_TIMEOUT)
        except FutureTimeout:
            raise TimeoutError("event subscriber thread did not answer") from None

    def _wake(self) -> None:
        w = self._wake_w
        if w is None:
            return
        try:
            w.send(b"\x01")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending, or we are shutting down

    def _fail_commands(self, exc: BaseException) -> None:
        with self._commands_lock:
            commands, self._commands = self._commands, []
        for _, fut in commands:
            if not fut.done():
                fut.set_exception(exc)

    def _merge(self, track: PodTrack, native: Any) -> dict[str, Any]:
        subscribed = self._state == "running" and (track.mode == "bind" or track.endpoint in self._conns)
        return merge_pod_state(
            track,
            native,
            pod=track.pod,
            mode=track.mode,
            endpoint=track.endpoint,
            replay_endpoint=track.replay_endpoint,
            subscribed=subscribed,
        )

    # -- sockets (loop thread, or start() before the loop exists) -----------------------------

    def _sub_socket(self) -> zmq.Socket[bytes]:
        assert self._ctx is not None
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, self._rcvhwm)
        sock.setsockopt(zmq.MAXMSGSIZE, self._max_message_bytes)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
        sock.setsockopt(zmq.SUBSCRIBE, self._prefix_bytes)
        return sock

    def _connect(self, spec: PodEndpoint) -> None:
        sock = self._sub_socket()
        try:
            sock.connect(spec.endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise ValueError(f"cannot connect to {spec.endpoint}: {exc}") from exc
        conn = _Conn(spec=spec, socket=sock)
        self._poller.register(sock, zmq.POLLIN)
        self._owners[sock] = conn
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        conn.monitor = monitor
        self._poller.register(monitor, zmq.POLLIN)
        self._owners[monitor] = _Monitor(conn)
        with self._lock:
            self._conns[spec.endpoint] = conn
        if spec.pod_id is not None:
            self._track_for(spec.pod_id, conn)
        log.info("subscribed to %s (pod %s)", spec.endpoint, spec.pod_id or "from topic")

    def _on_disconnect(self, conn: _Conn) -> None:
        """A connect-mode link dropped. libzmq reconnects by itself after an I/O error, but not
        after a protocol error (a message over ``max_message_bytes``, a peer speaking garbage),
        which would silently end the pod's subscription: so re-dial explicitly either way."""
        monitor, sock = conn.monitor, conn.socket
        if monitor is None or sock is None:
            return
        dropped = False
        while True:
            try:
                event = parse_monitor_message(monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
            dropped = dropped or event["event"] == zmq.EVENT_DISCONNECTED
        if not dropped:
            return
        endpoint = conn.spec.endpoint
        try:
            sock.disconnect(endpoint)
        except zmq.ZMQError:
            pass  # libzmq already forgot the endpoint (protocol error)
        sock.connect(endpoint)
        self._stats["reconnects"] += 1
        self._warn("reconnect", endpoint, "connection to %s dropped; re-dialling", endpoint)

    def _close_monitor(self, conn: _Conn) -> None:
        monitor = conn.monitor
        if monitor is None:
            return
        self._poller.unregister(monitor)
        self._owners.pop(monitor, None)
        if conn.socket is not None:
            conn.socket.disable_monitor()
        monitor.close(linger=0)
        conn.monitor = None

    def _disconnect(self, conn: _Conn) -> None:
        self._close_monitor(conn)
        sock = conn.socket
        if sock is not None:
            self._poller.unregister(sock)
            self._owners.pop(sock, None)
            sock.close(linger=0)
            conn.socket = None
        with self._lock:
            self._conns.pop(conn.spec.endpoint, None)

    def _remove(self, key: str) -> None:
        """Loop thread: drop every endpoint and pod that ``key`` names."""
        pods: set[str] = set()
        for conn in list(self._conns.values()):
            spec = conn.spec
            if key in (spec.endpoint, spec.pod_id) or key in conn.pods:
                pods |= conn.pods
                self._disconnect(conn)
                with self._lock:
                    self._specs.pop(spec.endpoint, None)
        with self._lock:
            named = self._specs.pop(key, None)
            if named is not None and named.pod_id:
                pods.add(named.pod_id)
            for s in [s for s in self._specs.values() if s.pod_id == key]:
                self._specs.pop(s.endpoint)
        if key in self._pods or not pods:
            pods.add(key)
        for pod in pods:
            track = self._pods.get(pod)
            if track is not None:
                if track.job is not None:
                    self._close_job(track.job)
                    self._jobs.pop(pod, None)
                    track.job = None
                track.pending.clear()
                with self._lock:
                    self._pods.pop(pod, None)
            self._indexer.remove_pod(pod)
            log.info("removed pod %s", pod)
        self._update_settled()

    def _teardown(self) -> None:
        for job in list(self._jobs.values()):
            job.close()
        for conn in list(self._conns.values()):
            self._close_monitor(conn)
            if conn.socket is not None:
                conn.socket.close(linger=0)
                conn.socket = None
        if self._bind_socket is not None:
            self._bind_socket.close(linger=0)
            self._bind_socket = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        for s in (self._wake_r, self._wake_w):
            if s is not None:
                s.close()
        self._wake_r = self._wake_w = None
        with self._settled_cond:
            self._settled_cond.notify_all()

    # -- the loop ----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                ready = self._poller.poll(self._poll_timeout_ms())
                for sock, _ in ready:
                    owner = self._owners.get(sock, _MISSING)
                    if sock == self._wake_fd:
                        self._drain_wake()
                    elif owner is _MISSING:
                        continue  # closed earlier in this round
                    elif isinstance(owner, ReplayJob):
                        self._drain_replay(owner)
                    elif isinstance(owner, _Monitor):
                        self._on_disconnect(owner.conn)
                    else:
                        self._drain_live(sock, owner)
                if self._jobs:
                    self._service_timers()
                self._update_settled()
        except Exception:
            log.exception("event subscriber loop crashed")
            self._stats["internal_errors"] += 1
        finally:
            self._fail_commands(RuntimeError("subscriber stopped"))

    def _poll_timeout_ms(self) -> int | None:
        if not self._jobs:
            return None
        wake_at = min(job.wake_at for job in self._jobs.values())
        return max(0, math.ceil((wake_at - time.monotonic()) * 1000))

    def _drain_wake(self) -> None:
        assert self._wake_r is not None
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        with self._commands_lock:
            commands, self._commands = self._commands, []
        for fn, fut in commands:
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:  # handed back to the calling thread
                fut.set_exception(exc)

    def _update_settled(self) -> None:
        settled = self._received
        for job in self._jobs.values():
            track = self._pods.get(job.pod)
            oldest = job.revealing_index
            if track is not None and track.pending:
                oldest = min(oldest, track.pending[0][0])
            settled = min(settled, oldest - 1)
        if settled != self._settled:
            self._settled = settled
            if self._sync_waiters:
                with self._settled_cond:
                    self._settled_cond.notify_all()

    def _drain_live(self, sock: zmq.Socket[bytes], conn: _Conn | None) -> None:
        recv = sock.recv_multipart
        for _ in range(_BURST):
            try:
                frames = recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._received += 1
            try:
                self._on_live(frames, conn, self._received)
            except Exception:
                self._stats["internal_errors"] += 1
                log.exception("error handling a KV event message; skipped")

    def _on_live(self, frames: list[bytes], conn: _Conn | None, index: int) -> None:
        stats = self._stats
        stats["messages_received"] += 1
        if len(frames) != 3:
            self._malformed("frames", conn, None, f"{len(frames)} frames")
            return
        topic, seq_frame, payload = frames
        parsed = self._topic_cache.get(topic)
        if parsed is None:
            parsed = self._parse_topic(topic)
        if parsed is _INVALID_TOPIC:
            self._malformed("topic", conn, None, repr(topic[:64]))
            return
        pod, model = parsed
        if conn is not None and conn.spec.pod_id is not None:
            pod = conn.spec.pod_id
        track = self._pods.get(pod)
        if track is None:
            track = self._track_for(pod, conn)
        if len(seq_frame) != 8:
            self._malformed("seq", conn, track, f"{len(seq_frame)}-byte seq frame")
            return
        seq = int.from_bytes(seq_frame, "big")
        track.messages += 1
        batch = LiveBatch(model, seq, payload)
        if track.job is not None:
            track.pending.append((index, batch))
            if len(track.pending) > self._rcvhwm:
                self._warn("overflow", pod, "replay for pod %s too slow; giving up on it", pod)
                self._finish_job(track.job)
            return
        last = track.last_seq
        if last is not None and seq == last + 1:
            self._apply(track, batch)
        else:
            self._sequence(track, batch, index)

    def _parse_topic(self, topic: bytes) -> tuple[str, str]:
        try:
            parsed = parse_topic(topic, self._prefix)
        except ValueError:
            parsed = _INVALID_TOPIC
        if len(self._topic_cache) >= _TOPIC_CACHE_MAX:
            self._topic_cache.clear()
        self._topic_cache[topic] = parsed
        return parsed

    def _track_for(self, pod: str, conn: _Conn | None) -> PodTrack:
        track = self._pods.get(pod)
        if track is not None:
            return track
        mode: Mode = "bind" if conn is None else "connect"
        track = PodTrack(
            pod=pod,
            mode=mode,
            endpoint=conn.spec.endpoint if conn else self._bound_endpoint,
            replay_endpoint=conn.spec.replay_endpoint if conn else None,
        )
        with self._lock:
            self._pods[pod] = track
            if conn is not None:
                conn.pods.add(pod)
        return track

    def _malformed(self, reason: str, conn: _Conn | None, track: PodTrack | None, what: str) -> None:
        self._stats[f"malformed_{reason}"] += 1
        if track is None and conn is not None and conn.spec.pod_id is not None:
            track = self._pods.get(conn.spec.pod_id)
        if track is not None:
            track.malformed += 1
        source = track.pod if track else (conn.spec.endpoint if conn else "bind")
        self._warn(reason, source, "malformed KV event message from %s (%s): skipped", source, what)

    def _warn(self, what: str, pod: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        key = (what, pod)
        if now - self._last_log.get(key, -_LOG_EVERY) >= _LOG_EVERY:
            if len(self._last_log) > _TOPIC_CACHE_MAX:
                self._last_log.clear()
            self._last_log[key] = now
            log.warning(msg, *args)
        else:
            log.debug(msg, *args)

    # -- sequence handling -------------------------------------------------------------------

    def _apply(self, track: PodTrack, batch: LiveBatch) -> None:
        try:
            if not self._indexer.submit(track.pod, batch.model, batch.seq, batch.payload):
                self._stats["pushbacks"] += 1
        except KvIndexError as exc:
            self._stats["submit_errors"] += 1
            self._warn("submit", track.pod, "core refused a batch of pod %s: %s", track.pod, exc)
        track.last_seq = batch.seq
        track.model = batch.model
        self._stats["messages_applied"] += 1

    def _sequence(self, track: PodTrack, batch: LiveBatch, index: int) -> None:
        verdict = classify(track.last_seq, batch.seq)
        if verdict.reset:
            self._stats["resets"] += 1
            track.resets += 1
            self._warn(
                "reset",
                track.pod,
                "pod %s restarted its sequence (%s -> %d): clearing it",
                track.pod,
                track.last_seq,
                batch.seq,
            )
            self._indexer.clear_pod(track.pod)
            track.last_seq = None
        if verdict.missing_from is not None:
            self._stats["gaps"] += 1
            track.gaps += 1
            if track.replay_endpoint is not None:
                self._start_job(track, verdict.missing_from, batch, index)
                return
            self._stats["unrecoverable_gaps"] += 1
            track.unrecoverable_gaps += 1
            self._warn(
                "gap",
                track.pod,
                "pod %s: batches %d..%d missed and no replay endpoint",
                track.pod,
                verdict.missing_from,
                batch.seq - 1,
            )
        self._apply(track, batch)

    # -- replay ------------------------------------------------------------------------------

    def _start_job(self, track: PodTrack, first_missing: int, batch: LiveBatch, index: int) -> None:
        assert track.replay_endpoint is not None
        job = ReplayJob(
            pod=track.pod,
            endpoint=track.replay_endpoint,
            first_missing=first_missing,
            revealing=batch,
            revealing_index=index,
            settings=self._replay,
        )
        track.job = job
        self._jobs[track.pod] = job
        log.info(
            "pod %s: replaying batches %d..%d from %s",
            track.pod,
            first_missing,
            batch.seq - 1,
            job.endpoint,
        )
        self._send_job(job, track)

    def _send_job(self, job: ReplayJob, track: PodTrack) -> None:
        assert self._ctx is not None
        try:
            sock = job.send(self._ctx, time.monotonic())
        except zmq.ZMQError as exc:
            self._warn("replay", job.pod, "replay request to %s failed: %s", job.endpoint, exc)
            self._finish_job(job)
            return
        self._stats["replays"] += 1
        track.replays += 1
        self._poller.register(sock, zmq.POLLIN)
        self._owners[sock] = job

    def _close_job(self, job: ReplayJob) -> None:
        if job.socket is not None:
            self._poller.unregister(job.socket)
            self._owners.pop(job.socket, None)
        job.close()

    def _drain_replay(self, job: ReplayJob) -> None:
        sock = job.socket
        track = self._pods.get(job.pod)
        if sock is None or track is None:
            return
        for _ in range(_BURST):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                reply = parse_reply(frames)
            except ValueError as exc:
                self._stats["malformed_replay"] += 1
                self._warn("replay", job.pod, "bad replay reply for pod %s: %s", job.pod, exc)
                continue
            if job.on_reply(reply, time.monotonic()):
                assert reply.seq is not None
                model = job.revealing.model
                if reply.topic:
                    parsed = self._topic_cache.get(reply.topic) or self._parse_topic(reply.topic)
                    if parsed is not _INVALID_TOPIC:
                        model = parsed[1]
                self._apply(track, LiveBatch(model, reply.seq, reply.payload))
                self._stats["replayed_batches"] += 1
                track.replayed_batches += 1
            if job.done:
                self._finish_job(job)
                return

    def _service_timers(self) -> None:
        now = time.monotonic()
        for job in list(self._jobs.values()):
            if now < job.wake_at:
                continue
            track = self._pods[job.pod]
            if job.socket is None:
                self._send_job(job, track)  # a retry that is due
                continue
            self._close_job(job)
            self._stats["replay_timeouts"] += 1
            track.replay_timeouts += 1
            if job.on_timeout(now):
                self._warn(
                    "replay",
                    job.pod,
                    "replay from %s timed out (attempt %d); retrying",
                    job.endpoint,
                    job.attempts,
                )
            else:
                self._finish_job(job)

    def _finish_job(self, job: ReplayJob) -> None:
        """End a replay (done, spent or abandoned): apply the batch that revealed the gap, then
        the live batches held meanwhile, in order."""
        self._close_job(job)
        track = self._pods[job.pod]
        track.job = None
        self._jobs.pop(job.pod, None)
        if job.covered:
            log.info("pod %s: gap filled by replay (%d attempt(s))", job.pod, job.attempts)
        else:
            self._stats["unrecoverable_gaps"] += 1
            track.unrecoverable_gaps += 1
            self._warn(
                "gap",
                job.pod,
                "pod %s: could not replay batches %d..%d from %s",
                job.pod,
                job.next_seq,
                job.end_seq - 1,
                job.endpoint,
            )
        self._apply(track, job.revealing)
        while track.pending and track.job is None:
            index, batch = track.pending.popleft()
            last = track.last_seq
            if last is not None and batch.seq == last + 1:
                self._apply(track, batch)
            else:
                self._sequence(track, batch, index)


_MISSING: Any = object()
