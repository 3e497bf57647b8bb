"""Filling sequence gaps from vLLM's replay buffer.

vLLM (with ``replay_endpoint`` set) binds a ROUTER that answers ``[b"", start_seq]`` with every
buffered batch whose number is ``>= start_seq`` and then an end marker whose seq is ``ff`` x 8.
Up to 0.25 each reply is ``[b"", seq, payload]``; from 0.26 the topic rides along:
``[b"", topic, seq, payload]``. The buffer holds the last ``buffer_steps`` batches, so a gap
older than that cannot be filled.

A ``ReplayJob`` is one gap being filled. It never blocks: the subscriber's poll loop feeds it
the DEALER's replies and its timer, so other pods keep flowing while one pod waits on its
replay, and the pod's own live batches wait in order behind the job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import zmq

from kvindex_service.events.topic import END_SEQ, encode_seq

__all__ = [
    "LiveBatch",
    "ReplayJob",
    "ReplaySettings",
    "ReplyFrame",
    "build_request",
    "parse_reply",
]

log = logging.getLogger(__name__)


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


class ReplayJob:
    """Fill batches ``first_missing .. revealing.seq - 1`` of one pod.

    Owned and driven by the subscriber thread only. Each attempt uses a fresh DEALER so that
    late replies to an abandoned attempt can never be mistaken for the current one; a retry
    resumes from the first batch still missing.
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
        self.socket: zmq.Socket[bytes] | None = None
        self.wake_at = 0.0
        """Deadline of the running attempt, or when the next attempt is due."""
        self.done = False
        """The end marker arrived: no more replies for this attempt."""

    @property
    def covered(self) -> bool:
        return self.complete and self.next_seq >= self.end_seq

    def send(self, ctx: zmq.Context[zmq.Socket[bytes]], now: float) -> zmq.Socket[bytes]:
        """Open a DEALER, ask for ``next_seq`` onwards, return the socket to poll."""
        self.close()
        sock = ctx.socket(zmq.DEALER)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, self.settings.rcvhwm)
            sock.setsockopt(zmq.MAXMSGSIZE, self.settings.max_message_bytes)
            sock.connect(self.endpoint)
            sock.send_multipart(build_request(self.next_seq), zmq.NOBLOCK)
        except zmq.ZMQError:
            sock.close(linger=0)
            raise
        self.socket = sock
        self.attempts += 1
        self.wake_at = now + self.settings.timeout
        return sock

    def on_reply(self, reply: ReplyFrame, now: float) -> bool:
        """Account for one reply; True if it is a batch of the missing range, to be applied now
        (the caller applies it before anything else of the pod). Sets ``done`` on the end marker.
        """
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
        self.close()
        self.timeouts += 1
        if self.attempts > self.settings.retries:
            return False
        self.wake_at = now + self.settings.backoff * (2 ** (self.attempts - 1))
        return True

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close(linger=0)
            self.socket = None
