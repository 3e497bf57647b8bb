"""What the subscriber logs: rate-limited warnings, and one line per sequencer decision worth
an operator's attention (restarts, gaps, replays).

The logger is the subscriber's (``kvindex_service.events.subscriber``), passed in, so log
configuration and the messages themselves are those operators already know.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from kvindex_service.events.admission import safe_text
from kvindex_service.events.sequencer import Decision, Gap, ReplayEnd, ReplayTimeout, Reset

__all__ = ["ParentLog", "Warner", "log_decision"]

_LOG_EVERY = 10.0
"""Seconds between WARNING lines for the same (what, pod); repeats in between go to DEBUG."""
_MAX_KEYS = 4096
_ARG_CHARS = 300


class Warner:
    """``log.warning`` at most once per ``_LOG_EVERY`` seconds per (what, source): a flood of
    bad frames or gaps from one pod must not flood the log."""

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self._last: dict[tuple[str, str], float] = {}

    def __call__(self, what: str, source: str, msg: str, *args: object) -> None:
        """Pod ids, topics and endpoints come from the network: every string argument is
        truncated and its control characters escaped."""
        args = tuple(safe_text(a, _ARG_CHARS) if isinstance(a, str | bytes) else a for a in args)
        now = time.monotonic()
        key = (what, source)
        if now - self._last.get(key, -_LOG_EVERY) >= _LOG_EVERY:
            if len(self._last) > _MAX_KEYS:
                self._last.clear()
            self._last[key] = now
            self.log.warning(msg, *args)
        else:
            self.log.debug(msg, *args)


def log_decision(d: Decision, warn: Warner) -> None:
    """The log line(s) of one decision; most decisions (apply, hold, drop, send) log nothing."""
    if isinstance(d, Reset):
        warn("reset", d.pod, "pod %s restarted its sequence (%s -> %d): clearing it", d.pod, d.last_seq, d.seq)
    elif isinstance(d, Gap):
        if d.replay_endpoint is not None:
            msg = "pod %s: replaying batches %d..%d from %s"
            warn.log.info(msg, safe_text(d.pod), d.first, d.last, safe_text(d.replay_endpoint))
        else:
            warn("gap", d.pod, "pod %s: batches %d..%d missed and no replay endpoint", d.pod, d.first, d.last)
    elif isinstance(d, ReplayTimeout):
        if d.retry:
            warn("replay", d.pod, "replay from %s timed out (attempt %d); retrying", d.endpoint, d.attempts)
    elif isinstance(d, ReplayEnd):
        if d.reason == "overflow":
            warn("overflow", d.pod, "replay for pod %s too slow; giving up on it", d.pod)
        if d.probe:
            if d.covered:
                warn.log.info("pod %s: batch 0 recovered by replay", safe_text(d.pod))
            else:
                warn.log.debug("pod %s: its stream starts at batch 1", safe_text(d.pod))
        elif d.covered:
            warn.log.info("pod %s: gap filled by replay (%d attempt(s))", safe_text(d.pod), d.attempts)
        else:
            msg = "pod %s: could not replay batches %d..%d from %s"
            warn("gap", d.pod, msg, d.pod, d.next_seq, d.end_seq - 1, d.endpoint)


class _PodCounts(Protocol):
    @property
    def pod(self) -> str: ...
    @property
    def unknown_parents(self) -> int: ...


class ParentLog:
    """One WARNING per pod per ``every`` seconds with the number of stored events whose parent
    the index did not know since the last line (the core counts them per pod, ``pod_state``);
    their blocks were placed nowhere, so a silent counter alone would hide missed events."""

    def __init__(self, log: logging.Logger, every: float = 60.0) -> None:
        self.log = log
        self.every = every
        self.next_at = time.monotonic() + every
        """When ``poll`` looks again (the loop wakes for it)."""
        self._seen: dict[str, int] = {}

    def poll(self, now: float, states: Callable[[], Iterable[_PodCounts]]) -> None:
        if now < self.next_at:
            return
        self.next_at = now + self.every
        seen: dict[str, int] = {}
        for st in states():
            n = seen[st.pod] = st.unknown_parents
            before = self._seen.get(st.pod, 0)
            delta = n - before if n >= before else n  # a lower count: the pod was removed and is back
            if delta > 0:
                msg = "pod %s: %d stored event(s) with an unknown parent in the last %ds (missed events?): not indexed"
                self.log.warning(msg, safe_text(st.pod, _ARG_CHARS), delta, round(self.every))
        self._seen = seen
