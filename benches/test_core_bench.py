"""The core's criterion cases (benches/core.rs), run through the Python binding so the FFI
cost shows: hashing, index add/remove, score latency at 1M and 10M entries over 64 pods."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

import pytest

from benches.conftest import write_result
from kvindex_service import ALGORITHMS, Indexer, TokenProcessor

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
PODS = [f"10.0.{i // 256}.{i % 256}:8000" for i in range(64)]


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(128_000) for _ in range(n)]


QUERY = _tokens(32_768, 11)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_hashing_8k(benchmark, algorithm: str) -> None:
    tp = TokenProcessor(16, None, algorithm)
    toks = _tokens(8192, 1)
    benchmark(tp.block_keys, toks)
    blocks_per_s = 512 / benchmark.stats.stats.median
    write_result("core", {f"hashing_8k/{algorithm}/blocks_per_s": blocks_per_s})


def test_index_add_remove_100k(benchmark) -> None:
    ix = Indexer(max_keys=1 << 22)
    rng = random.Random(3)
    keys = [rng.getrandbits(64) for _ in range(100_000)]

    def run() -> None:
        ix.add_blocks(PODS[0], MODEL, keys)
        ix.remove_blocks(PODS[0], MODEL, keys)

    benchmark(run)
    write_result("core", {"index_add_remove_100k/entries_per_s": 200_000 / benchmark.stats.stats.median})
    ix.close()


def _populate(entries: int, algorithm: str) -> tuple[Indexer, float]:
    ix = Indexer(max_keys=entries, algorithm=algorithm)
    rng = random.Random(7)
    per_key = 8
    batches: list[list[int]] = [[] for _ in PODS]
    for _ in range(entries // per_key):
        k = rng.getrandbits(64)
        first = rng.randrange(len(PODS))
        for j in range(per_key):
            batches[(first + j * 7) % len(PODS)].append(k)
    t0 = time.perf_counter()
    for pod, keys in zip(PODS, batches):
        ix.add_blocks(pod, MODEL, keys)
    add_rate = entries / (time.perf_counter() - t0)
    qk = ix.block_keys(QUERY)
    ix.add_blocks(PODS[0], MODEL, qk)
    for p in range(1, 8):
        ix.add_blocks(PODS[p], MODEL, qk[: len(qk) * p // 8])
    return ix, add_rate


@pytest.fixture(scope="module", params=[1_000_000, 10_000_000], ids=["1M", "10M"])
def populated(request: pytest.FixtureRequest) -> Iterator[tuple[int, dict[str, Indexer]]]:
    entries = request.param
    built: dict[str, Indexer] = {}
    for algorithm in ("sha256_cbor", "xxh3"):
        ix, rate = _populate(entries, algorithm)
        st = ix.stats()
        write_result(
            "core",
            {
                f"populate_{entries // 1_000_000}M/{algorithm}/entries_per_s": rate,
                f"memory_{entries // 1_000_000}M/{algorithm}/bytes_per_entry": st.bytes_used / st.entries,
            },
        )
        built[algorithm] = ix
    yield entries, built
    for ix in built.values():
        ix.close()


@pytest.mark.parametrize("algorithm", ["sha256_cbor", "xxh3"])
@pytest.mark.parametrize("length", [1024, 8192, 32_768])
def test_score(benchmark, populated, algorithm: str, length: int) -> None:
    entries, built = populated
    ix = built[algorithm]
    q = QUERY[:length]
    res = benchmark(ix.score, MODEL, q)
    assert res.scores[0].matched_blocks == length // 16  # pod 0 holds the whole prompt
    write_result(
        "core",
        {f"score_{length}tok_{entries // 1_000_000}M/{algorithm}/median_us": benchmark.stats.stats.median * 1e6},
    )
