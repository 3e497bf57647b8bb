"""The per-pod sequencer: what to do with each batch number, with no sockets, threads or clock.

The subscriber's loop feeds it observations (a live batch of a pod, a replay reply, a replay
request sent or failed, the time) and carries out the decisions it returns, in order:

- ``Apply``: hand the batch to the core (live in order, the batch that revealed a gap, a
  replayed batch, a live batch that was held behind a replay);
- ``Hold``: a replay of this pod is in flight, the batch waits behind it;
- ``Drop``: a replay reply outside the missing range (already applied, or at/after the batch
  that revealed the gap);
- ``Reset``: the publisher restarted (its seq did not move forward): clear the pod first;
- ``Gap``: batches were missed; with a replay endpoint a ``SendReplay`` follows (the plan: ask
  that endpoint for ``start_seq`` onwards), without one the gap is unrecoverable and the batch
  is applied at once;
- ``ReplayTimeout`` / ``ReplayEnd``: an attempt went silent (maybe retried later), or the replay
  is over (filled, or not: then an unrecoverable gap is counted) and the pod's held batches
  follow.

Every seq of a pod is applied at most once and in increasing order between resets; per-pod
counters (``PodTrack``) and their totals are kept here so the rules and their accounting can be
tested together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypeAlias

from kvindex_service.events.replay import LiveBatch, ReplayJob, ReplaySettings, ReplyFrame
from kvindex_service.events.sequence import classify
from kvindex_service.events.state import Mode, PodTrack

__all__ = [
    "SEQ_COUNTERS",
    "Apply",
    "Decision",
    "Drop",
    "EndReason",
    "Gap",
    "Hold",
    "ReplayEnd",
    "ReplayTimeout",
    "Reset",
    "SendReplay",
    "Sequencer",
]

SEQ_COUNTERS = ("gaps", "replays", "replayed_batches", "unrecoverable_gaps", "replay_timeouts", "resets")
"""Counters kept per pod (``PodTrack`` attributes of the same names) and in ``totals``."""


@dataclass(frozen=True, slots=True)
class Apply:
    pod: str
    batch: LiveBatch
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class Hold:
    pod: str
    seq: int
    held: int
    """Batches of the pod now waiting behind its replay."""


@dataclass(frozen=True, slots=True)
class Drop:
    pod: str
    seq: int


@dataclass(frozen=True, slots=True)
class Reset:
    pod: str
    last_seq: int
    seq: int


@dataclass(frozen=True, slots=True)
class Gap:
    pod: str
    first: int
    last: int
    replay_endpoint: str | None
    """None: nowhere to replay from, the gap is unrecoverable (and counted as such)."""


@dataclass(frozen=True, slots=True)
class SendReplay:
    pod: str
    endpoint: str
    start_seq: int
    attempt: int
    """1 for the first request, then one more per retry."""


@dataclass(frozen=True, slots=True)
class ReplayTimeout:
    pod: str
    endpoint: str
    attempts: int
    retry: bool
    """False: retries spent, a ``ReplayEnd`` follows."""


EndReason = Literal["done", "spent", "send_failed", "overflow"]


@dataclass(frozen=True, slots=True)
class ReplayEnd:
    pod: str
    endpoint: str
    reason: EndReason
    covered: bool
    next_seq: int
    """First batch the replay did not deliver (``end_seq`` or more when it delivered all)."""
    end_seq: int
    """The batch that revealed the gap."""
    attempts: int
    probe: bool = False
    """The replay only looked for a batch 0 before a stream's first batch 1: a publisher numbering
    from 1 has none, so an uncovered probe is no gap (nothing is counted or warned)."""


Decision: TypeAlias = Apply | Hold | Drop | Reset | Gap | SendReplay | ReplayTimeout | ReplayEnd


class Sequencer:
    """Sequence state of every pod. Not thread-safe: one thread drives it; ``tracks`` may be
    read (not iterated while mutated) by others under the owner's lock."""

    def __init__(self, settings: ReplaySettings, *, max_held: int) -> None:
        self.settings = settings
        self.max_held = max_held
        """Live batches a pod may hold behind its replay before the replay is abandoned."""
        self.tracks: dict[str, PodTrack] = {}
        self.totals = dict.fromkeys(SEQ_COUNTERS, 0)
        self._jobs: dict[str, ReplayJob] = {}
        self._probes: set[str] = set()
        """Pods whose running replay is a probe for batch 0 (see ``_first_batch_one``)."""
        self.resume: dict[str, int] = {}
        """Last seq per pod restored from a snapshot: a new track starts from it, so the next
        batch after a gap is replayed from there (and one not moving forward is a reset)."""

    # -- pods --------------------------------------------------------------------------------

    def add_pod(
        self, pod: str, *, mode: Mode = "bind", endpoint: str | None = None, replay_endpoint: str | None = None
    ) -> PodTrack:
        """The pod's track, created on first sight."""
        track = self.tracks.get(pod)
        if track is None:
            track = PodTrack(pod=pod, mode=mode, endpoint=endpoint, replay_endpoint=replay_endpoint)
            track.last_seq = self.resume.pop(pod, None)
            self.tracks[pod] = track
        return track

    def remove_pod(self, pod: str) -> PodTrack | None:
        """Forget the pod, its replay and its held batches (no decisions: it is gone)."""
        self._jobs.pop(pod, None)
        self._probes.discard(pod)
        track = self.tracks.pop(pod, None)
        if track is not None:
            track.job = None
            track.pending.clear()
        return track

    @property
    def replays_in_progress(self) -> int:
        return len(self._jobs)

    def job(self, pod: str) -> ReplayJob | None:
        return self._jobs.get(pod)

    def next_wakeup(self) -> float | None:
        """When ``due`` has something to do (None: no replay running)."""
        return min((job.wake_at for job in self._jobs.values()), default=None)

    def oldest_held(self) -> int | None:
        """Lowest receive index of a batch not yet decided (held behind a replay)."""
        oldest: int | None = None
        for job in self._jobs.values():
            index = job.revealing_index
            track = self.tracks.get(job.pod)
            if track is not None and track.pending:
                index = min(index, track.pending[0][0])
            oldest = index if oldest is None else min(oldest, index)
        return oldest

    # -- observations ------------------------------------------------------------------------

    def observe(self, pod: str, batch: LiveBatch, index: int = 0) -> list[Decision]:
        """A live batch of a known pod (``add_pod`` first); ``index`` is its receive index."""
        track = self.tracks[pod]
        track.messages += 1
        job = track.job
        if job is not None:
            track.pending.append((index, batch))
            if len(track.pending) > self.max_held:
                return self._end(track, job, "overflow")
            return [Hold(pod, batch.seq, len(track.pending))]
        out: list[Decision] = []
        self._sequence(track, batch, index, out)
        return out

    def replay_sent(self, pod: str, now: float) -> None:
        """The loop sent the request of the pod's last ``SendReplay``."""
        job = self._jobs[pod]
        job.on_sent(now)
        self._count(self.tracks[pod], "replays")

    def replay_failed(self, pod: str) -> list[Decision]:
        """The request could not be sent: the replay ends here."""
        job = self._jobs.get(pod)
        if job is None:
            return []
        return self._end(self.tracks[pod], job, "send_failed")

    def on_reply(self, pod: str, reply: ReplyFrame, now: float, model: str | None = None) -> list[Decision]:
        """One reply to the pod's replay. ``model`` comes from the reply's topic when it has a
        valid one; otherwise the batch that revealed the gap names it."""
        job = self._jobs.get(pod)
        if job is None:
            return []
        track = self.tracks[pod]
        out: list[Decision] = []
        if job.on_reply(reply, now):
            assert reply.seq is not None
            batch = LiveBatch(job.revealing.model if model is None else model, reply.seq, reply.payload)
            out.append(self._apply(track, batch, replayed=True))
        elif reply.seq is not None:
            out.append(Drop(pod, reply.seq))
        if job.done:
            out += self._end(track, job, "done")
        return out

    def due(self, now: float) -> list[Decision]:
        """Replay timers: retries that are due, attempts that went silent."""
        out: list[Decision] = []
        for job in [j for j in self._jobs.values() if now >= j.wake_at]:
            if not job.in_flight:
                out.append(SendReplay(job.pod, job.endpoint, job.next_seq, job.attempts + 1))
                continue
            track = self.tracks[job.pod]
            self._count(track, "replay_timeouts")
            retry = job.on_timeout(now)
            out.append(ReplayTimeout(job.pod, job.endpoint, job.attempts, retry))
            if not retry:
                out += self._end(track, job, "spent")
        return out

    # -- transitions -------------------------------------------------------------------------

    def _count(self, track: PodTrack, key: str) -> None:
        setattr(track, key, getattr(track, key) + 1)
        self.totals[key] += 1

    def _apply(self, track: PodTrack, batch: LiveBatch, *, replayed: bool = False) -> Apply:
        track.last_seq = batch.seq
        track.model = batch.model
        if replayed:
            self._count(track, "replayed_batches")
        return Apply(track.pod, batch, replayed)

    def _sequence(self, track: PodTrack, batch: LiveBatch, index: int, out: list[Decision]) -> None:
        last = track.last_seq
        if last is not None and batch.seq == last + 1:
            out.append(self._apply(track, batch))
            return
        verdict = classify(last, batch.seq)
        if verdict.reset and last is not None:
            self._count(track, "resets")
            out.append(Reset(track.pod, last, batch.seq))
            track.last_seq = None
        if verdict.missing_from == 0 and batch.seq == 1:
            self._first_batch_one(track, batch, index, out)
            return
        if verdict.missing_from is not None:
            self._count(track, "gaps")
            endpoint = track.replay_endpoint
            out.append(Gap(track.pod, verdict.missing_from, batch.seq - 1, endpoint))
            if endpoint is not None:
                job = ReplayJob(
                    pod=track.pod,
                    endpoint=endpoint,
                    first_missing=verdict.missing_from,
                    revealing=batch,
                    revealing_index=index,
                    settings=self.settings,
                )
                track.job = self._jobs[track.pod] = job
                out.append(SendReplay(track.pod, endpoint, job.next_seq, 1))
                return
            self._count(track, "unrecoverable_gaps")
        out.append(self._apply(track, batch))

    def _first_batch_one(self, track: PodTrack, batch: LiveBatch, index: int, out: list[Decision]) -> None:
        """A stream (or a restarted one) whose first batch seen is 1: publishers numbering from 1
        (llm-d-inference-sim) start there, vLLM's start at 0. Never a gap: without a replay
        endpoint the stream starts at 1; with one, batch 0 is asked for (a probe) and applied
        if the publisher has it, and nothing is counted if it has none."""
        endpoint = track.replay_endpoint
        if endpoint is None:
            out.append(self._apply(track, batch))
            return
        job = ReplayJob(
            pod=track.pod,
            endpoint=endpoint,
            first_missing=0,
            revealing=batch,
            revealing_index=index,
            settings=self.settings,
        )
        track.job = self._jobs[track.pod] = job
        self._probes.add(track.pod)
        out.append(SendReplay(track.pod, endpoint, 0, 1))

    def _end(self, track: PodTrack, job: ReplayJob, reason: EndReason) -> list[Decision]:
        """The replay is over: apply the batch that revealed the gap, then the held ones in
        order (one of which may reveal the next gap and stop there)."""
        track.job = None
        self._jobs.pop(track.pod, None)
        covered = job.covered
        probe = track.pod in self._probes
        self._probes.discard(track.pod)
        if not covered and not probe:
            self._count(track, "unrecoverable_gaps")
        out: list[Decision] = [
            ReplayEnd(track.pod, job.endpoint, reason, covered, job.next_seq, job.end_seq, job.attempts, probe),
            self._apply(track, job.revealing),
        ]
        while track.pending and track.job is None:
            index, batch = track.pending.popleft()
            self._sequence(track, batch, index, out)
        return out
