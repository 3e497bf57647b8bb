"""Filling sequence gaps from vLLM's replay buffer: the protocol frames and one gap's progress.

vLLM (with ``replay_endpoint`` set) binds a ROUTER that answers ``[b"", start_seq]`` with every
buffered batch whose number is ``>= start_seq`` and then an end marker whose seq is ``ff`` x 8.
Up to 0.25 each reply is ``[b"", seq, payload]``; from 0.26 the topic rides along:
``[b"", topic, seq, payload]``. The buffer holds the last ``buffer_steps`` batches, so a gap
older than that cannot be filled.

Nothing here touches a socket or reads a clock: the subscriber's loop owns the DEALER sockets
(``links.open_dealer``) and passes the time in, so a ``ReplayJob`` is plain bookkeeping that
the sequencer drives and its tests can exercise without ZMQ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvindex_service.events.topic import END_SEQ, encode_seq

__all__ = [
    "LiveBatch",
    "ReplayJob",
    "ReplaySettings",
    "ReplyFrame",
    "build_request",
    "parse_reply",
]


@dataclass(frozen=True, slots=True)
class LiveBatch:
    """One batch taken off the live stream, already attributed to a pod."""

    model: str
    seq: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class ReplyFrame:
    seq: int | None
    """None for the end marker."""
    topic: bytes | None
    """Only vLLM >= 0.26 sends it."""
    payload: bytes


def build_request(start_seq: int) -> list[bytes]:
    """The DEALER side of vLLM's replay protocol: empty delimiter, then the first wanted seq."""
    return [b"", encode_seq(start_seq)]


def parse_reply(frames: list[bytes]) -> ReplyFrame:
    """Parse one reply of either shape; ``ValueError`` for anything else."""
    if len(frames) == 3:
        delimiter, seq_frame, payload = frames
        topic = None
    elif len(frames) == 4:
        delimiter, topic, seq_frame, payload = frames
    else:
        raise ValueError(f"replay reply has {len(frames)} frames, expected 3 or 4")
    if delimiter:
        raise ValueError("replay reply does not start with an empty delimiter frame")
    if len(seq_frame) != 8:
        raise ValueError(f"replay seq frame has {len(seq_frame)} bytes, expected 8")
    if seq_frame == END_SEQ:
        return ReplyFrame(seq=None, topic=topic, payload=payload)
    return ReplyFrame(seq=int.from_bytes(seq_frame, "big"), topic=topic, payload=payload)


@dataclass(frozen=True, slots=True)
class ReplaySettings:
    timeout: float
    """Seconds without any reply before an attempt is abandoned."""
    retries: int
    """Further attempts after the first one times out."""
    backoff: float
    """Delay before retry n is ``backoff * 2**(n-1)`` seconds."""
    rcvhwm: int
    max_message_bytes: int

    def __post_init__(self) -> None:
        if self.rcvhwm < 1:
            raise ValueError("rcvhwm must be >= 1 (0 would mean unbounded)")
        if not self.timeout > 0 or not math.isfinite(self.timeout):
            raise ValueError("replay_timeout must be a positive number of seconds")
        if self.retries < 0:
            raise ValueError("replay_retries must be >= 0")
        if not self.backoff >= 0 or not math.isfinite(self.backoff):
            raise ValueError("replay_backoff must be >= 0 seconds")
        if self.max_message_bytes < 1:
            raise ValueError("max_message_bytes must be >= 1")


class ReplayJob:
    """Fill batches ``first_missing .. revealing.seq - 1`` of one pod.

    A retry resumes from the first batch still missing; the loop opens a fresh DEALER for each
    attempt so that late replies to an abandoned attempt can never count for the current one.
    """

    def __init__(
        self,
        *,
        pod: str,
        endpoint: str,
        first_missing: int,
        revealing: LiveBatch,
        revealing_index: int = 0,
        settings: ReplaySettings,
    ) -> None:
        self.pod = pod
        self.endpoint = endpoint
        self.first_missing = first_missing
        self.next_seq = first_missing
        self.end_seq = revealing.seq
        self.revealing = revealing
        self.revealing_index = revealing_index
        """The subscriber's receive index of the revealing batch (for ``sync``)."""
        self.settings = settings
        self.complete = True
        """False once a batch of the range is known to be unrecoverable."""
        self.attempts = 0
        self.timeouts = 0
        self.in_flight = False
        """An attempt was sent and has neither ended nor timed out."""
        self.wake_at = 0.0
        """Deadline of the running attempt, or when the next attempt is due (0: send now)."""
        self.done = False
        """The end marker arrived: no more replies for this attempt."""

    @property
    def covered(self) -> bool:
        return self.complete and self.next_seq >= self.end_seq

    def on_sent(self, now: float) -> None:
        """An attempt asking for ``next_seq`` onwards went out at ``now``."""
        self.attempts += 1
        self.in_flight = True
        self.wake_at = now + self.settings.timeout

    def on_reply(self, reply: ReplyFrame, now: float) -> bool:
        """Account for one reply; True if it is a batch of the missing range, to be applied now
        (before anything else of the pod). Sets ``done`` on the end marker."""
        self.wake_at = now + self.settings.timeout
        seq = reply.seq
        if seq is None:
            self.done = True
            return False
        if seq < self.next_seq or seq >= self.end_seq:
            return False
        if seq > self.next_seq:
            # The buffer no longer holds next_seq .. seq-1: that part of the gap is lost.
            self.complete = False
        self.next_seq = seq + 1
        return True

    def on_timeout(self, now: float) -> bool:
        """The running attempt went silent. True if another attempt is due later (at
        ``wake_at``), False if the retries are spent."""
        self.in_flight = False
        self.timeouts += 1
        if self.attempts > self.settings.retries:
            return False
        self.wake_at = now + self.settings.backoff * (2 ** (self.attempts - 1))
        return True
