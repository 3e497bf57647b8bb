"""Event application: vLLM's real captures, hand-built msgpack batches, malformed input."""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvindex_service import Indexer, TokenProcessor
from tests.conftest import VLLM_VERSIONS, load_vllm_capture
from tests.native.reference import RefIndex, RefTokenProcessor, assert_same_scores

SEED = "42"
MODEL = "org/model@rev-1"  # '@' in a model name is legal: topics split on the first two only
TOKENS = list(range(1000, 1064))  # four full blocks of 16
TP = TokenProcessor(16, SEED)
KEYS = TP.block_keys(TOKENS)


# -- msgpack construction -------------------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """Pre-encoded msgpack bytes, spliced as-is (to force an integer width or sign)."""

    data: bytes


def enc(obj: Any) -> bytes:
    """msgpack-encode `obj`, honouring `Raw` anywhere inside lists and dicts."""
    if isinstance(obj, Raw):
        return obj.data
    if isinstance(obj, list | tuple):
        n = len(obj)
        head = bytes([0x90 | n]) if n < 16 else b"\xdc" + struct.pack(">H", n)
        return head + b"".join(enc(x) for x in obj)
    if isinstance(obj, dict):
        n = len(obj)
        head = bytes([0x80 | n]) if n < 16 else b"\xde" + struct.pack(">H", n)
        return head + b"".join(enc(k) + enc(v) for k, v in obj.items())
    return msgpack.packb(obj)


INT_FORMS = {
    "fixint": (0, 127, lambda v: bytes([v])),
    "negfixint": (-32, -1, lambda v: struct.pack(">b", v)),
    "uint8": (0, 2**8 - 1, lambda v: b"\xcc" + struct.pack(">B", v)),
    "uint16": (0, 2**16 - 1, lambda v: b"\xcd" + struct.pack(">H", v)),
    "uint32": (0, 2**32 - 1, lambda v: b"\xce" + struct.pack(">I", v)),
    "uint64": (0, 2**64 - 1, lambda v: b"\xcf" + struct.pack(">Q", v)),
    "int8": (-(2**7), 2**7 - 1, lambda v: b"\xd0" + struct.pack(">b", v)),
    "int16": (-(2**15), 2**15 - 1, lambda v: b"\xd1" + struct.pack(">h", v)),
    "int32": (-(2**31), 2**31 - 1, lambda v: b"\xd2" + struct.pack(">i", v)),
    "int64": (-(2**63), 2**63 - 1, lambda v: b"\xd3" + struct.pack(">q", v)),
}


def int_as(value: int, form: str) -> Raw:
    lo, hi, pack = INT_FORMS[form]
    assert lo <= value <= hi, (value, form)
    return Raw(pack(value))


def stored(
    hashes: list[Any],
    parent: Any,
    tokens: list[int],
    *,
    block_size: int = 16,
    medium: str | None = None,
    lora_name: str | None = None,
    extra_keys: list[Any] | None = None,
    as_map: bool = False,
) -> Any:
    """A BlockStored event, array form (<= 0.23, trailing defaults dropped) or map form."""
    if as_map:
        event: dict[str, Any] = {
            "type": "BlockStored",
            "block_hashes": hashes,
            "parent_block_hash": parent,
            "token_ids": tokens,
            "block_size": block_size,
        }
        optional = {"medium": medium, "lora_name": lora_name, "extra_keys": extra_keys}
        event.update({k: v for k, v in optional.items() if v is not None})
        return event
    fields = [hashes, parent, tokens, block_size, None, medium, lora_name, extra_keys]
    while len(fields) > 4 and fields[-1] is None:
        fields.pop()
    return ["BlockStored", *fields]


def removed(hashes: list[Any], medium: str | None = None, *, as_map: bool = False) -> Any:
    if as_map:
        event: dict[str, Any] = {"type": "BlockRemoved", "block_hashes": hashes}
        if medium is not None:
            event["medium"] = medium
        return event
    return ["BlockRemoved", hashes] + ([medium] if medium is not None else [])


def cleared(*, as_map: bool = False) -> Any:
    return {"type": "AllBlocksCleared"} if as_map else ["AllBlocksCleared"]


def batch(events: list[Any], dp_rank: int | None = 0, ts: float = 1.7e9) -> bytes:
    return enc([ts, events, dp_rank])


def matched(ix: Indexer, pod: str, tokens: list[int] = TOKENS, **kw: Any) -> int:
    res = ix.score(MODEL, tokens, pods=[pod], **kw)
    assert [s.pod for s in res.scores] == [pod]
    return res.scores[0].matched_blocks


def new_indexer(**kw: Any) -> Indexer:
    kw.setdefault("hash_seed", SEED)
    kw.setdefault("shards", 2)
    return Indexer(**kw)


# -- the real captures --------------------------------------------------------------------------


def split_topic(topic: bytes) -> tuple[str, str]:
    prefix, pod, model = topic.decode().split("@", 2)
    assert prefix == "kv"
    return pod, model


def apply_to_ref(ref: RefIndex, pod: str, model: str, decoded: list[Any]) -> None:
    """The capture's decoded events, applied to the dict model (engine hashes == keys here)."""
    for ev in decoded[1]:
        fields: dict[str, Any]
        if isinstance(ev, dict):
            kind, fields = ev["type"], ev
        else:
            kind = ev[0]
            names = {
                "BlockStored": ["block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium"],
                "BlockRemoved": ["block_hashes", "medium"],
                "AllBlocksCleared": [],
            }[kind]
            fields = dict(zip(names, ev[1:], strict=False))
        tier = fields.get("medium") or "GPU"
        if kind == "BlockStored":
            ref.add_blocks(pod, model, fields["block_hashes"], tier)
        elif kind == "BlockRemoved":
            ref.remove_blocks(pod, model, fields["block_hashes"], tier)
        else:
            ref.clear_pod(pod)


def capture_indexer(cap: dict[str, Any]) -> Indexer:
    return Indexer(
        block_size=cap["block_size"],
        hash_seed=cap["pythonhashseed"],
        algorithm=cap["hash_algo"],
        shards=2,
    )


def check_expectations(ix: Indexer, cap: dict[str, Any], msg: dict[str, Any]) -> None:
    for pod, per_prompt in msg["expect_after"].items():
        for prompt, blocks in per_prompt.items():
            res = ix.score(cap["model"], cap["prompts"][prompt], pods=[pod])
            assert res.scores[0].matched_blocks == blocks, (msg["seq"], pod, prompt)


def check_final_pod_states(ix: Indexer, cap: dict[str, Any], ref: RefIndex) -> None:
    msgs_by_pod: dict[str, list[dict[str, Any]]] = {}
    for msg in cap["messages"]:
        msgs_by_pod.setdefault(msg["pod"], []).append(msg)
    assert {s.pod for s in ix.pod_states()} == set(msgs_by_pod)
    for pod, msgs in msgs_by_pod.items():
        state = ix.pod_state(pod)
        assert state is not None
        assert state.models == [cap["model"]]
        assert state.last_seq == msgs[-1]["seq"]
        assert state.dp_rank == msgs[-1]["decoded"][2]
        assert state.last_event_ts == pytest.approx(msgs[-1]["decoded"][0])
        assert state.batches_applied == len(msgs)
        assert state.events_applied == sum(len(m["decoded"][1]) for m in msgs)
        assert (state.decode_errors, state.unknown_event_types, state.unknown_parents) == (0, 0, 0)
        assert state.hashes_match is True and state.hash_mismatches == 0
        assert state.hash_matches > 0 and state.bridge_entries == 0
        assert {t: n for t, n in state.blocks_by_tier.items() if n} == ref.blocks_by_tier(pod)
    for prompt in cap["prompts"].values():
        tp = TokenProcessor(cap["block_size"], cap["pythonhashseed"], cap["hash_algo"])
        keys = tp.block_keys(prompt)
        pods = sorted(msgs_by_pod)
        assert_same_scores(
            ix.score(cap["model"], prompt, pods=pods),
            ref.score_keys(cap["model"], keys, pods),
            tokens=len(prompt),
        )


def test_capture_through_apply(vllm_capture: dict[str, Any]) -> None:
    cap = vllm_capture
    ix = capture_indexer(cap)
    ref = RefIndex(block_size=cap["block_size"])
    for msg in cap["messages"]:
        topic, seq, payload = msg["frames"]
        pod, model = split_topic(topic)
        assert (pod, model) == (msg["pod"], cap["model"])
        res = ix.apply(pod, model, payload, int.from_bytes(seq, "big"))
        assert res.events == len(msg["decoded"][1])
        assert (res.decode_errors, res.unknown_event_types, res.unknown_parents) == (0, 0, 0)
        assert res.dp_rank == msg["decoded"][2]
        apply_to_ref(ref, pod, model, msg["decoded"])
        check_expectations(ix, cap, msg)
    check_final_pod_states(ix, cap, ref)
    counters = ix.counters()
    assert counters["batches_applied"] == len(cap["messages"])
    assert counters["events_unknown_type"] == 0
    ix.close()


def test_capture_through_submit(vllm_capture: dict[str, Any]) -> None:
    cap = vllm_capture
    ix = capture_indexer(cap)
    ref = RefIndex(block_size=cap["block_size"])
    for msg in cap["messages"]:
        topic, seq, payload = msg["frames"]
        pod, model = split_topic(topic)
        assert ix.submit(pod, model, int.from_bytes(seq, "big"), payload) is True
        assert ix.flush(10.0)
        apply_to_ref(ref, pod, model, msg["decoded"])
        check_expectations(ix, cap, msg)
    check_final_pod_states(ix, cap, ref)
    assert ix.counters()["batches_queued"] == len(cap["messages"])
    ix.close()


def test_capture_submitted_all_at_once(vllm_capture: dict[str, Any]) -> None:
    """Per-pod order holds when everything is queued before a single flush."""
    cap = vllm_capture
    ix = capture_indexer(cap)
    for msg in cap["messages"]:
        topic, seq, payload = msg["frames"]
        pod, model = split_topic(topic)
        ix.submit(pod, model, int.from_bytes(seq, "big"), payload)
    ix.close()  # applies what is queued
    check_expectations(ix, cap, cap["messages"][-1])


def test_concurrent_submitters_and_scorers() -> None:
    """Eight Python threads replay the capture as eight pod pairs through the queue while two
    others score; per-pod order holds and every pair ends in the capture's final state."""
    cap = load_vllm_capture("0.24.0")
    ix = Indexer(block_size=16, hash_seed=cap["pythonhashseed"], shards=3, queue_capacity=4)
    errors: list[BaseException] = []
    stop = threading.Event()

    def submitter(i: int) -> None:
        try:
            for _ in range(5):
                for msg in cap["messages"]:
                    topic, seq, payload = msg["frames"]
                    pod, model = split_topic(topic)
                    ix.submit(f"{pod}#{i}", model, int.from_bytes(seq, "big"), payload)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def scorer() -> None:
        try:
            while not stop.is_set():
                for prompt in cap["prompts"].values():
                    for s in ix.score(cap["model"], prompt).scores:
                        assert 0 < s.matched_blocks <= len(prompt) // 16
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    scorers = [threading.Thread(target=scorer) for _ in range(2)]
    submitters = [threading.Thread(target=submitter, args=(i,)) for i in range(8)]
    for t in scorers + submitters:
        t.start()
    for t in submitters:
        t.join()
    assert ix.flush(30.0)
    stop.set()
    for t in scorers:
        t.join()
    assert not errors, errors
    final = cap["messages"][-1]["expect_after"]
    for i in range(8):
        for pod, per_prompt in final.items():
            for name, blocks in per_prompt.items():
                res = ix.score(cap["model"], cap["prompts"][name], pods=[f"{pod}#{i}"])
                assert res.scores[0].matched_blocks == blocks
    assert ix.counters()["batches_applied"] == 8 * 5 * len(cap["messages"])
    ix.close()


@pytest.mark.parametrize("version", [v for v in VLLM_VERSIONS if v != "0.10.1.1"])
def test_capture_cpu_tier(version: str) -> None:
    cap = load_vllm_capture(version)
    ix = capture_indexer(cap)
    for msg in cap["messages"]:
        topic, seq, payload = msg["frames"]
        ix.apply(*split_topic(topic), payload, int.from_bytes(seq, "big"))
    state = ix.pod_state("10.0.0.1:8000")
    assert state is not None and state.blocks_by_tier.get("CPU", 0) > 0
    # The CPU copy of P1's first two blocks still counts after their GPU copy went away.
    res = ix.score(cap["model"], cap["prompts"]["P1"], pods=["10.0.0.1:8000"]).scores[0]
    assert res.tier_blocks.get("CPU", 0) >= 2
    assert res.score < res.matched_blocks  # CPU blocks weigh less than GPU ones
    ix.close()


# -- hand-built batches ---------------------------------------------------------------------------


@pytest.mark.parametrize("as_map", [False, True], ids=["array", "map"])
def test_store_remove_clear_both_encodings(as_map: bool) -> None:
    ix = new_indexer()
    res = ix.apply("p", MODEL, batch([stored(KEYS[:2], None, TOKENS[:32], as_map=as_map)]), 0)
    assert (res.events, res.stored_blocks) == (1, 2)
    res = ix.apply("p", MODEL, batch([stored(KEYS[2:], KEYS[1], TOKENS[32:], medium="CPU", as_map=as_map)]), 1)
    assert res.stored_blocks == 2
    assert matched(ix, "p") == 4
    assert ix.pod_state("p").blocks_by_tier == {"GPU": 2, "CPU": 2}  # type: ignore[union-attr]
    res = ix.apply("p", MODEL, batch([removed([KEYS[1]], as_map=as_map)]), 2)
    assert res.removed_blocks == 1
    assert matched(ix, "p") == 1
    res = ix.apply("p", MODEL, batch([cleared(as_map=as_map)]), 3)
    assert res.cleared == 1
    assert matched(ix, "p") == 0
    assert ix.stats().entries == 0
    ix.close()


def test_missing_trailing_fields_and_dp_rank() -> None:
    ix = new_indexer()
    # 0.10-style: no medium, no lora fields; payload without the dp-rank element.
    payload = enc([1.0, [["BlockStored", KEYS, None, TOKENS, 16]]])
    res = ix.apply("p", MODEL, payload, 0)
    assert (res.stored_blocks, res.decode_errors, res.dp_rank) == (4, 0, None)
    assert ix.pod_state("p").dp_rank is None  # type: ignore[union-attr]
    res = ix.apply("p", MODEL, batch([["BlockRemoved", [KEYS[3]]]], dp_rank=2), 1)
    assert (res.removed_blocks, res.dp_rank) == (1, 2)
    assert ix.pod_state("p").dp_rank == 2  # type: ignore[union-attr]
    assert matched(ix, "p") == 3
    ix.close()


def test_unknown_fields_and_event_types() -> None:
    ix = new_indexer()
    # lora_name, extra_keys, group_idx, kv_cache_spec_kind, sliding_window, locality, ownership,
    # session_id, lookahead_token_ids, then a field from the future.
    future_array = [
        *stored(KEYS, None, TOKENS, medium="GPU"),
        None,
        None,
        0,
        "full_attention",
        None,
        "local",
        "owned",
        "sess-1",
        [1, 2, 3],
        {"new": "thing"},
    ]
    future_map = {**stored(KEYS, None, TOKENS, as_map=True), "ownership": "x", "zzz": [1, {"a": 2}]}
    events = [
        {"type": "BlockMoved", "block_hashes": KEYS},
        ["SomethingElse", 1, 2, 3],
        future_array,
        future_map,
        {"type": "BlockRemoved", "block_hashes": [KEYS[3]], "medium": "GPU", "locality": "remote", "unknown": None},
    ]
    res = ix.apply("p", MODEL, batch(events), 0)
    assert res.unknown_event_types == 2
    assert res.decode_errors == 0
    assert res.stored_blocks == 8 and res.removed_blocks == 1
    assert matched(ix, "p") == 3
    assert ix.counters()["events_unknown_type"] == 2
    assert ix.pod_state("p").unknown_event_types == 2  # type: ignore[union-attr]
    ix.close()


def test_bad_event_does_not_sink_batch() -> None:
    ix = new_indexer()
    events = [
        ["BlockStored", "not-a-list", None, TOKENS, 16],
        ["BlockStored", KEYS, None, "tokens?", 16],
        {"type": "BlockStored", "block_hashes": KEYS},  # no tokens, no parent: nothing to place
        7,
        None,
        [],
        {"no": "type"},
        stored(KEYS, None, TOKENS),
    ]
    res = ix.apply("p", MODEL, batch(events), 0)
    assert res.stored_blocks == 4
    assert res.decode_errors >= 5
    assert matched(ix, "p") == 4
    ix.close()


HASH_FORMS_SMALL = ["fixint", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64"]


@pytest.mark.parametrize("store_form", HASH_FORMS_SMALL)
@pytest.mark.parametrize("remove_form", ["fixint", "uint64", "int64", "uint16"])
def test_integer_widths_are_one_hash(store_form: str, remove_form: str) -> None:
    """Small engine hashes (not equal to our keys) in every width go through the bridge."""
    ix = new_indexer()
    engine = [11, 22, 33, 44]
    res = ix.apply("p", MODEL, batch([stored([int_as(h, store_form) for h in engine], None, TOKENS)]), 0)
    assert res.stored_blocks == 4
    state = ix.pod_state("p")
    assert state is not None and state.hashes_match is False and state.bridge_entries == 4
    res = ix.apply("p", MODEL, batch([removed([int_as(33, remove_form)])]), 1)
    assert res.removed_blocks == 1
    assert matched(ix, "p") == 2
    # Children by parent hash in yet another width.
    more = TOKENS + list(range(16))
    child = stored([int_as(55, "uint32")], int_as(44, store_form), more[64:])
    ix.apply("p", MODEL, batch([child]), 2)
    assert ix.lookup(MODEL, TP.block_keys(more)[4:])[0] == [("p", "GPU")]
    ix.close()


@pytest.mark.parametrize("signed", [False, True])
def test_real_hashes_signed_or_unsigned(signed: bool) -> None:
    """vLLM 0.10 may send hashes as signed int64: two's complement of the same u64."""
    ix = new_indexer()
    forms = []
    for k in KEYS:
        if signed and k >= 2**63:
            forms.append(int_as(k - 2**64, "int64"))
        elif signed:
            forms.append(int_as(k, "int64"))
        else:
            forms.append(int_as(k, "uint64"))
    ix.apply("p", MODEL, batch([stored(forms, None, TOKENS)]), 0)
    state = ix.pod_state("p")
    assert state is not None and state.hashes_match is True and state.bridge_entries == 0
    assert state.hash_matches == 4
    assert matched(ix, "p") == 4
    # And removal in the other signedness.
    last = KEYS[0]
    if not signed and last >= 2**63:
        other = int_as(last - 2**64, "int64")
    else:
        other = int_as(last, "uint64")
    res = ix.apply("p", MODEL, batch([removed([other])]), 1)
    assert res.removed_blocks == 1 and matched(ix, "p") == 0
    ix.close()


@pytest.mark.parametrize("width", [32, 16])
def test_bin_digests(width: int) -> None:
    """Hashes as msgpack bin (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0): the last 8 bytes count."""
    ix = new_indexer()
    ref = RefTokenProcessor(16, SEED)
    digests = ref.block_digests(TOKENS)
    if width == 32:
        hashes: list[Any] = list(digests)
    else:
        hashes = [b"\xab" * 8 + k.to_bytes(8, "big") for k in KEYS]
    ix.apply("p", MODEL, batch([stored(hashes[:2], None, TOKENS[:32])]), 0)
    ix.apply("p", MODEL, batch([stored(hashes[2:], hashes[1], TOKENS[32:], as_map=True)]), 1)
    state = ix.pod_state("p")
    assert state is not None and state.hashes_match is True and state.bridge_entries == 0
    assert matched(ix, "p") == 4
    # Removal by the integer form of the same hash, then by bin again.
    ix.apply("p", MODEL, batch([removed([KEYS[3]])]), 2)
    assert matched(ix, "p") == 3
    ix.apply("p", MODEL, batch([removed([hashes[0]])]), 3)
    assert matched(ix, "p") == 0
    ix.close()


def test_engine_with_other_seed_goes_through_bridge() -> None:
    ix = new_indexer()
    engine = TokenProcessor(16, "some-other-seed").block_keys(TOKENS)
    assert set(engine).isdisjoint(KEYS)
    ix.apply("p", MODEL, batch([stored(engine[:2], None, TOKENS[:32])]), 0)
    # A child chained on the engine's parent hash still lands on our keys.
    ix.apply("p", MODEL, batch([stored(engine[2:], engine[1], TOKENS[32:])]), 1)
    assert matched(ix, "p") == 4
    assert ix.lookup(MODEL, KEYS) == [[("p", "GPU")]] * 4
    assert ix.lookup(MODEL, engine) == [[]] * 4  # engine hashes are not keys
    state = ix.pod_state("p")
    assert state is not None
    assert state.hashes_match is False and state.hash_mismatches == 4 and state.hash_matches == 0
    assert state.bridge_entries > 0
    # A token-less CPU store (offload copy) resolves through the bridge.
    res = ix.apply("p", MODEL, batch([stored(engine[:3], None, [], medium="CPU")]), 2)
    assert res.stored_blocks == 3
    assert {t for _, t in ix.lookup(MODEL, [KEYS[0]])[0]} == {"GPU", "CPU"}
    # BlockRemoved by engine hash, per tier.
    res = ix.apply("p", MODEL, batch([removed(engine[1:], "GPU")]), 3)
    assert res.removed_blocks == 3
    top = ix.score(MODEL, TOKENS, pods=["p"]).scores[0]
    assert top.matched_blocks == 3  # GPU block 0, CPU blocks 1 and 2
    assert {t: n for t, n in top.tier_blocks.items() if n} == {"GPU": 1, "CPU": 3}
    assert ix.counters()["hash_mismatches"] >= 4
    ix.close()


def test_unknown_parent_is_counted_not_placed() -> None:
    ix = new_indexer()
    res = ix.apply("p", MODEL, batch([stored(KEYS[2:], 123456789, TOKENS[32:])]), 0)
    assert res.unknown_parents == 1
    assert res.stored_blocks == 0
    assert ix.lookup(MODEL, KEYS) == [[]] * 4
    assert ix.stats().entries == 0
    assert ix.pod_state("p").unknown_parents == 1  # type: ignore[union-attr]
    assert ix.counters()["unknown_parents"] == 1
    # Token-less store whose hashes we never saw: nothing to place either.
    res = ix.apply("p", MODEL, batch([stored([987654321], None, [], medium="CPU")]), 1)
    assert res.stored_blocks == 0
    assert ix.stats().entries == 0
    ix.close()


def test_engine_block_size_differs() -> None:
    """Engine blocks of 32 tokens, index blocks of 16: each engine block is two keys."""
    ix = new_indexer(block_size=16)
    engine = TokenProcessor(32, SEED).block_keys(TOKENS)
    assert len(engine) == 2
    res = ix.apply("p", MODEL, batch([stored(engine, None, TOKENS, block_size=32)]), 0)
    assert res.stored_blocks >= 2
    assert matched(ix, "p") == 4
    assert ix.lookup(MODEL, KEYS) == [[("p", "GPU")]] * 4
    state = ix.pod_state("p")
    assert state is not None and state.hashes_match is False
    res = ix.apply("p", MODEL, batch([removed([engine[1]])]), 1)
    assert matched(ix, "p") == 2
    ix.close()


def test_lora_events_use_lora_key_space() -> None:
    ix = new_indexer()
    lora_keys = TP.block_keys(TOKENS, lora_name="my-adapter")
    ev = stored(lora_keys, None, TOKENS, medium="GPU", lora_name="my-adapter")
    ix.apply("p", MODEL, batch([ev]), 0)
    assert ix.lookup(MODEL, lora_keys) == [[("p", "GPU")]] * 4
    assert matched(ix, "p", lora_name="my-adapter") == 4
    assert matched(ix, "p") == 0
    assert matched(ix, "p", lora_name="other") == 0
    state = ix.pod_state("p")
    assert state is not None and state.hashes_match is True
    ix.close()


def test_extra_keys_cache_salt() -> None:
    ix = new_indexer()
    salted = TP.block_keys(TOKENS, cache_salt="tenant-7")
    extras = [["tenant-7"], None, None, None]
    ix.apply("p", MODEL, batch([stored(salted, None, TOKENS, extra_keys=extras, as_map=True)]), 0)
    assert ix.lookup(MODEL, salted) == [[("p", "GPU")]] * 4
    assert matched(ix, "p", cache_salt="tenant-7") == 4
    assert matched(ix, "p") == 0
    state = ix.pod_state("p")
    assert state is not None and state.hashes_match is True
    # LoRA name and salt together, as vLLM puts them in extra_keys.
    both = TP.block_keys(TOKENS, lora_name="a", cache_salt="s")
    extras2 = [["a", "s"], ["a"], ["a"], ["a"]]
    ix.apply("q", MODEL, batch([stored(both, None, TOKENS, lora_name="a", extra_keys=extras2)]), 0)
    assert matched(ix, "q", lora_name="a", cache_salt="s") == 4
    ix.close()


def test_pods_and_models_are_isolated() -> None:
    ix = new_indexer()
    ix.apply("p", MODEL, batch([stored(KEYS, None, TOKENS)]), 0)
    ix.apply("q", "other-model", batch([stored(KEYS, None, TOKENS)]), 0)
    ix.apply("q", "other-model", batch([cleared()]), 1)
    assert matched(ix, "p") == 4
    ix.apply("p", "other-model", batch([removed(KEYS)]), 1)
    assert matched(ix, "p") == 4
    assert ix.score("other-model", TOKENS).scores == []
    ix.close()


def test_tier_flood_from_network_is_bounded() -> None:
    """Each new medium string would be a new tier; the registry must not grow without bound."""
    ix = new_indexer()
    for i in range(100):
        ix.apply("p", MODEL, batch([stored(KEYS[:1], None, TOKENS[:16], medium=f"TIER-{i}")]), i)
    state = ix.pod_state("p")
    assert state is not None and len(state.blocks_by_tier) <= 16
    assert ix.stats().entries <= 16
    ix.apply("p", MODEL, batch([stored(KEYS, None, TOKENS)]), 100)
    assert matched(ix, "p") == 4  # still works
    ix.close()


# -- malformed payloads -------------------------------------------------------------------------

MALFORMED = {
    "empty": b"",
    "truncated-array": b"\x93",
    "truncated-valid": batch([stored(KEYS, None, TOKENS)])[:-7],
    "huge-array32": b"\xdd\xff\xff\xff\xff",
    "huge-array-inside": b"\x93\xcb" + struct.pack(">d", 1.0) + b"\xdd\xff\xff\xff\xf0\x01",
    "huge-map32": b"\x93\xcb" + struct.pack(">d", 1.0) + b"\x91\xdf\xff\xff\xff\xff",
    "huge-bin32": b"\x93\xcb" + struct.pack(">d", 1.0) + b"\xc6\xff\xff\xff\xff",
    "huge-str32-tokens": enc([1.0, [["BlockStored", [1], None, Raw(b"\xdb\xff\xff\xff\xff")]], 0]),
    "deep-nesting": b"\x91" * 200_000,
    "deep-nesting-in-event": b"\x93\xcb" + struct.pack(">d", 1.0) + b"\x91" * 100_000,
    "reserved-byte": b"\xc1",
    "not-an-array": msgpack.packb({"ts": 1.0, "events": []}),
    "events-not-list": enc([1.0, 5, 0]),
    "one-element": enc([1.0]),
    "wrong-ts": enc(["yesterday", [stored(KEYS, None, TOKENS)], 0]),
    "tokens-out-of-range": enc([1.0, [stored(KEYS, None, [2**40] * 64)], 0]),
    "negative-tokens": enc([1.0, [stored(KEYS, None, [-1] * 64)], 0]),
    "block-size-negative": enc([1.0, [stored(KEYS, None, TOKENS, block_size=-16)], 0]),
    "block-size-huge": enc([1.0, [stored(KEYS, None, TOKENS, block_size=2**40)], 0]),
    "ext-type": b"\x93\xd4\x01\x00\x90\xc0",
}


@pytest.mark.parametrize("payload", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_payload_counted_and_harmless(payload: bytes) -> None:
    ix = new_indexer()
    ix.apply("good", MODEL, batch([stored(KEYS, None, TOKENS)]), 0)
    before = ix.stats().entries
    res = ix.apply("bad", MODEL, payload, 0)
    assert res.stored_blocks == 0
    assert res.decode_errors + res.unknown_event_types >= 1 or res.events == 0
    assert matched(ix, "good") == 4
    assert ix.stats().entries == before
    # Through the queue as well.
    ix.submit("bad", MODEL, 1, payload)
    assert ix.flush(10.0)
    assert matched(ix, "good") == 4
    assert ix.stats().entries == before
    ix.close()


def test_trailing_bytes_do_not_reach_other_pods() -> None:
    ix = new_indexer()
    ix.apply("good", MODEL, batch([stored(KEYS, None, TOKENS)]), 0)
    ix.apply("bad", MODEL, batch([cleared()]) + b"\x00\xff", 0)
    ix.apply("bad", MODEL, batch([stored(KEYS, None, TOKENS)]) + b"\xdd\xff\xff\xff\xff", 1)
    assert matched(ix, "good") == 4
    assert ix.lookup(MODEL, KEYS, pods=["good"]) == [[("good", "GPU")]] * 4
    ix.close()


def test_malformed_is_counted() -> None:
    ix = new_indexer()
    for i, payload in enumerate(MALFORMED.values()):
        ix.apply("bad", MODEL, payload, i)
    state = ix.pod_state("bad")
    counters = ix.counters()
    total = counters["batch_decode_errors"] + counters["event_decode_errors"]
    assert total >= len(MALFORMED) - 3
    assert state is None or state.decode_errors >= len(MALFORMED) - 3
    ix.close()


@pytest.fixture(scope="module")
def fuzz_ix() -> Iterator[Indexer]:
    ix = new_indexer(shards=1)
    ix.apply("good", MODEL, batch([stored(KEYS, None, TOKENS)]), 0)
    yield ix
    ix.close()


VALID = batch(
    [
        stored(KEYS[:2], None, TOKENS[:32]),
        stored(KEYS[2:], KEYS[1], TOKENS[32:], medium="CPU", as_map=True),
        removed([KEYS[3]], "CPU"),
    ]
)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    payload=st.one_of(
        st.binary(max_size=300),
        st.builds(
            lambda cut, flips: _mutate(VALID, cut, flips),
            st.integers(0, len(VALID)),
            st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=4),
        ),
    )
)
def test_apply_never_raises(fuzz_ix: Indexer, payload: bytes) -> None:
    ix = fuzz_ix
    res = ix.apply("fuzz", MODEL, payload, None)
    assert res.events >= 0 and res.decode_errors >= 0
    # The other pod's blocks are untouched, whatever the payload did to "fuzz".
    assert ix.lookup(MODEL, KEYS, pods=["good"]) == [[("good", "GPU")]] * 4
    assert matched(ix, "good") == 4
    ix.apply("fuzz", MODEL, batch([cleared()]), None)


def _mutate(data: bytes, cut: int, flips: list[tuple[int, int]]) -> bytes:
    buf = bytearray(data)
    for pos, value in flips:
        buf[pos] = value
    return bytes(buf[:cut]) if cut < len(buf) else bytes(buf)
