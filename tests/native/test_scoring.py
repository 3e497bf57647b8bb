"""Scorer: `Indexer.score` against the reference token processor + dict model."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvindex_service import Indexer
from tests.native.reference import RefIndex, RefTokenProcessor, assert_same_scores

WEIGHTS = {"GPU": 1.0, "CPU": 0.5}
PODS = ("a:1", "b:1", "c:1", "d:1")
TIERS = ("GPU", "CPU")
BS = 4

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Prompts built from a few shared stems so that pods share prefixes and diverge later.
stem_st = st.lists(st.integers(0, 50), min_size=0, max_size=6)


@st.composite
def prompts(draw: st.DrawFn) -> list[int]:
    stems = [[7] * 8, [7] * 4 + [9] * 4, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]
    base = draw(st.sampled_from(stems))
    return base + draw(stem_st) + draw(st.lists(st.integers(0, 2**32 - 1), max_size=14))


@st.composite
def states(draw: st.DrawFn) -> list[tuple[str, list[int], int, int, str]]:
    """(pod, prompt, first block, block count, tier) placements: a pod holds a slice of a
    prompt's chain (usually from block 0, sometimes a hole-y tail only)."""
    out = []
    for _ in range(draw(st.integers(0, 8))):
        prompt = draw(prompts())
        n = len(prompt) // BS
        start = draw(st.sampled_from([0, 0, 0, 1]))
        count = draw(st.integers(0, max(0, n - start)))
        pod, tier = draw(st.sampled_from(PODS)), draw(st.sampled_from(TIERS))
        out.append((pod, prompt, start, count, tier))
    return out


def build(
    placements: list[tuple[str, list[int], int, int, str]], lora: str | None = None
) -> tuple[Indexer, RefIndex, RefTokenProcessor]:
    ix = Indexer(block_size=BS, hash_seed="7", shards=1, tier_weights=WEIGHTS)
    ref = RefIndex(block_size=BS, tier_weights=WEIGHTS)
    tp = RefTokenProcessor(BS, "7")
    for pod, prompt, start, count, tier in placements:
        keys = tp.block_keys(prompt, lora_name=lora)[start : start + count]
        ix.add_blocks(pod, "model", keys, tier)
        ref.add_blocks(pod, "model", keys, tier)
    return ix, ref, tp


@SETTINGS
@given(
    placements=states(),
    query=prompts(),
    pods=st.one_of(st.none(), st.lists(st.sampled_from((*PODS, "never-seen:1")), max_size=5)),
)
def test_score_matches_reference(
    placements: list[tuple[str, list[int], int, int, str]],
    query: list[int],
    pods: list[str] | None,
) -> None:
    ix, ref, tp = build(placements)
    got = ix.score("model", query, pods=pods)
    want = ref.score_keys("model", tp.block_keys(query), pods)
    assert got.total_blocks == len(query) // BS
    assert got.total_tokens == len(query)
    assert_same_scores(got, want, tokens=len(query))
    best_matched = max((s.matched_blocks for s in got.scores), default=0)
    assert best_matched <= got.keys_computed <= got.total_blocks
    if pods is not None:
        assert {s.pod for s in got.scores} == set(pods)
    ix.close()


def test_pods_filter_lists_every_candidate() -> None:
    ix, _, tp = build([("a:1", list(range(16)), 0, 4, "GPU")])
    res = ix.score("model", list(range(16)), pods=["never-seen:1", "a:1", "b:1"])
    by_pod = {s.pod: s for s in res.scores}
    assert set(by_pod) == {"never-seen:1", "a:1", "b:1"}
    assert by_pod["a:1"].matched_blocks == 4
    for name in ("never-seen:1", "b:1"):
        s = by_pod[name]
        assert (s.matched_blocks, s.matched_tokens, s.score) == (0, 0, 0.0)
        assert s.tier_blocks == {} or not any(s.tier_blocks.values())
    assert res.scores[0].pod == "a:1"
    # The filter also excludes: a holder not named is not listed.
    only_b = ix.score("model", list(range(16)), pods=["b:1"])
    assert [s.pod for s in only_b.scores] == ["b:1"]
    best_b = only_b.best()
    assert best_b is not None and best_b.matched_blocks == 0
    ix.close()


@pytest.mark.parametrize("extra", [0, 1, BS - 1])
def test_trailing_partial_block_never_counts(extra: int) -> None:
    full = list(range(3 * BS))
    ix, _, _ = build([("a:1", full + [99] * BS, 0, 4, "GPU")])
    prompt = full + [99] * extra
    res = ix.score("model", prompt)
    assert res.total_blocks == 3
    assert res.total_tokens == len(prompt)
    best = res.best()
    assert best is not None
    assert best.matched_blocks == 3 and best.matched_tokens == 3 * BS
    ix.close()


def test_short_prompt_has_no_blocks() -> None:
    ix, _, _ = build([("a:1", list(range(8)), 0, 2, "GPU")])
    res = ix.score("model", [0, 1, 2])
    assert (res.total_blocks, res.total_tokens, res.keys_computed) == (0, 3, 0)
    assert res.scores == [] and res.best() is None
    empty = ix.score("model", [])
    assert (empty.total_blocks, empty.total_tokens, empty.scores) == (0, 0, [])
    ix.close()


def test_keys_computed_stops_early() -> None:
    long_prompt = list(range(4000))
    ix, _, tp = build([("a:1", long_prompt, 1, 50, "GPU")])  # holds blocks 1..50, not block 0
    res = ix.score("model", long_prompt)
    assert res.total_blocks == 1000
    assert res.keys_computed <= 1
    assert res.scores == []
    named = ix.score("model", long_prompt, pods=["a:1", "z:1"])
    assert named.keys_computed <= 1
    assert all(s.matched_blocks == 0 for s in named.scores)
    # Once block 0 is held the scan runs exactly as far as the longest run, plus one miss.
    ix.add_blocks("a:1", "model", tp.block_keys(long_prompt)[:1])
    res = ix.score("model", long_prompt)
    best = res.best()
    assert best is not None and best.matched_blocks == 51
    assert 51 <= res.keys_computed <= 52
    ix.close()


def test_tier_weights_and_runs() -> None:
    prompt = list(range(6 * BS))
    ix, ref, tp = build(
        [
            ("a:1", prompt, 0, 6, "CPU"),
            ("a:1", prompt, 0, 2, "GPU"),
            ("b:1", prompt, 0, 5, "GPU"),
            ("c:1", prompt, 0, 4, "GPU"),
        ]
    )
    res = ix.score("model", prompt)
    by_pod = {s.pod: s for s in res.scores}
    # a: 2 blocks at GPU weight, 4 more at CPU weight; b: 5 at GPU weight; c: 4 at GPU weight.
    assert by_pod["a:1"].score == pytest.approx(2 * 1.0 + 4 * 0.5)
    assert by_pod["b:1"].score == pytest.approx(5.0)
    assert by_pod["c:1"].score == pytest.approx(4.0)
    assert {t: n for t, n in by_pod["a:1"].tier_blocks.items() if n} == {"CPU": 6, "GPU": 2}
    assert by_pod["a:1"].matched_blocks == 6
    # b has the higher weighted score despite a shorter match than a: best first by score;
    # a and c tie on score, and a's longer match ranks it first.
    assert [s.pod for s in res.scores] == ["b:1", "a:1", "c:1"]
    assert res.best() is not None and res.best().pod == "b:1"  # type: ignore[union-attr]
    ix.close()


def test_default_weights_and_unnamed_tier() -> None:
    ix = Indexer(block_size=BS, shards=1)
    keys = ix.block_keys(list(range(2 * BS)))
    ix.add_blocks("a:1", "model", keys, "CPU")
    ix.add_blocks("b:1", "model", keys, "DISK")  # an unnamed tier weighs like CPU
    ix.add_blocks("c:1", "model", keys, "GPU")
    res = {s.pod: s.score for s in ix.score_keys("model", keys).scores}
    assert res == pytest.approx({"a:1": 1.6, "b:1": 1.6, "c:1": 2.0})
    ix.close()


def test_lora_and_salt_scores_use_their_key_space() -> None:
    prompt = list(range(3 * BS))
    ix, _, tp = build([("a:1", prompt, 0, 3, "GPU")], lora="adapter")
    assert ix.score("model", prompt).scores == []
    hit = ix.score("model", prompt, lora_name="adapter").best()
    assert hit is not None and hit.matched_blocks == 3
    assert ix.score("model", prompt, lora_name="other").scores == []
    salted = tp.block_keys(prompt, cache_salt="s")
    ix.add_blocks("b:1", "model", salted)
    hit = ix.score("model", prompt, cache_salt="s").best()
    assert hit is not None and hit.pod == "b:1" and hit.matched_blocks == 3
    ix.close()


def test_score_keys_counts_block_size_tokens() -> None:
    ix = Indexer(block_size=BS, shards=1)
    ix.add_blocks("a:1", "model", [10, 11])
    res = ix.score_keys("model", [10, 11, 12])
    assert (res.total_blocks, res.total_tokens) == (3, 3 * BS)
    best = res.best()
    assert best is not None and (best.matched_blocks, best.matched_tokens) == (2, 2 * BS)
    ix.close()


def test_ties_broken_by_pod_name() -> None:
    ix = Indexer(block_size=BS, shards=1)
    ix.add_blocks("b:1", "model", [1])
    ix.add_blocks("a:1", "model", [1])
    assert [s.pod for s in ix.score_keys("model", [1]).scores] == ["a:1", "b:1"]
    named = ix.score_keys("model", [1], pods=["z:1", "y:1", "b:1", "a:1"])
    assert [s.pod for s in named.scores] == ["a:1", "b:1", "y:1", "z:1"]
    ix.close()


def test_key_memo_gives_the_same_keys_warm_and_cold() -> None:
    """The read path's key memo (on by default for SHA-256 algorithms) never changes a key:
    repeated, extended and diverging prompts score exactly as with the memo off."""
    rng = random.Random(5)
    base = [rng.randrange(128_000) for _ in range(16 * 40)]
    prompts = [base, base + [1] * 37, base[: 16 * 12] + [rng.randrange(128_000) for _ in range(300)], base]
    for algorithm in ("sha256_cbor", "sha256_cbor_64bit"):
        warm = Indexer(block_size=16, algorithm=algorithm, key_memo=64)
        cold = Indexer(block_size=16, algorithm=algorithm, key_memo=0)
        for ix in (warm, cold):
            ix.add_blocks("a:1", "m", cold.block_keys(base)[:25])
            ix.add_blocks("b:1", "m", cold.block_keys(prompts[2])[:20])
        for _ in range(2):
            for p in prompts:
                for lora in (None, "l"):
                    got = warm.score("m", p, lora_name=lora, pods=["a:1", "b:1"])
                    want = cold.score("m", p, lora_name=lora, pods=["a:1", "b:1"])
                    assert [(s.pod, s.matched_blocks) for s in got.scores] == [
                        (s.pod, s.matched_blocks) for s in want.scores
                    ]
        assert warm.score("m", base).scores[0].matched_blocks == 25
        warm.close()
        cold.close()
