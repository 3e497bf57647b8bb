"""What the subscriber knows about each pod, and the merged view exported to Python callers.

The native core knows what it applied (blocks, last seq, decode errors, hash agreement); only
the subscriber knows what happened on the wire (gaps, replays, restarts, malformed frames,
which endpoint the pod came through). Operators want one record per pod, so both are merged
into a plain JSON-ready dict.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from kvindex_service._native import PodState
    from kvindex_service.events.replay import LiveBatch, ReplayJob

__all__ = ["Mode", "PodTrack", "merge_pod_state"]

Mode = Literal["connect", "bind"]


@dataclass(slots=True, eq=False)
class PodTrack:
    """Subscriber-side record of one pod (one sequence stream). Mutated by the subscriber
    thread only; other threads read plain ints, which is safe under the GIL."""

    pod: str
    mode: Mode
    endpoint: str | None = None
    replay_endpoint: str | None = None
    last_seq: int | None = None
    """Last batch number handed to the core (the core's own last_seq may lag behind)."""
    model: str | None = None
    messages: int = 0
    gaps: int = 0
    replays: int = 0
    replayed_batches: int = 0
    unrecoverable_gaps: int = 0
    replay_timeouts: int = 0
    resets: int = 0
    malformed: int = 0
    job: ReplayJob | None = None
    pending: deque[tuple[int, LiveBatch]] = field(default_factory=deque)
    """Live batches (with their receive index) held in order while ``job`` fills a gap."""


def merge_pod_state(
    track: PodTrack | None,
    native: PodState | None,
    *,
    pod: str | None,
    mode: Mode,
    endpoint: str | None,
    replay_endpoint: str | None,
    subscribed: bool,
) -> dict[str, Any]:
    """One pod's record: native index state (zeros/None when the core has not seen the pod)
    plus the subscriber's wire counters."""
    out: dict[str, Any] = {
        "pod": pod,
        "mode": mode,
        "endpoint": endpoint,
        "replay_endpoint": replay_endpoint,
        "subscribed": subscribed,
        "models": list(native.models) if native else [],
        "blocks_by_tier": dict(native.blocks_by_tier) if native else {},
        "last_seq": native.last_seq if native else None,
        "last_event_ts": native.last_event_ts if native else None,
        "dp_rank": native.dp_rank if native else None,
        "batches_applied": native.batches_applied if native else 0,
        "events_applied": native.events_applied if native else 0,
        "decode_errors": native.decode_errors if native else 0,
        "unknown_event_types": native.unknown_event_types if native else 0,
        "unknown_parents": native.unknown_parents if native else 0,
        "hash_matches": native.hash_matches if native else 0,
        "hash_mismatches": native.hash_mismatches if native else 0,
        "hashes_match": native.hashes_match if native else None,
        "bridge_entries": native.bridge_entries if native else 0,
    }
    job = track.job if track else None
    out.update(
        {
            "last_seq_received": track.last_seq if track else None,
            "messages_received": track.messages if track else 0,
            "gaps": track.gaps if track else 0,
            "replays": track.replays if track else 0,
            "replayed_batches": track.replayed_batches if track else 0,
            "unrecoverable_gaps": track.unrecoverable_gaps if track else 0,
            "replay_timeouts": track.replay_timeouts if track else 0,
            "resets": track.resets if track else 0,
            "malformed_messages": track.malformed if track else 0,
            "replay_in_progress": job is not None,
            "pending_messages": len(track.pending) if track else 0,
        }
    )
    return out
