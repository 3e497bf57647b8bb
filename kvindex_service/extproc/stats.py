"""Counters shared by the ext_proc server, its interceptor and its metrics collector.

A leaf module: it imports nothing from the package, so those three can all depend on it
without depending on each other.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

__all__ = ["StreamStats"]


@dataclass(slots=True)
class StreamStats:
    """Stream-level counters (read by the metrics collector)."""

    opened: int = 0
    active: int = 0
    cancelled: int = 0
    protocol_errors: int = 0
    internal_errors: int = 0
    skipped_messages: int = 0
    bad_requests: Counter[int] = field(default_factory=Counter)
    #: Subset-hint entries dropped, by reason (see :mod:`.hints`).
    hint_dropped: Counter[str] = field(default_factory=Counter)
