"""Tier names from the network: bounded per pod, reclaimed when unused, never poisoning another pod."""

from __future__ import annotations

import pytest

from kvindex_service import Indexer, InvalidInputError, index_defaults
from tests.native.test_events import KEYS, MODEL, TOKENS, batch, cleared, matched, new_indexer, removed, stored

# Media real engines send: vLLM's, LMCache's lower-case ones, Mooncake's DISK.
REAL_MEDIA = ("GPU", "CPU", "FS", "OBJ", "STORAGE", "cpu", "gpu", "DISK", "disk", "CXL")


def counter(ix: Indexer, name: str) -> int:
    return ix.counters()[name]


def junk(ix: Indexer, pod: str, names: int, seq0: int = 0) -> None:
    for i in range(names):
        ix.apply(pod, MODEL, batch([stored(KEYS[:1], None, TOKENS[:16], medium=f"junk-{pod}-{i}")]), seq0 + i)


def test_the_limit_is_a_core_default_and_a_setting() -> None:
    from kvindex_service.config import IndexSettings

    assert index_defaults()["max_tiers_per_pod"] == 4
    assert IndexSettings().max_tiers_per_pod == 4
    with pytest.raises(InvalidInputError):
        Indexer(max_tiers_per_pod=0)


def test_junk_tiers_of_one_pod_never_stop_another_pods_known_media() -> None:
    ix = new_indexer()
    junk(ix, "10.0.0.66:8000", 50)
    a = ix.pod_state("10.0.0.66:8000")
    assert a is not None
    # pod A holds its first four junk names; the rest were refused for it alone
    assert len([t for t, n in a.blocks_by_tier.items() if n and t.startswith("JUNK")]) == 4
    assert a.tiers_refused == 46 and a.decode_errors == 46
    assert counter(ix, "tiers_refused") == 46
    # pod B: Mooncake's DISK, then GPU; both store and score
    b = "10.0.0.2:8000"
    res = ix.apply(b, MODEL, batch([stored(KEYS[:2], None, TOKENS[:32], medium="DISK")]), 0)
    assert (res.events, res.stored_blocks, res.decode_errors) == (1, 2, 0)
    res = ix.apply(b, MODEL, batch([stored(KEYS[2:], KEYS[1], TOKENS[32:], medium="GPU")]), 1)
    assert (res.events, res.stored_blocks, res.decode_errors) == (1, 2, 0)
    assert matched(ix, b) == 4
    score = ix.score(MODEL, TOKENS, pods=[b]).scores[0]
    assert score.score == pytest.approx(2 * 0.8 + 2 * 1.0)  # DISK weighs like CPU
    state = ix.pod_state(b)
    assert state is not None and state.tiers_refused == 0
    assert {t: n for t, n in state.blocks_by_tier.items() if n} == {"DISK": 2, "GPU": 2}
    # a custom name of B's own is not affected by A's refusals
    ix.add_blocks(b, MODEL, KEYS[:1], "junk-10.0.0.66:8000-7")
    ix.close()


@pytest.mark.parametrize("medium", REAL_MEDIA)
def test_every_real_medium_works_after_a_flood(medium: str) -> None:
    ix = new_indexer()
    for p in range(10):
        junk(ix, f"10.0.1.{p}:8000", 6)
    res = ix.apply("real", MODEL, batch([stored(KEYS, None, TOKENS, medium=medium)]), 0)
    assert (res.stored_blocks, res.decode_errors) == (4, 0)
    assert ix.lookup(MODEL, KEYS[:1], pods=["real"]) == [[("real", medium.upper())]]
    res = ix.apply("real", MODEL, batch([removed(KEYS[3:], medium=medium)]), 1)
    assert res.removed_blocks == 1
    assert matched(ix, "real") == 3
    ix.close()


def test_junk_slots_are_reclaimed_after_the_pod_is_cleared() -> None:
    ix = new_indexer()
    for p in range(4):
        junk(ix, f"junk{p}", 4)
    names = ix.lookup(MODEL, KEYS[:1])[0]
    assert len({t for _, t in names}) >= 9  # every slot custom names may take is used
    refused = counter(ix, "tiers_refused")
    res = ix.apply("new", MODEL, batch([stored(KEYS[:1], None, TOKENS[:16], medium="LocalDiskBackend")]), 0)
    assert (res.stored_blocks, counter(ix, "tiers_refused")) == (0, refused + 1)
    for p in range(4):
        ix.apply(f"junk{p}", MODEL, batch([cleared()]), 100)
    res = ix.apply("new", MODEL, batch([stored(KEYS[:1], None, TOKENS[:16], medium="LocalDiskBackend")]), 1)
    assert (res.stored_blocks, res.decode_errors) == (1, 0)
    assert ix.lookup(MODEL, KEYS[:1]) == [[("new", "LOCALDISKBACKEND")]]
    # the cleared junk pods may use (new) names again, within their limit
    junk(ix, "junk0", 5, seq0=200)
    state = ix.pod_state("junk0")
    assert state is not None
    assert len([t for t, n in state.blocks_by_tier.items() if n]) == 4
    ix.close()
