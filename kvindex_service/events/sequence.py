"""Per-pod sequence tracking: decide what one incoming batch number means.

vLLM numbers batches from 0 per publisher process, +1 per batch. A jump forward means batches
were lost (ZMQ drops on high-water marks, a reconnect, a late subscription); a number that does
not move forward means the publisher process restarted and its cache is new. Kept free of
sockets so the rules can be read, and tested, on their own.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SeqVerdict", "classify"]


@dataclass(frozen=True, slots=True)
class SeqVerdict:
    reset: bool
    """The publisher restarted (seq did not move forward): clear the pod before applying."""
    missing_from: int | None
    """First missing batch number when batches ``missing_from .. seq-1`` were never seen."""
    joined: bool
    """The first batch seen from this stream (or after a reset) was not batch 0."""


_IN_ORDER = SeqVerdict(reset=False, missing_from=None, joined=False)


def classify(last_seq: int | None, seq: int) -> SeqVerdict:
    """Classify ``seq`` given the last batch number applied for the stream (None: none yet).

    - first batch 0, or ``last + 1``: in order;
    - ``seq > last + 1``: a gap from ``last + 1``;
    - first batch > 0: a mid-stream join, i.e. a gap from 0;
    - ``seq <= last``: a restart; after the reset the batch is judged as a first batch.
    """
    if last_seq is not None and seq == last_seq + 1:
        return _IN_ORDER
    reset = last_seq is not None and seq <= last_seq
    if reset or last_seq is None:
        if seq == 0:
            return SeqVerdict(reset=reset, missing_from=None, joined=False)
        return SeqVerdict(reset=reset, missing_from=0, joined=True)
    return SeqVerdict(reset=False, missing_from=last_seq + 1, joined=False)
