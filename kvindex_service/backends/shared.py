"""A replica's link to the shared index: the writer thread that carries event batches to it,
the bounded buffer that holds them while it is unreachable, reconnects with backoff, and the
degraded scoring answer. Transports never see Redis: they see ``SharedIndex`` and ``Tee``.

Failure rules:

- a batch that cannot be written stays at the head of the buffer and is retried (backoff
  0.05 s doubling to 5 s); batches arriving meanwhile wait behind it, up to ``buffer``
  batches; past that, new batches are dropped and counted (``dropped``);
- ``/score`` gets one attempt within ``index.backend_timeout``; on error it answers from
  this replica's own copy of the index when it ingests (else an empty answer) with
  ``degraded: true``;
- ``reason()`` is the readiness condition: None while the last call succeeded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from kvindex_service._native import Indexer, ScoreResult
from kvindex_service.backends.redis_index import BackendError, RedisIndex

__all__ = ["SharedIndex", "Tee"]

logger = logging.getLogger(__name__)

_BACKOFF_MIN = 0.05
_BACKOFF_MAX = 5.0

# (kind, pod, model, payload): kind "batch", "clear" or "remove"
_Item = tuple[str, str, str, bytes]

COUNTERS = (
    "batches_applied",
    "batches_dropped",
    "write_errors",
    "entries_added",
    "entries_removed",
    "entries_refused",
    "unknown_parents",
    "decode_errors",
    "scores",
    "scores_degraded",
    "reconnects",
)


class SharedIndex:
    """Owns a ``RedisIndex`` and one writer thread. Thread-safe."""

    def __init__(self, index: RedisIndex, *, buffer: int = 10_000) -> None:
        self.index = index
        self.buffer = buffer
        self.counters = dict.fromkeys(COUNTERS, 0)
        self._count_lock = threading.Lock()  # scores count from request threads
        self.up = False
        self.last_error: str | None = None
        self._queue: deque[_Item] = deque()
        self._cv = threading.Condition()
        self._busy = False
        self._stop = False
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        try:
            self.index.ping()
            self.up = True
        except BackendError as exc:  # not fatal: ingestion buffers, scoring degrades
            self._down(exc)
        self._thread = threading.Thread(target=self._run, name="kvindex-backend", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.flush(timeout)
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self.index.close()

    def count(self, name: str, n: int = 1) -> None:
        with self._count_lock:
            self.counters[name] += n

    # -- write path ----------------------------------------------------------------------
    def put(self, kind: str, pod: str, model: str = "", payload: bytes = b"") -> bool:
        """Queue one item; False (and counted) when the buffer is full."""
        with self._cv:
            if len(self._queue) >= self.buffer:
                self.count("batches_dropped")
                return False
            self._queue.append((kind, pod, model, payload))
            self._cv.notify_all()
        return True

    @property
    def buffered(self) -> int:
        return len(self._queue)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued item is written. False on timeout (e.g. server down)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while self._queue or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(left if left is not None else 0.1)
        return True

    def _run(self) -> None:
        backoff = _BACKOFF_MIN
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait()
                if not self._queue:
                    return
                item = self._queue[0]
                self._busy = True
            try:
                self._write(item)
            except BackendError as exc:
                self.count("write_errors")
                self._down(exc)
                with self._cv:
                    self._busy = False
                    if self._stop:
                        return
                    self._cv.wait(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
                continue
            except Exception:  # a bug must not kill the writer: drop the item, count it
                logger.exception("shared index write failed")
                self.count("batches_dropped")
            backoff = _BACKOFF_MIN
            self._up()
            with self._cv:
                self._queue.popleft()
                self._busy = False
                self._cv.notify_all()

    def _write(self, item: _Item) -> None:
        kind, pod, model, payload = item
        if kind == "batch":
            r = self.index.apply_batch(pod, model, payload)
            self.count("batches_applied")
            self.count("entries_added", r["added"])
            self.count("entries_removed", r["removed"])
            self.count("entries_refused", r["refused"])
            self.count("unknown_parents", r["unknown_parents"])
            self.count("decode_errors", r["decode_errors"])
        elif kind == "clear":
            self.index.clear_pod(pod)
        else:
            self.index.remove_pod(pod)

    def _down(self, exc: Exception) -> None:
        if self.up or self.last_error is None:
            logger.warning("shared index unreachable: %s", exc)
        self.up = False
        self.last_error = str(exc)

    def _up(self) -> None:
        if not self.up:
            if self.last_error is not None:
                self.count("reconnects")
                logger.info("shared index reachable again")
            self.up = True
            self.last_error = None

    def reason(self) -> str | None:
        """Readiness: None while the shared index answers."""
        return None if self.up else f"index backend unreachable: {self.last_error}"

    # -- read path -----------------------------------------------------------------------
    def score(
        self,
        model: str,
        token_ids: Sequence[int],
        *,
        fallback: Indexer | None,
        lora_name: str | None = None,
        cache_salt: str | None = None,
        pods: Sequence[str] | None = None,
    ) -> tuple[ScoreResult, bool]:
        """(result, degraded): from the shared index, else from ``fallback`` (this replica's
        own copy, when it ingests) or nothing."""
        self.count("scores")
        try:
            result = self.index.score(model, token_ids, lora_name=lora_name, cache_salt=cache_salt, pods=pods)
            self._up()
            return result, False
        except BackendError as exc:
            self._down(exc)
            self.count("scores_degraded")
        pod_list = list(pods) if pods is not None else None
        if fallback is not None:
            return fallback.score(model, token_ids, lora_name=lora_name, cache_salt=cache_salt, pods=pod_list), True
        blocks = len(token_ids) // self.index.block_size
        return self.index.ranked([], blocks, len(token_ids), pod_list), True

    def stats(self) -> dict[str, Any]:
        return {**self.counters, "up": self.up, "buffered": self.buffered}


class Tee:
    """What the subscriber feeds: this replica's own ``Indexer`` plus the shared index.
    Everything but the three writes is the local index's."""

    def __init__(self, local: Indexer, shared: SharedIndex) -> None:
        self.local = local
        self.shared = shared

    def submit(self, pod: str, model: str, seq: int, payload: bytes) -> bool:
        self.shared.put("batch", pod, model, payload)
        return self.local.submit(pod, model, seq, payload)

    def clear_pod(self, pod: str) -> None:
        self.shared.put("clear", pod)
        self.local.clear_pod(pod)

    def remove_pod(self, pod: str) -> None:
        self.shared.put("remove", pod)
        self.local.remove_pod(pod)

    def flush(self, timeout: float | None = None) -> bool:
        t0 = time.monotonic()
        ok = self.local.flush(timeout)
        left = None if timeout is None else max(0.0, timeout - (time.monotonic() - t0))
        return self.shared.flush(left) and ok

    def __getattr__(self, name: str) -> Any:
        return getattr(self.local, name)
