"""What the subscriber logs: rate-limited warnings, and one line per sequencer decision worth
an operator's attention (restarts, gaps, replays).

The logger is the subscriber's (``kvindex_service.events.subscriber``), passed in, so log
configuration and the messages themselves are those operators already know.
"""

from __future__ import annotations

import logging
import time

from kvindex_service.events.admission import safe_text
from kvindex_service.events.sequencer import Decision, Gap, ReplayEnd, ReplayTimeout, Reset

__all__ = ["Warner", "log_decision"]

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
        if d.covered:
            warn.log.info("pod %s: gap filled by replay (%d attempt(s))", safe_text(d.pod), d.attempts)
        else:
            msg = "pod %s: could not replay batches %d..%d from %s"
            warn("gap", d.pod, msg, d.pod, d.next_seq, d.end_seq - 1, d.endpoint)
