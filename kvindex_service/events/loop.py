"""The subscriber's loop thread: reading frames, edge checks, and carrying out the sequencer's
decisions (see ``subscriber.py`` for the whole picture).

``Loop`` is the base of ``Subscriber``: the methods here run on the loop thread (or in
``Subscriber.start`` before the loop exists), which owns every socket; the state they use is
set up by ``Subscriber.__init__``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import zmq

from kvindex_service._native import KvIndexError
from kvindex_service.events.admission import Admission, IngestBudget, safe_text
from kvindex_service.events.eventlog import ParentLog, Warner, log_decision
from kvindex_service.events.links import Conn, Dealer, Links, Monitor
from kvindex_service.events.progress import Progress
from kvindex_service.events.replay import LiveBatch, parse_reply
from kvindex_service.events.sequencer import (
    Apply,
    Decision,
    ReplayEnd,
    ReplayTimeout,
    Reset,
    SendReplay,
    Sequencer,
)
from kvindex_service.events.state import PodTrack
from kvindex_service.events.topic import PodEndpoint, TopicCache

if TYPE_CHECKING:
    from kvindex_service._native import Indexer

__all__ = ["Loop", "peer_address"]

log = logging.getLogger("kvindex_service.events.subscriber")

_BURST = 512
"""Messages read from one socket before the loop looks at the others (fairness)."""
_PAUSE_SLICE = 0.05
"""Longest sleep of an ingest push-back before the loop checks whether it is stopping."""


class Loop:
    """The loop-thread half of ``Subscriber``."""

    _indexer: Indexer
    _bind: str | None
    _prefix_bytes: bytes
    _seq: Sequencer
    _admit: Admission
    _budget: IngestBudget
    _idle: float | None
    _next_sweep: float
    _slots: int | None
    _lock: threading.Lock
    _specs: dict[str, PodEndpoint]
    _links: Links
    _conns: dict[str, Conn]
    _stopping: bool
    _stats: dict[str, int]
    _topics: TopicCache
    _progress: Progress
    _warn: Warner
    _parents: ParentLog

    def _pod_count(self) -> int:
        """Pods counted against ``max_pods``: every pod that published, plus every
        configured endpoint whose pod has not published yet."""
        tracks, n = self._seq.tracks, len(self._seq.tracks)
        for spec in self._specs.values():
            if spec.pod_id is not None:
                n += spec.pod_id not in tracks
            else:
                conn = self._conns.get(spec.endpoint)
                n += conn is None or not conn.pods
        return n

    # -- sockets (loop thread, or start() before the loop exists) -----------------------------

    def _connect(self, spec: PodEndpoint) -> None:
        conn = self._links.connect(spec)
        if spec.pod_id is not None:
            self._track_for(spec.pod_id, conn)
        log.info("subscribed to %s (pod %s)", safe_text(spec.endpoint), safe_text(spec.pod_id or "from topic"))

    def _on_disconnect(self, conn: Conn) -> None:
        if self._links.on_dropped(conn, time.monotonic()):
            endpoint = conn.spec.endpoint
            self._stats["reconnects"] += 1
            self._warn("reconnect", endpoint, "connection to %s dropped; re-dialling with backoff", endpoint)

    def _remove(self, key: str) -> None:
        """Loop thread: drop every endpoint and pod that ``key`` names."""
        pods: set[str] = set()
        for conn in list(self._conns.values()):
            spec = conn.spec
            if key in (spec.endpoint, spec.pod_id) or key in conn.pods:
                pods |= conn.pods
                self._links.disconnect(conn)
                with self._lock:
                    self._specs.pop(spec.endpoint, None)
        with self._lock:
            named = self._specs.pop(key, None)
            if named is not None and named.pod_id:
                pods.add(named.pod_id)
            for s in [s for s in self._specs.values() if s.pod_id == key]:
                self._specs.pop(s.endpoint)
        if key in self._seq.tracks or not pods:
            pods.add(key)
        for pod in pods:
            self._links.close_dealer(pod)
            with self._lock:
                self._seq.remove_pod(pod)
            self._indexer.remove_pod(pod)
            self._budget.forget(pod)
            log.info("removed pod %s", safe_text(pod))
        self._slots = None
        self._update_settled()

    def _teardown(self) -> None:
        self._links.close()
        self._progress.wake_all()

    # -- the loop ----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                ready = self._links.poll(self._poll_timeout_ms())
                for sock, _ in ready:
                    owner = self._links.owners.get(sock, _MISSING)
                    if sock == self._links.mailbox.fd:
                        self._links.mailbox.run_pending()
                    elif owner is _MISSING:
                        continue  # closed earlier in this round
                    elif isinstance(owner, Dealer):
                        self._drain_replay(owner)
                    elif isinstance(owner, Monitor):
                        self._on_disconnect(owner.conn)
                    else:
                        self._drain_live(sock, owner)
                now = time.monotonic()
                if self._seq.replays_in_progress:
                    self._carry_out(self._seq.due(now))
                self._links.redial_due(now)
                if self._idle is not None and now >= self._next_sweep:
                    self._expire_idle(now)
                self._update_settled()
                self._parents.poll(now, self._indexer.pod_states)
        except Exception:
            log.exception("event subscriber loop crashed")
            self._stats["internal_errors"] += 1
        finally:
            self._links.mailbox.fail_pending(RuntimeError("subscriber stopped"))

    def _expire_idle(self, now: float) -> None:
        """Forget bind-mode pods silent for ``pod_idle_timeout`` (never configured or
        ``POST /pods`` ones, which are connect mode): their blocks leave the index."""
        assert self._idle is not None
        self._next_sweep = now + min(self._idle / 2, 5.0)
        cutoff = now - self._idle
        for track in [t for t in self._seq.tracks.values() if t.mode == "bind" and t.last_seen < cutoff]:
            if not any(s.pod_id == track.pod for s in self._specs.values()):
                self._remove(track.pod)
                self._stats["pods_expired"] += 1

    def _poll_timeout_ms(self) -> int | None:
        wakes = [self._seq.next_wakeup(), self._links.next_redial(), self._next_sweep if self._idle else None]
        wakes.append(self._parents.next_at)
        wake_at = min((w for w in wakes if w is not None), default=None)
        if wake_at is None:
            return None
        return max(0, math.ceil((wake_at - time.monotonic()) * 1000))

    def _update_settled(self) -> None:
        self._progress.settle(self._seq.oldest_held())

    def _drain_live(self, sock: zmq.Socket[bytes], conn: Conn | None) -> None:
        recv = sock.recv_multipart
        endpoint = self._bind if conn is None else conn.spec.endpoint
        with_peer = (
            self._admit.needs_peer
            and (conn is None or conn.spec.pod_id is None)
            and bool(endpoint and endpoint.startswith("tcp://"))
        )
        now = time.monotonic()
        for _ in range(_BURST):
            peer: str | None = None
            try:
                if with_peer:
                    parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    peer = peer_address(parts[0])
                    frames = [part.bytes for part in parts]
                else:
                    frames = recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._progress.received += 1
            if conn is not None:
                conn.heard = True
            try:
                self._on_live(frames, conn, self._progress.received, peer, now)
            except Exception:
                self._stats["internal_errors"] += 1
                log.exception("error handling a KV event message; skipped")

    def _on_live(self, frames: list[bytes], conn: Conn | None, index: int, peer: str | None, now: float) -> None:
        self._stats["messages_received"] += 1
        if len(frames) != 3:
            self._malformed("frames", conn, None, f"{len(frames)} frames")
            return
        topic, seq_frame, payload = frames
        refused = self._admit.check_topic_size(topic, len(self._prefix_bytes))
        if refused is not None:
            self._admit.reject(refused)
            return
        parsed = self._topics.get(topic)
        if parsed is None:
            self._malformed("topic", conn, None, repr(topic[:64]))
            return
        pod, model = parsed
        if conn is not None and conn.spec.pod_id is not None:
            pod = conn.spec.pod_id  # the configured pod id wins: a link speaks for its pod only
        refused = self._admit.check_names(pod, model) or self._admit.check_peer(pod, peer)
        if refused is None and conn is not None and conn.pods and pod not in conn.pods and self._admit.verify_peer:
            refused = "other_pod"  # a link without a configured pod id is pinned to its first pod
        track = self._seq.tracks.get(pod)
        if refused is None and track is None and (conn is None or conn.pods):
            if self._slots is None:
                self._slots = self._pod_count()
            if self._slots >= self._admit.max_pods:
                refused = "pod_limit"
        if refused is not None:
            self._admit.reject(refused)
            return
        if track is None:
            track = self._track_for(pod, conn)
        track.last_seen = now
        if len(seq_frame) != 8:
            self._malformed("seq", conn, track, f"{len(seq_frame)}-byte seq frame")
            return
        batch = LiveBatch(model, int.from_bytes(seq_frame, "big"), payload)
        self._carry_out(self._seq.observe(pod, batch, index))

    def _track_for(self, pod: str, conn: Conn | None) -> PodTrack:
        with self._lock:
            track = self._seq.add_pod(
                pod,
                mode="bind" if conn is None else "connect",
                endpoint=conn.spec.endpoint if conn else self._links.bound_endpoint,
                replay_endpoint=conn.spec.replay_endpoint if conn else None,
            )
            if conn is not None:
                conn.pods.add(pod)
            self._slots = None
        track.last_seen = time.monotonic()
        return track

    def _malformed(self, reason: str, conn: Conn | None, track: PodTrack | None, what: str) -> None:
        self._stats[f"malformed_{reason}"] += 1
        if track is None and conn is not None and conn.spec.pod_id is not None:
            track = self._seq.tracks.get(conn.spec.pod_id)
        if track is not None:
            track.malformed += 1
        source = track.pod if track else (conn.spec.endpoint if conn else "bind")
        self._warn(reason, source, "malformed KV event message from %s (%s): skipped", source, what)

    def _drain_replay(self, dealer: Dealer) -> None:
        pod, sock = dealer.pod, dealer.socket
        for _ in range(_BURST):
            if self._links.dealers.get(pod) is not dealer:
                return  # the replay ended (or moved on to a new attempt or gap)
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                reply = parse_reply(frames)
            except ValueError as exc:
                self._stats["malformed_replay"] += 1
                self._warn("replay", pod, "bad replay reply for pod %s: %s", pod, exc)
                continue
            parsed = self._topics.get(reply.topic) if reply.topic else None
            model = parsed[1] if parsed else None
            self._carry_out(self._seq.on_reply(pod, reply, time.monotonic(), model))

    # -- carrying out the sequencer's decisions ----------------------------------------------

    def _carry_out(self, decisions: list[Decision]) -> None:
        """Do what the sequencer decided, in order. A replay request that cannot be sent ends
        that replay at once; its follow-up decisions run before the rest of the list."""
        todo = deque(decisions)
        while todo:
            d = todo.popleft()
            log_decision(d, self._warn)
            if isinstance(d, Apply):
                self._submit(d.pod, d.batch)
            elif isinstance(d, Reset):
                self._indexer.clear_pod(d.pod)
            elif isinstance(d, SendReplay):
                todo.extendleft(reversed(self._send_replay(d)))
            elif isinstance(d, ReplayTimeout | ReplayEnd):
                self._links.close_dealer(d.pod)

    def _submit(self, pod: str, batch: LiveBatch) -> None:
        delay = self._budget.wait(pod, time.monotonic())
        if delay > 0:
            self._stats["throttled"] += 1
            self._pause(delay)
        try:
            if not self._indexer.submit(pod, batch.model, batch.seq, batch.payload):
                self._stats["pushbacks"] += 1
        except KvIndexError as exc:
            self._stats["submit_errors"] += 1
            self._warn("submit", pod, "core refused a batch of pod %s: %s", pod, exc)
        self._stats["messages_applied"] += 1

    def _pause(self, seconds: float) -> None:
        """Push-back: stop reading for ``seconds`` (in slices, so ``stop`` is never held up)."""
        deadline = time.monotonic() + seconds
        while not self._stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, _PAUSE_SLICE))

    def _send_replay(self, d: SendReplay) -> list[Decision]:
        """Open the attempt's DEALER; the decisions that follow a failed send."""
        try:
            self._links.open_dealer(d.pod, d.endpoint, d.start_seq)
        except zmq.ZMQError as exc:
            self._warn("replay", d.pod, "replay request to %s failed: %s", d.endpoint, exc)
            return self._seq.replay_failed(d.pod)
        self._seq.replay_sent(d.pod, time.monotonic())
        return []


_MISSING: Any = object()


def peer_address(frame: zmq.Frame) -> str:
    """The IP the frame came from (libzmq's ``Peer-Address``), or "" if libzmq has none."""
    try:
        return str(frame.get("Peer-Address"))
    except (zmq.ZMQError, UnicodeDecodeError):
        return ""
