"""The Rust/Python boundary: result types, exceptions, GIL release, and the stub."""

from __future__ import annotations

import inspect
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest

import kvindex_service
from kvindex_service import (
    ApplyResult,
    ClosedError,
    Indexer,
    IndexStats,
    InvalidInputError,
    KvIndexError,
    PodScore,
    PodState,
    ScoreResult,
    ThreadStartError,
    TokenProcessor,
    _native,
    index_defaults,
)

REPO = Path(__file__).resolve().parents[2]


def test_package_reexports_native() -> None:
    assert set(kvindex_service.__all__) == set(_native.__all__)
    for name in _native.__all__:
        assert getattr(kvindex_service, name) is getattr(_native, name)
    assert isinstance(_native.__version__, str) and _native.__version__


def _results() -> dict[str, Any]:
    ix = Indexer(shards=1)
    keys = ix.block_keys(list(range(32)))
    payload = msgpack.packb([1.0, [["BlockStored", keys, None, list(range(32)), 16]], 0])
    applied = ix.apply("p", "m", payload, 0)
    score = ix.score("m", list(range(32)))
    out = {
        "ApplyResult": applied,
        "ScoreResult": score,
        "PodScore": score.scores[0],
        "PodState": ix.pod_state("p"),
        "IndexStats": ix.stats(),
    }
    ix.close()
    return out


def test_result_types_are_the_stub_classes() -> None:
    res = _results()
    assert type(res["ApplyResult"]) is ApplyResult
    assert type(res["ScoreResult"]) is ScoreResult
    assert type(res["PodScore"]) is PodScore
    assert type(res["PodState"]) is PodState
    assert type(res["IndexStats"]) is IndexStats
    score = res["ScoreResult"]
    assert type(score.best()) is PodScore
    assert isinstance(score.scores, list)
    pod_score = res["PodScore"]
    assert isinstance(pod_score.tier_blocks, dict) and isinstance(pod_score.score, float)
    assert isinstance(res["PodState"].models, list)
    assert isinstance(res["PodState"].blocks_by_tier, dict)


@pytest.mark.parametrize(
    ("kind", "attr"),
    [
        ("ApplyResult", "events"),
        ("ScoreResult", "total_blocks"),
        ("ScoreResult", "scores"),
        ("PodScore", "pod"),
        ("PodScore", "score"),
        ("PodScore", "tier_blocks"),
        ("PodState", "last_seq"),
        ("PodState", "blocks_by_tier"),
        ("IndexStats", "keys"),
    ],
)
def test_result_attributes_are_read_only(kind: str, attr: str) -> None:
    obj = _results()[kind]
    before = getattr(obj, attr)
    with pytest.raises(AttributeError):
        setattr(obj, attr, before)
    with pytest.raises(AttributeError):
        obj.brand_new_attribute = 1


def test_returned_containers_are_copies() -> None:
    score = _results()["ScoreResult"]
    first = score.scores[0]
    first.tier_blocks["GPU"] = 999
    score.scores.clear()
    assert score.scores[0].tier_blocks["GPU"] == 2
    assert score.best() is not None


@pytest.mark.parametrize("cls", [ApplyResult, ScoreResult, PodScore, PodState, IndexStats])
def test_result_classes_are_not_constructible(cls: type) -> None:
    with pytest.raises(TypeError):
        cls()


@pytest.mark.parametrize("cls", [Indexer, TokenProcessor, PodScore])
def test_final_classes_cannot_be_subclassed(cls: type) -> None:
    with pytest.raises(TypeError):
        type("Sub", (cls,), {})


def test_exception_hierarchy() -> None:
    assert issubclass(KvIndexError, Exception)
    assert issubclass(InvalidInputError, KvIndexError)
    assert issubclass(InvalidInputError, ValueError)
    assert issubclass(ClosedError, KvIndexError)
    assert issubclass(ClosedError, RuntimeError)
    assert not issubclass(ClosedError, ValueError)
    assert not issubclass(InvalidInputError, RuntimeError)
    assert issubclass(ThreadStartError, KvIndexError)
    assert issubclass(ThreadStartError, RuntimeError)
    assert not issubclass(ThreadStartError, ValueError)
    with pytest.raises(ValueError):
        TokenProcessor(0)
    with pytest.raises(KvIndexError):
        Indexer(algorithm="nope")


def test_closed_indexer() -> None:
    ix = Indexer(shards=2)
    ix.add_blocks("p", "m", [1])
    payload = msgpack.packb([1.0, [["AllBlocksCleared"]], 0])
    assert ix.submit("p", "m", 0, payload) is True
    ix.close()
    # What was queued before close() was applied.
    assert ix.lookup("m", [1]) == [[]]
    with pytest.raises(ClosedError) as info:
        ix.submit("p", "m", 1, payload)
    assert isinstance(info.value, RuntimeError) and str(info.value)
    with pytest.raises(ClosedError):
        ix.clear_pod("p")
    with pytest.raises(ClosedError):
        ix.remove_pod("p")
    ix.close()  # idempotent
    assert ix.flush(1.0) is True  # nothing can be pending
    assert ix.score_keys("m", [1]).scores == []  # reads still answer


def test_properties() -> None:
    ix = Indexer(block_size=32, hash_seed="s", algorithm="xxh3", shards=3)
    assert (ix.block_size, ix.hash_seed, ix.algorithm, ix.shards) == (32, "s", "xxh3", 3)
    tp = ix.token_processor()
    assert type(tp) is TokenProcessor
    assert (tp.block_size, tp.hash_seed, tp.algorithm) == (32, "s", "xxh3")
    assert tp.block_keys(list(range(64))) == ix.block_keys(list(range(64)))
    assert Indexer().shards >= 1  # 0 means one per core
    ix.close()


def test_index_defaults_are_the_signature_defaults() -> None:
    defaults = index_defaults()
    assert defaults is not index_defaults()  # a fresh dict each call
    params = inspect.signature(Indexer).parameters
    assert set(defaults) == set(params)
    for name, value in defaults.items():
        if name != "tier_weights":
            assert params[name].default == value, name
    assert params["tier_weights"].default is None
    assert defaults["tier_weights"] == {"GPU": 1.0, "CPU": 0.8}
    tp = inspect.signature(TokenProcessor).parameters
    assert (tp["block_size"].default, tp["algorithm"].default) == (defaults["block_size"], defaults["algorithm"])
    ix = Indexer(**defaults)
    assert (ix.block_size, ix.algorithm, ix.hash_seed) == (16, "sha256_cbor", None)
    ix.close()


def test_service_settings_take_the_core_defaults() -> None:
    from kvindex_service.config import IndexSettings

    s = IndexSettings()
    d = index_defaults()
    got = (s.block_size, s.hash_seed, s.hash_algo, s.max_keys, s.max_pods_per_key, s.shards, s.queue_capacity)
    assert got == (
        d["block_size"],
        d["hash_seed"],
        d["algorithm"],
        d["max_keys"],
        d["max_pods_per_key"],
        d["shards"],
        d["queue_capacity"],
    )
    assert (s.tier_weights, s.key_memo) == (d["tier_weights"], d["key_memo"])
    s.tier_weights["GPU"] = 0.0  # each settings object owns its dict
    assert IndexSettings().tier_weights["GPU"] == 1.0


def test_bad_tier_weights() -> None:
    for weights in ({"GPU": -1.0}, {"GPU": float("nan")}, {"CPU": float("inf")}):
        with pytest.raises(ValueError):
            Indexer(tier_weights=weights)
    with pytest.raises((TypeError, ValueError)):
        Indexer(tier_weights={"GPU": "heavy"})  # type: ignore[dict-item]


# -- the GIL --------------------------------------------------------------------------------


def _progress_rate(call: Callable[[], object]) -> float:
    """Loop iterations per second a Python thread manages while `call` runs in this one."""
    counter = [0]
    stop = threading.Event()

    def spin() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            counter[0] = n

    t = threading.Thread(target=spin)
    t.start()
    try:
        while counter[0] < 1000:  # the spinner is running
            time.sleep(0.001)
        c0 = counter[0]
        t0 = time.perf_counter()
        call()
        elapsed = time.perf_counter() - t0
        c1 = counter[0]
    finally:
        stop.set()
        t.join()
    return (c1 - c0) / max(elapsed, 1e-9)


@pytest.mark.parametrize("what", ["block_keys", "apply"])
def test_gil_released_during_long_calls(what: str) -> None:
    """A Python thread keeps running while the core hashes: far faster than during a call of
    similar length that holds the GIL (sorting a list). A ratio of two rates measured side by
    side, so machine speed and load cancel out; best of three to ride out scheduler noise."""
    tokens = list(range(2_000_000))
    tp = TokenProcessor(16)
    ix = Indexer(shards=1, max_keys=1 << 20)
    keys = tp.block_keys(tokens[:400_000])
    payload = msgpack.packb([1.0, [["BlockStored", keys, None, tokens[:400_000], 16]], 0])
    native: Callable[[], object]
    if what == "block_keys":
        native = lambda: tp.block_keys(tokens)  # noqa: E731
    else:
        native = lambda: ix.apply("p", "m", payload)  # noqa: E731
    rng = random.Random(0)
    data = [rng.random() for _ in range(600_000)]
    ratios = []
    for _ in range(3):
        released = _progress_rate(native)
        held = _progress_rate(lambda: sorted(data))
        ratios.append(released / max(held, 1.0))
        if ratios[-1] > 4:
            break
    assert max(ratios) > 4, ratios
    if what == "apply":
        assert ix.stats().keys == len(keys)
    ix.close()


# -- the stub -------------------------------------------------------------------------------


def test_stubtest_passes() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "kvindex_service._native"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
