"""What the subscriber knows about each pod, and the merged view exported to Python callers.

The native core knows what it applied (blocks, last seq, decode errors, hash agreement); only
the subscriber knows what happened on the wire (gaps, replays, restarts, malformed frames,
which endpoint the pod came through). Operators want one record per pod, so both are merged
into a plain JSON-ready dict.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from copy import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from kvindex_service.events.replay import LiveBatch, ReplayJob
from kvindex_service.events.topic import PodEndpoint

if TYPE_CHECKING:
    from kvindex_service._native import PodState

__all__ = ["Mode", "PodTrack", "merge_pod_state", "pod_records", "spec_record", "track_record"]

Mode = Literal["connect", "bind"]


@dataclass(slots=True, eq=False)
class PodTrack:
    """Subscriber-side record of one pod (one sequence stream). Mutated by the subscriber
    thread only (through its ``Sequencer``); other threads read plain ints, which is safe under
    the GIL."""

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
    last_seen: float = 0.0
    """When the last message of the pod arrived (monotonic; for ``pod_idle_timeout``)."""
    job: ReplayJob | None = None
    pending: deque[tuple[int, LiveBatch]] = field(default_factory=deque)
    """Live batches (with their receive index) held in order while ``job`` fills a gap."""


# (record key, value when the core has not seen the pod)
_NATIVE_FIELDS: tuple[tuple[str, Any], ...] = (
    ("models", []),
    ("blocks_by_tier", {}),
    ("last_seq", None),
    ("last_event_ts", None),
    ("dp_rank", None),
    ("batches_applied", 0),
    ("events_applied", 0),
    ("decode_errors", 0),
    ("unknown_event_types", 0),
    ("unknown_parents", 0),
    ("hash_matches", 0),
    ("hash_mismatches", 0),
    ("hashes_match", None),
    ("bridge_entries", 0),
)
# (record key, PodTrack attribute), 0 before the first message
_TRACK_FIELDS: tuple[tuple[str, str], ...] = (
    ("messages_received", "messages"),
    ("gaps", "gaps"),
    ("replays", "replays"),
    ("replayed_batches", "replayed_batches"),
    ("unrecoverable_gaps", "unrecoverable_gaps"),
    ("replay_timeouts", "replay_timeouts"),
    ("resets", "resets"),
    ("malformed_messages", "malformed"),
)


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
        # the core's getters return fresh lists/dicts; the defaults are copied so records
        # never share one mutable object
        **{name: getattr(native, name) if native else copy(zero) for name, zero in _NATIVE_FIELDS},
    }
    job = track.job if track else None
    out.update(
        {
            **{key: (getattr(track, attr) if track else 0) for key, attr in _TRACK_FIELDS},
            "last_seq_received": track.last_seq if track else None,
            "replay_in_progress": job is not None,
            "pending_messages": len(track.pending) if track else 0,
        }
    )
    return out


def track_record(
    track: PodTrack, native: PodState | None, *, running: bool, linked: Mapping[str, Any]
) -> dict[str, Any]:
    """The record of a pod that has published; ``linked`` holds the connected endpoints."""
    return merge_pod_state(
        track,
        native,
        pod=track.pod,
        mode=track.mode,
        endpoint=track.endpoint,
        replay_endpoint=track.replay_endpoint,
        subscribed=running and (track.mode == "bind" or track.endpoint in linked),
    )


def spec_record(spec: PodEndpoint, pod: str | None, native: PodState | None, *, subscribed: bool) -> dict[str, Any]:
    """The record of a configured endpoint whose pod has not published yet."""
    return merge_pod_state(
        None,
        native,
        pod=pod,
        mode="connect",
        endpoint=spec.endpoint,
        replay_endpoint=spec.replay_endpoint,
        subscribed=subscribed,
    )


def pod_records(
    tracks: Iterable[PodTrack],
    specs: Iterable[PodEndpoint],
    linked: Mapping[str, set[str]],
    natives: Mapping[str, PodState],
    *,
    running: bool,
) -> list[dict[str, Any]]:
    """Every known pod sorted by pod id, then the configured endpoints that have not published
    yet (``pod`` is their explicit pod id, or None until their first message names it).
    ``linked`` maps each connected endpoint to the pod ids seen through it."""
    by_pod = {t.pod: t for t in tracks}
    out = [track_record(t, natives.get(t.pod), running=running, linked=linked) for _, t in sorted(by_pod.items())]
    for spec in specs:
        if spec.pod_id is not None:
            if spec.pod_id in by_pod:
                continue
            pod: str | None = spec.pod_id
        elif linked.get(spec.endpoint):
            continue
        else:
            pod = None
        native = natives.get(pod) if pod else None
        out.append(spec_record(spec, pod, native, subscribed=running and spec.endpoint in linked))
    return out
