"""The per-pod ingest bound (``zmq.pod_batch_rate``): a token bucket, then push-back, never a drop."""

from __future__ import annotations

import pytest

from kvindex_service.events.admission import IngestBudget
from tests.events.helpers import Rig, stored_batch, wait_until


def test_unbounded_never_waits() -> None:
    budget = IngestBudget(0)
    assert all(budget.wait("p", 0.0) == 0 for _ in range(10_000))
    assert budget.throttled == 0


def test_burst_of_one_second_then_the_rate() -> None:
    budget = IngestBudget(10)
    assert [budget.wait("p", 0.0) for _ in range(10)] == [0.0] * 10
    assert budget.wait("p", 0.0) == pytest.approx(0.1)  # the 11th batch waits for one token
    assert budget.throttled == 1
    # after that wait, the next token is another 1/rate away
    assert budget.wait("p", 0.1) == pytest.approx(0.1)
    # a pod silent for a long time gets back one second's burst, never more
    assert [budget.wait("p", 100.0) for _ in range(10)] == [0.0] * 10
    assert budget.wait("p", 100.0) > 0


def test_pods_have_their_own_allowance() -> None:
    budget = IngestBudget(2)
    budget.wait("a", 0.0), budget.wait("a", 0.0)
    assert budget.wait("a", 0.0) > 0
    assert budget.wait("b", 0.0) == 0
    budget.forget("a")
    assert budget.wait("a", 0.0) == 0


def test_table_is_bounded() -> None:
    budget = IngestBudget(1, max_pods=4)
    for i in range(100):
        budget.wait(f"pod-{i}", 0.0)
    assert len(budget._buckets) <= 4


@pytest.mark.parametrize("rate", [-1, float("nan"), float("inf")])
def test_bad_rate_is_refused(rate: float) -> None:
    with pytest.raises(ValueError, match="pod_batch_rate"):
        IngestBudget(rate)


def test_subscriber_pushes_back_and_applies_everything(rig: Rig) -> None:
    """A pod publishing faster than its bound: every batch still lands, in order, and the waits
    are counted."""
    ix = rig.indexer()
    sub = rig.subscriber(ix, bind="tcp://127.0.0.1:*", pod_batch_rate=50)
    pub = rig.bound_publisher(sub)
    n = 120  # 50 in the first second's burst, the rest at 50/s
    tokens = list(range(16 * n))
    for seq in range(n):
        keys = [1000 + seq]
        parent = 999 + seq if seq else None
        pub.send(
            [
                b"kv@10.0.0.1:8000@m",
                seq.to_bytes(8, "big"),
                stored_batch(keys, parent, tokens[16 * seq : 16 * seq + 16]),
            ]
        )
    wait_until(lambda: sub.stats()["messages_applied"] == n, what="every batch applied")
    assert sub.sync()
    stats = sub.stats()
    assert stats["throttled"] >= n - 50 - 5  # at most a few tokens refilled while the first burst went in
    assert stats["gaps"] == stats["resets"] == 0
    state = next(s for s in sub.pod_states() if s["pod"] == "10.0.0.1:8000")
    assert state["batches_applied"] == n and state["last_seq"] == n - 1
    assert ix.score("m", tokens).scores[0].matched_blocks == n
