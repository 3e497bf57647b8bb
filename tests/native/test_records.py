"""The binding's share of the shared index: ``score_entries`` / ``score_packed`` rank gathered
entries exactly as ``Indexer.score_keys`` ranks the same entries held in the core."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvindex_service._native import Indexer, score_entries, score_packed

PODS = ["a", "b", "c", "10.0.0.1:8000"]
TIERS = ["GPU", "CPU", "DISK"]

entries_st = st.lists(
    st.lists(st.tuples(st.sampled_from(PODS), st.sampled_from(TIERS)), max_size=6), min_size=1, max_size=8
)


def _table(r: object) -> list[tuple[str, int, float, dict[str, int]]]:
    return [(s.pod, s.matched_blocks, round(s.score, 9), dict(s.tier_blocks)) for s in r.scores]  # type: ignore[attr-defined]


@settings(max_examples=60, deadline=None)
@given(entries=entries_st, pods=st.none() | st.lists(st.sampled_from([*PODS, "zz"]), max_size=3))
def test_gathered_entries_rank_like_the_core(entries: list[list[tuple[str, str]]], pods: list[str] | None) -> None:
    ix = Indexer(shards=1, tier_weights={"DISK": 0.5})
    keys = [1000 + i for i in range(len(entries))]
    for key, per in zip(keys, entries, strict=True):
        for pod, tier in per:
            ix.add_blocks(pod, "m", [key], tier)
    want = _table(ix.score_keys("m", keys, pods=pods))
    kw = {"block_size": 16, "total_blocks": len(keys), "total_tokens": 16 * len(keys), "tier_weights": {"DISK": 0.5}}
    assert _table(score_entries(entries, pods=pods, **kw)) == want
    packed = [b"\x1e".join(f"{p}\x1f{t}".encode() for p, t in per) for per in entries]
    assert _table(score_packed(packed, pods=pods, **kw)) == want
    ix.close()


def test_no_entries_still_lists_candidates() -> None:
    r = score_entries([], block_size=16, total_blocks=3, total_tokens=50, pods=["b", "a"])
    assert [(s.pod, s.matched_blocks) for s in r.scores] == [("a", 0), ("b", 0)]
    assert (r.total_blocks, r.total_tokens) == (3, 50)
