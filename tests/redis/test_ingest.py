"""The write path into Redis: vLLM's real event batches (six versions), decoded by the core
(``RecordDecoder``), applied in one script call per batch, must leave the shared index scoring
exactly like the in-memory index after every message — and like vLLM's own expectations."""

from __future__ import annotations

from typing import Any

import msgpack

from kvindex_service._native import Indexer, RecordDecoder
from kvindex_service.backends import parse_backend
from kvindex_service.backends.redis_index import RedisIndex


def _pair(capture: dict[str, Any], redis_url: str, **kw: Any) -> tuple[Indexer, RedisIndex]:
    seed, algo = capture["pythonhashseed"], capture["hash_algo"]
    url = parse_backend(redis_url)
    assert url is not None
    mem = Indexer(hash_seed=seed, algorithm=algo, shards=1, block_size=capture["block_size"])
    rx = RedisIndex(url, hash_seed=seed, algorithm=algo, block_size=capture["block_size"], timeout=5.0, **kw)
    return mem, rx


def _table(r: Any) -> list[tuple[str, int, float, dict[str, int]]]:
    return [(s.pod, s.matched_blocks, round(s.score, 9), dict(s.tier_blocks)) for s in r.scores]


def test_vllm_captures_score_like_the_memory_index(vllm_capture: dict[str, Any], redis_url: str) -> None:
    mem, rx = _pair(vllm_capture, redis_url)
    model = vllm_capture["model"]
    pods = sorted({m["pod"] for m in vllm_capture["messages"]})
    for msg in vllm_capture["messages"]:
        _topic, seq, payload = msg["frames"]
        mem.apply(msg["pod"], model, payload)
        counts = rx.apply_batch(msg["pod"], model, payload)
        assert counts["decode_errors"] == 0
        for name, toks in vllm_capture["prompts"].items():
            want = _table(mem.score(model, toks, pods=pods))
            assert _table(rx.score(model, toks, pods=pods)) == want, (msg["seq"], name)
            for pod, expect in msg["expect_after"].items():
                got = {s.pod: s.matched_blocks for s in rx.score(model, toks, pods=pods).scores}
                assert got[pod] == expect[name]
    mem.close()
    rx.close()


def _batch(*events: list[Any]) -> bytes:
    return bytes(msgpack.packb([1.0, list(events), 0]))


def test_parents_removals_and_offloads_resolve_through_engine_hashes(redis_url: str) -> None:
    """Engine hashes that are not ours (another algorithm): the decoder bridges them."""
    toks = list(range(100, 148))  # 3 blocks
    mem, rx = _pair({"pythonhashseed": "42", "hash_algo": "sha256_cbor", "block_size": 16}, redis_url)
    batches = [
        _batch(["BlockStored", [901, 902], None, toks[:32], 16, None, "GPU"]),
        _batch(["BlockStored", [903], 902, toks[32:], 16, None, "GPU"]),  # parent by engine hash
        _batch(["BlockStored", [901, 902, 903], None, [], 16, None, "CPU"]),  # token-less offload
        _batch(["BlockRemoved", [902], "GPU"]),
    ]
    for b in batches:
        mem.apply("p", "m", b)
        rx.apply_batch("p", "m", b)
        assert _table(rx.score("m", toks)) == _table(mem.score("m", toks))
    assert _table(rx.score("m", toks)) == [("p", 3, 2.8, {"GPU": 1, "CPU": 3})]
    # AllBlocksCleared inside a batch, between stores
    b = _batch(["AllBlocksCleared"], ["BlockStored", [904], None, toks[:16], 16, None, None])
    mem.apply("p", "m", b)
    rx.apply_batch("p", "m", b)
    assert _table(rx.score("m", toks)) == _table(mem.score("m", toks)) == [("p", 1, 1.0, {"GPU": 1})]
    # an unknown parent is counted, never guessed
    r = rx.apply_batch("q", "m", _batch(["BlockStored", [905], 777, toks[16:32], 16, None, None]))
    assert r["unknown_parents"] == 1 and r["added"] == 0


def test_garbage_is_counted_not_raised() -> None:
    d = RecordDecoder()
    assert d.decode("m", b"\xc1not msgpack")[1]["decode_errors"] == 1
    records, counts = d.decode("m", _batch(["Nope", 1], ["BlockStored", "x"], ["AllBlocksCleared"]))
    assert records == [("clear", "", [])]
    assert (counts["unknown_event_types"], counts["decode_errors"], counts["events"]) == (1, 1, 1)


def test_the_decoder_memory_is_bounded() -> None:
    d = RecordDecoder(max_known=10)
    for i in range(50):
        d.decode("m", _batch(["BlockStored", [i], None, list(range(16)), 16, None, None]))
    assert d.known <= 10


def test_one_round_trip_per_batch_and_per_score(redis_url: str) -> None:
    """Counted by the server itself (INFO commandstats): a batch is one EVALSHA, a score is one
    EVALSHA, whatever the number of blocks."""
    import redis as redis_py

    mem, rx = _pair({"pythonhashseed": "42", "hash_algo": "sha256_cbor", "block_size": 16}, redis_url)
    toks = list(range(1000, 1512))  # 32 blocks
    keys = mem.block_keys(toks)
    rx.apply_batch("p", "m", _batch(["BlockStored", keys[:16], None, toks[:256], 16, None, None]))  # registers p
    url = parse_backend(redis_url)
    assert url is not None
    admin = redis_py.Redis(host=url.host, port=url.port)
    rx.score("m", toks)  # loads the lookup script (a first EVALSHA answers NOSCRIPT)
    admin.config_resetstat()
    rx.apply_batch("p", "m", _batch(["BlockStored", keys[16:], keys[15], toks[256:], 16, None, None]))
    rx.score("m", toks)
    stats = admin.info("commandstats")
    used = {
        k.removeprefix("cmdstat_"): v["calls"]
        for k, v in stats.items()
        if not k.startswith(("cmdstat_config", "cmdstat_info"))
    }
    # commandstats also counts the commands the scripts run; every other one would be a round trip
    in_scripts = {"hexists", "hlen", "hset", "sadd", "pexpire", "hkeys"}
    assert used.pop("evalsha") == 2 and set(used) <= in_scripts, used
    assert rx.score("m", toks).scores[0].matched_blocks == 32
    admin.close()
    rx.close()
    mem.close()
