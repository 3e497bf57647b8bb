"""The per-pod sequencer on its own: plain Python, no sockets, time passed in."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvindex_service.events.replay import LiveBatch, ReplaySettings, ReplyFrame
from kvindex_service.events.sequencer import (
    Apply,
    Decision,
    Drop,
    Gap,
    Hold,
    ReplayEnd,
    ReplayTimeout,
    Reset,
    SendReplay,
    Sequencer,
)

REPLAY = "tcp://10.0.0.1:5558"
SETTINGS = ReplaySettings(timeout=1.0, retries=1, backoff=0.5, rcvhwm=100, max_message_bytes=1 << 20)


def seqr(max_held: int = 100, settings: ReplaySettings = SETTINGS) -> Sequencer:
    s = Sequencer(settings, max_held=max_held)
    s.add_pod("a", mode="connect", endpoint="tcp://10.0.0.1:5557", replay_endpoint=REPLAY)
    s.add_pod("b")  # bind mode, nowhere to replay from
    return s


def live(seq: int, model: str = "m") -> LiveBatch:
    return LiveBatch(model, seq, b"p%d" % seq)


def reply(seq: int | None, topic: bytes | None = None) -> ReplyFrame:
    return ReplyFrame(seq=seq, topic=topic, payload=b"r%d" % seq if seq is not None else b"")


def applied(decisions: list[Decision]) -> list[int]:
    return [d.batch.seq for d in decisions if isinstance(d, Apply)]


def feed(s: Sequencer, pod: str, seqs: list[int]) -> list[Decision]:
    out: list[Decision] = []
    for seq in seqs:
        out += s.observe(pod, live(seq), index=seq + 1)
    return out


def test_in_order_batches_are_applied() -> None:
    s = seqr()
    out = feed(s, "b", [0, 1, 2])
    assert out == [Apply("b", live(0)), Apply("b", live(1)), Apply("b", live(2))]
    track = s.tracks["b"]
    assert (track.last_seq, track.messages, track.gaps, track.resets) == (2, 3, 0, 0)
    assert s.totals == dict.fromkeys(s.totals, 0)


def test_repeated_seq_is_a_restart_whose_first_batches_were_missed() -> None:
    """A seq that does not move forward is never applied twice: the publisher restarted, so the
    pod is reset; batch 4 of the new process reveals that 0-3 were missed."""
    s = seqr()
    feed(s, "b", [0, 1, 2, 3, 4])
    out = s.observe("b", live(4))
    assert out == [Reset("b", 4, 4), Gap("b", 0, 3, None), Apply("b", live(4))]
    assert (s.tracks["b"].resets, s.tracks["b"].gaps, s.tracks["b"].unrecoverable_gaps) == (1, 1, 1)


def test_a_stream_numbered_from_one_starts_without_a_gap() -> None:
    """llm-d-inference-sim numbers its batches from 1: with nowhere to replay from, batch 1
    simply starts the stream (and a restart at 1 restarts it the same way)."""
    s = seqr()
    assert feed(s, "b", [1, 2]) == [Apply("b", live(1)), Apply("b", live(2))]
    assert s.observe("b", live(1)) == [Reset("b", 2, 1), Apply("b", live(1))]
    track = s.tracks["b"]
    assert (track.gaps, track.unrecoverable_gaps, track.resets, track.last_seq) == (0, 0, 1, 1)
    assert s.totals["gaps"] == s.totals["unrecoverable_gaps"] == 0
    # a later join (first seq > 1) is still a gap from 0
    s.add_pod("c")
    assert s.observe("c", live(2)) == [Gap("c", 0, 1, None), Apply("c", live(2))]


def test_first_batch_one_with_a_replay_endpoint_probes_for_batch_zero() -> None:
    """With a replay endpoint batch 0 is asked for: a publisher numbering from 1 has none
    (no gap, no unrecoverable gap, no warning); vLLM's missed batch 0 is recovered."""
    s = seqr()
    assert s.observe("a", live(1)) == [SendReplay("a", REPLAY, 0, 1)]
    s.replay_sent("a", now=0.0)
    assert isinstance(s.observe("a", live(2), index=3)[0], Hold)
    out = s.on_reply("a", reply(1), 0.1) + s.on_reply("a", reply(None), 0.1)
    assert out == [
        Drop("a", 1),
        ReplayEnd("a", REPLAY, "done", False, 0, 1, 1, True),
        Apply("a", live(1)),
        Apply("a", live(2)),
    ]
    track = s.tracks["a"]
    assert (track.gaps, track.unrecoverable_gaps, track.replays, track.last_seq) == (0, 0, 1, 2)
    # a vLLM stream whose batch 0 we missed gets it back
    s2 = seqr()
    s2.observe("a", live(1))
    s2.replay_sent("a", now=0.0)
    out = s2.on_reply("a", reply(0), 0.1) + s2.on_reply("a", reply(None), 0.1)
    assert applied(out) == [0, 1] and out[1] == ReplayEnd("a", REPLAY, "done", True, 1, 1, 1, True)
    assert (s2.tracks["a"].gaps, s2.tracks["a"].unrecoverable_gaps) == (0, 0)
    # a silent endpoint: retries spent, the stream starts at 1, still nothing counted as lost
    s3 = seqr()
    s3.observe("a", live(1))
    s3.replay_sent("a", now=0.0)
    out = s3.due(5.0) + s3.due(10.0)
    s3.replay_sent("a", now=10.0)
    out = s3.due(20.0)
    assert applied(out) == [1] and s3.tracks["a"].unrecoverable_gaps == 0
    assert s3.replays_in_progress == 0


def test_restart_at_zero_resets_and_applies() -> None:
    s = seqr()
    feed(s, "a", [0, 1, 2])
    out = s.observe("a", live(0))
    assert out == [Reset("a", 2, 0), Apply("a", live(0))]
    assert s.tracks["a"].last_seq == 0 and s.tracks["a"].resets == 1 and s.totals["resets"] == 1
    assert s.observe("a", live(1)) == [Apply("a", live(1))]


def test_gap_without_replay_endpoint_is_unrecoverable_and_applied() -> None:
    s = seqr()
    out = feed(s, "b", [0, 1, 5])
    assert out[2:] == [Gap("b", 2, 4, None), Apply("b", live(5))]
    assert (s.tracks["b"].gaps, s.tracks["b"].unrecoverable_gaps) == (1, 1)
    assert s.replays_in_progress == 0


def test_mid_stream_join_without_replay_endpoint() -> None:
    s = seqr()
    assert s.observe("b", live(7)) == [Gap("b", 0, 6, None), Apply("b", live(7))]


def test_gap_plans_a_replay_and_holds_the_revealing_batch() -> None:
    s = seqr()
    feed(s, "a", [0, 1])
    out = s.observe("a", live(5), index=9)
    assert out == [Gap("a", 2, 4, REPLAY), SendReplay("a", REPLAY, 2, 1)]
    assert s.tracks["a"].last_seq == 1  # nothing past the gap applied yet
    assert s.oldest_held() == 9
    assert s.next_wakeup() == 0.0  # the request is due now
    s.replay_sent("a", now=10.0)
    assert s.next_wakeup() == 11.0
    assert (s.tracks["a"].replays, s.totals["replays"], s.replays_in_progress) == (1, 1, 1)


def test_replay_covering_the_gap_applies_in_order_then_the_revealing_batch() -> None:
    s = seqr()
    feed(s, "a", [0, 1])
    s.observe("a", live(5), index=9)
    s.replay_sent("a", now=0.0)
    out: list[Decision] = []
    for seq in (0, 1, 2, 3, 4, 5, 6):  # the buffer holds more than the gap
        out += s.on_reply("a", reply(seq), now=0.1)
    assert [d for d in out if isinstance(d, Drop)] == [Drop("a", 0), Drop("a", 1), Drop("a", 5), Drop("a", 6)]
    assert applied(out) == [2, 3, 4]
    assert all(d.replayed for d in out if isinstance(d, Apply))
    end = s.on_reply("a", reply(None), now=0.2)
    assert end == [ReplayEnd("a", REPLAY, "done", True, 5, 5, 1), Apply("a", live(5))]
    track = s.tracks["a"]
    assert (track.replayed_batches, track.unrecoverable_gaps, track.last_seq) == (3, 0, 5)
    assert s.replays_in_progress == 0 and s.oldest_held() is None and s.next_wakeup() is None


def test_replayed_batch_takes_the_model_of_its_topic_or_of_the_revealing_batch() -> None:
    s = seqr()
    s.observe("a", live(2, model="m1"))
    s.replay_sent("a", now=0.0)
    [first] = s.on_reply("a", reply(0), now=0.0)
    [second] = s.on_reply("a", reply(1), now=0.0, model="m2")
    assert isinstance(first, Apply) and first.batch.model == "m1"
    assert isinstance(second, Apply) and second.batch.model == "m2"


def test_partial_replay_counts_an_unrecoverable_gap() -> None:
    """The buffer lost 2: 3 and 4 are still applied, in order, and the gap is counted."""
    s = seqr()
    feed(s, "a", [0, 1])
    s.observe("a", live(5))
    s.replay_sent("a", now=0.0)
    out = s.on_reply("a", reply(3), 0.0) + s.on_reply("a", reply(4), 0.0) + s.on_reply("a", reply(None), 0.0)
    assert applied(out) == [3, 4, 5]
    end = next(d for d in out if isinstance(d, ReplayEnd))
    assert (end.reason, end.covered) == ("done", False)
    assert (s.tracks["a"].unrecoverable_gaps, s.totals["unrecoverable_gaps"]) == (1, 1)


def test_end_marker_before_the_gap_is_filled_is_unrecoverable() -> None:
    s = seqr()
    s.observe("a", live(3))
    s.replay_sent("a", now=0.0)
    out = s.on_reply("a", reply(0), 0.0) + s.on_reply("a", reply(None), 0.0)
    assert applied(out) == [0, 3]
    assert next(d for d in out if isinstance(d, ReplayEnd)).covered is False


def test_timeouts_retry_with_backoff_then_give_up() -> None:
    s = seqr()  # retries=1, timeout=1.0, backoff=0.5
    feed(s, "a", [0])
    s.observe("a", live(4))
    s.replay_sent("a", now=0.0)
    assert s.due(0.5) == []
    assert s.due(1.0) == [ReplayTimeout("a", REPLAY, 1, retry=True)]
    assert s.next_wakeup() == 1.5
    assert s.due(1.2) == []
    assert s.due(1.5) == [SendReplay("a", REPLAY, 1, 2)]
    s.replay_sent("a", now=1.5)
    out = s.due(2.5)
    assert out == [
        ReplayTimeout("a", REPLAY, 2, retry=False),
        ReplayEnd("a", REPLAY, "spent", False, 1, 4, 2),
        Apply("a", live(4)),
    ]
    track = s.tracks["a"]
    assert (track.replays, track.replay_timeouts, track.unrecoverable_gaps, track.last_seq) == (2, 2, 1, 4)


def test_retry_resumes_from_the_first_batch_still_missing() -> None:
    s = seqr()
    s.observe("a", live(4))
    s.replay_sent("a", now=0.0)
    s.on_reply("a", reply(0), now=0.5)
    s.on_reply("a", reply(1), now=0.5)
    assert s.due(1.4) == []  # each reply pushes the deadline
    assert s.due(1.5)[0] == ReplayTimeout("a", REPLAY, 1, retry=True)
    assert s.due(2.0) == [SendReplay("a", REPLAY, 2, 2)]


def test_failed_send_ends_the_replay_at_once() -> None:
    s = seqr()
    feed(s, "a", [0])
    s.observe("a", live(3))
    out = s.replay_failed("a")
    assert out == [ReplayEnd("a", REPLAY, "send_failed", False, 1, 3, 0), Apply("a", live(3))]
    assert s.replays_in_progress == 0 and s.tracks["a"].replays == 0
    assert s.replay_failed("a") == []


def test_live_batches_wait_behind_the_replay_then_follow_in_order() -> None:
    s = seqr()
    feed(s, "a", [0])
    s.observe("a", live(3), index=10)
    s.replay_sent("a", now=0.0)
    assert s.observe("a", live(4), index=11) == [Hold("a", 4, 1)]
    assert s.observe("a", live(5), index=12) == [Hold("a", 5, 2)]
    assert s.oldest_held() == 10
    assert s.tracks["a"].last_seq == 0
    out = s.on_reply("a", reply(1), 0.0) + s.on_reply("a", reply(2), 0.0) + s.on_reply("a", reply(None), 0.0)
    assert applied(out) == [1, 2, 3, 4, 5]
    assert not s.tracks["a"].pending and s.oldest_held() is None


def test_gap_among_held_batches_starts_the_next_replay() -> None:
    """While 1-2 are replayed, 3 and then 6 arrive: after the first replay, 6 reveals 4-5 and
    a second replay starts; batches after it stay held."""
    s = seqr()
    feed(s, "a", [0])
    s.observe("a", live(3), index=3)
    s.replay_sent("a", now=0.0)
    held = feed(s, "a", [4, 6, 7])
    assert [type(d) for d in held] == [Hold, Hold, Hold]
    out = s.on_reply("a", reply(1), 0.0) + s.on_reply("a", reply(2), 0.0) + s.on_reply("a", reply(None), 0.0)
    assert applied(out) == [1, 2, 3, 4]
    assert out[-2:] == [Gap("a", 5, 5, REPLAY), SendReplay("a", REPLAY, 5, 1)]
    assert [b.seq for _, b in s.tracks["a"].pending] == [7]
    assert s.oldest_held() == 7  # 6 (index 7) reveals the gap; 7 (index 8) is held behind it
    s.replay_sent("a", now=1.0)
    out = s.on_reply("a", reply(5), 1.0) + s.on_reply("a", reply(None), 1.0)
    assert applied(out) == [5, 6, 7]
    assert (s.tracks["a"].gaps, s.tracks["a"].replays, s.tracks["a"].unrecoverable_gaps) == (2, 2, 0)


def test_restart_among_held_batches_resets_after_the_replay() -> None:
    s = seqr()
    feed(s, "a", [0])
    s.observe("a", live(2))
    s.replay_sent("a", now=0.0)
    feed(s, "a", [0, 1])  # the publisher restarted while we were replaying
    out = s.on_reply("a", reply(1), 0.0) + s.on_reply("a", reply(None), 0.0)
    assert applied(out) == [1, 2, 0, 1]
    assert Reset("a", 2, 0) in out and s.tracks["a"].resets == 1


def test_too_many_held_batches_abandon_the_replay() -> None:
    s = seqr(max_held=2)
    feed(s, "a", [0])
    s.observe("a", live(5))
    s.replay_sent("a", now=0.0)
    assert [type(d) for d in feed(s, "a", [6, 7])] == [Hold, Hold]
    out = s.observe("a", live(8))
    assert out[0] == ReplayEnd("a", REPLAY, "overflow", False, 1, 5, 1)
    assert applied(out) == [5, 6, 7, 8]
    assert s.tracks["a"].unrecoverable_gaps == 1 and s.replays_in_progress == 0


def test_pods_are_independent() -> None:
    s = seqr()
    s.add_pod("c", replay_endpoint="tcp://10.0.0.3:5558")
    feed(s, "a", [0])
    s.observe("a", live(3))  # a waits on its replay
    s.replay_sent("a", now=0.0)
    assert applied(feed(s, "b", [0, 1, 2])) == [0, 1, 2]
    assert s.observe("c", live(2)) == [
        Gap("c", 0, 1, "tcp://10.0.0.3:5558"),
        SendReplay("c", "tcp://10.0.0.3:5558", 0, 1),
    ]
    s.replay_sent("c", now=5.0)
    assert s.replays_in_progress == 2 and s.next_wakeup() == 1.0
    assert s.on_reply("c", reply(0), 5.0) == [Apply("c", LiveBatch("m", 0, b"r0"), replayed=True)]
    assert s.tracks["a"].last_seq == 0  # untouched by the others
    assert s.on_reply("b", reply(7), 5.0) == []  # no replay for b: nothing to do
    due = s.due(1.0)
    assert [d.pod for d in due] == ["a"]
    assert (s.totals["gaps"], s.tracks["a"].gaps, s.tracks["b"].gaps, s.tracks["c"].gaps) == (2, 1, 0, 1)


def test_remove_pod_forgets_its_replay_and_held_batches() -> None:
    s = seqr()
    s.observe("a", live(3))
    s.replay_sent("a", now=0.0)
    s.observe("a", live(4))
    track = s.remove_pod("a")
    assert track is not None and track.job is None and not track.pending
    assert s.replays_in_progress == 0 and s.oldest_held() is None and s.remove_pod("a") is None
    assert s.add_pod("a").last_seq is None  # a fresh track


def test_add_pod_keeps_an_existing_track() -> None:
    s = seqr()
    track = s.tracks["a"]
    assert s.add_pod("a", mode="bind") is track and track.mode == "connect"
    with pytest.raises(KeyError):
        s.observe("unknown", live(0))


# -- properties ------------------------------------------------------------------------------

# One step: a live batch (seq), a replay reply (seq or end marker), or time passing.
_step = st.one_of(
    st.tuples(st.just("live"), st.sampled_from("ab"), st.integers(0, 12)),
    st.tuples(st.just("reply"), st.sampled_from("ab"), st.one_of(st.none(), st.integers(0, 12))),
    st.tuples(st.just("tick"), st.just(""), st.integers(0, 3)),
    st.tuples(st.just("fail"), st.sampled_from("ab"), st.just(0)),
)


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(_step, max_size=60), max_held=st.integers(1, 4))
def test_applied_seqs_increase_between_resets_and_no_batch_is_lost(
    steps: list[tuple[str, str, int | None]], max_held: int
) -> None:
    """Whatever arrives: per pod, applied seqs strictly increase between resets (so none is
    applied twice), every live batch is applied or held exactly once, and held batches are
    only held while a replay runs."""
    s = Sequencer(SETTINGS, max_held=max_held)
    for pod in "ab":
        s.add_pod(pod, replay_endpoint=REPLAY)
    now = 0.0
    last: dict[str, int | None] = {"a": None, "b": None}
    live_in = {"a": 0, "b": 0}
    live_applied = {"a": 0, "b": 0}

    def run(decisions: list[Decision]) -> None:
        todo = list(decisions)
        while todo:
            d = todo.pop(0)
            if isinstance(d, Reset):
                last[d.pod] = None
            elif isinstance(d, Apply):
                prev = last[d.pod]
                assert prev is None or d.batch.seq > prev, (d, prev)
                last[d.pod] = d.batch.seq
                live_applied[d.pod] += not d.replayed
            elif isinstance(d, SendReplay):
                s.replay_sent(d.pod, now)

    for kind, pod, value in steps:
        if kind == "live":
            assert value is not None
            live_in[pod] += 1
            run(s.observe(pod, live(value)))
        elif kind == "reply":
            run(s.on_reply(pod, reply(value), now))
        elif kind == "fail":
            run(s.replay_failed(pod))
        else:
            now += float(value or 0)
            run(s.due(now))
        for p in "ab":
            track = s.tracks[p]
            held = len(track.pending) + (track.job is not None)
            assert live_applied[p] + held == live_in[p]
            assert track.job is not None or not track.pending
            assert len(track.pending) <= max_held
            assert track.last_seq == last[p]
