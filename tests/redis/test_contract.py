"""One ``BlockIndex`` contract, run against both backends: the in-process core (``memory``) and
Redis on a real redis-server, single node and as a (one-node) cluster. Every assertion holds for both, so a replica answers the same
whichever backend it uses."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from kvindex_service._native import Indexer
from kvindex_service.backends import BlockIndex, MemoryIndex, parse_backend
from kvindex_service.backends.redis_index import RedisIndex

MODEL = "m"
CAP = 4


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
def index(request: pytest.FixtureRequest) -> Iterator[BlockIndex]:
    if request.param == "memory":
        ix = Indexer(hash_seed="42", shards=1, max_pods_per_key=CAP)
        yield MemoryIndex(ix, max_pods_per_key=CAP)
        ix.close()
        return
    fixture = "redis_url" if request.param == "redis" else "redis_cluster_url"
    url = parse_backend(request.getfixturevalue(fixture))
    assert url is not None
    rx = RedisIndex(url, hash_seed="42", max_pods_per_key=CAP, timeout=5.0)
    yield rx
    rx.close()


def tokens(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 128_000) for _ in range(n)]


def keys_of(index: BlockIndex, toks: list[int]) -> list[int]:
    return Indexer(hash_seed="42", shards=1).block_keys(toks)


def table(
    index: BlockIndex, toks: list[int], pods: list[str] | None = None
) -> list[tuple[str, int, float, dict[str, int]]]:
    r = index.score(MODEL, toks, pods=pods)
    return [(s.pod, s.matched_blocks, round(s.score, 9), dict(s.tier_blocks)) for s in r.scores]


def test_add_lookup_and_longest_prefix(index: BlockIndex) -> None:
    t = tokens(80)  # 5 full blocks
    k = keys_of(index, t)
    index.add("a", MODEL, k[:3])
    index.add("b", MODEL, k[:5])
    index.add("c", MODEL, k[1:5])  # no block 0: no prefix
    assert table(index, t) == [("b", 5, 5.0, {"GPU": 5}), ("a", 3, 3.0, {"GPU": 3})]
    assert sorted(index.lookup(MODEL, k[:1])[0]) == [("a", "GPU"), ("b", "GPU")]
    assert index.lookup(MODEL, [12345]) == [[]]
    # candidates: every one listed, zeros included; the partial trailing block never counts
    r = index.score(MODEL, t + [1, 2, 3], pods=["c", "a", "zz"])
    assert (r.total_blocks, r.total_tokens) == (5, 83)
    assert [(s.pod, s.matched_blocks) for s in r.scores] == [("a", 3), ("c", 0), ("zz", 0)]
    # another model is another key space
    assert index.score("other", t).scores == []


def test_adds_and_removes_are_idempotent_per_tier(index: BlockIndex) -> None:
    t = tokens(48, 1)
    k = keys_of(index, t)
    for _ in range(3):  # several replicas ingesting the same stream
        index.add("a", MODEL, k, "GPU")
        index.add("a", MODEL, k, "cpu")
    assert sorted(index.lookup(MODEL, k[:1])[0]) == [("a", "CPU"), ("a", "GPU")]
    assert table(index, t) == [("a", 3, 3.0, {"GPU": 3, "CPU": 3})]
    index.remove("a", MODEL, k[1:2], "GPU")
    index.remove("a", MODEL, k[1:2], "GPU")
    # block 1 only on CPU: the run goes on at CPU weight
    assert table(index, t) == [("a", 3, 2.8, {"GPU": 1, "CPU": 3})]
    index.remove("a", MODEL, k, "CPU")
    assert table(index, t) == [("a", 1, 1.0, {"GPU": 1})]


def test_clear_pod_keeps_other_pods(index: BlockIndex) -> None:
    t = tokens(64, 2)
    k = keys_of(index, t)
    index.add("a", MODEL, k)
    index.add("a", "other", k)
    index.add("b", MODEL, k[:2], "CPU")
    index.clear_pod("a")
    assert table(index, t) == [("b", 2, 1.6, {"CPU": 2})]
    assert index.score("other", t).scores == []
    index.add("a", MODEL, k[:1])  # a cleared pod stores again
    assert [s.pod for s in index.score(MODEL, t).scores] == ["b", "a"]
    index.remove_pod("b")
    assert table(index, t) == [("a", 1, 1.0, {"GPU": 1})]


def test_a_key_holds_at_most_max_pods_per_key_entries(index: BlockIndex) -> None:
    t = tokens(16, 3)
    k = keys_of(index, t)
    for i in range(CAP + 3):
        index.add(f"p{i}", MODEL, k)
    held = index.lookup(MODEL, k)[0]
    assert len(held) == CAP == index.max_pods_per_key


def test_stats_count_pods(index: BlockIndex) -> None:
    t = tokens(32, 4)
    k = keys_of(index, t)
    index.add("a", MODEL, k)
    index.add("b", MODEL, k)
    assert index.stats()["pods"] == 2
    index.remove_pod("a")
    assert index.stats()["pods"] == 1


def test_random_operations_agree_with_a_reference(index: BlockIndex) -> None:
    """Random adds/removes/clears; the scores equal a pure-Python oracle of the prefix rule."""
    rng = random.Random(7)
    prompts = [tokens(96, 10 + i) for i in range(3)]
    keys = [keys_of(index, p) for p in prompts]
    held: dict[tuple[str, int], set[str]] = {}  # (pod, key) -> tiers
    pods, tiers = ["a", "b", "c"], ["GPU", "CPU"]
    for _ in range(60):
        op, pod, tier = rng.random(), rng.choice(pods), rng.choice(tiers)
        ks = rng.choice(keys)[: rng.randint(1, 6)]
        if op < 0.6:
            index.add(pod, MODEL, ks, tier)
            for x in ks:
                held.setdefault((pod, x), set()).add(tier)
        elif op < 0.9:
            index.remove(pod, MODEL, ks, tier)
            for x in ks:
                held.get((pod, x), set()).discard(tier)
        else:
            index.clear_pod(pod)
            held = {pk: v for pk, v in held.items() if pk[0] != pod}
    weight = {"GPU": 1.0, "CPU": 0.8}
    for p, ks in zip(prompts, keys, strict=True):
        want = {}
        for pod in pods:
            n, score = 0, 0.0
            for x in ks:
                ts = held.get((pod, x))
                if not ts:
                    break
                n += 1
                score += max(weight[t] for t in ts)
            if n:
                want[pod] = (n, round(score, 9))
        got = {s.pod: (s.matched_blocks, round(s.score, 9)) for s in index.score(MODEL, p).scores}
        assert got == want
