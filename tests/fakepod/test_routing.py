"""Fake pods feeding a real ``kvindex serve`` over real ZMQ: the issue's done-when and more."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvindex_service import TokenProcessor
from tests.fakepod.support import MODEL, RunningPod, Service, prompt_text


@pytest.fixture
def pods(service: Service) -> Iterator[tuple[RunningPod, RunningPod]]:
    a = RunningPod(service.zmq)
    b = RunningPod(service.zmq)
    try:
        a.wait_subscribed()
        b.wait_subscribed()
        yield a, b
    finally:
        a.close()
        b.close()


def test_completion_on_pod_a_makes_score_rank_a_first_with_all_full_blocks(
    service: Service, pods: tuple[RunningPod, RunningPod]
) -> None:
    a, b = pods
    prompt = prompt_text("routing")
    out = a.complete(prompt, max_tokens=8)
    usage = out["usage"]
    assert out["object"] == "text_completion" and out["choices"][0]["text"].strip()
    assert usage["completion_tokens"] == 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + 8
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}
    service.synced(a)
    scored = service.score(prompt=prompt)
    # The pod and the service tokenized the prompt identically (BOS included).
    assert scored["total_tokens"] == usage["prompt_tokens"]
    assert scored["total_blocks"] == usage["prompt_tokens"] // 16 >= 4
    first = scored["scores"][0]
    assert scored["best_pod"] == a.pod_id == first["pod"]
    assert first["matched_blocks"] == scored["total_blocks"] and first["fraction"] == 1.0
    assert all(s["matched_blocks"] == 0 for s in scored["scores"][1:])
    assert b.pod_id not in {s["pod"] for s in scored["scores"] if s["matched_blocks"]}
    # The same prompt sent to B now ranks B too, and the keys still line up exactly.
    b.complete(prompt)
    service.synced(b)
    both = {s["pod"]: s["matched_blocks"] for s in service.score(prompt=prompt)["scores"]}
    assert both == {a.pod_id: scored["total_blocks"], b.pod_id: scored["total_blocks"]}
    for pod in (a, b):
        row = service.pod(pod.pod_id)
        assert row is not None
        assert row["hash_matches"] > 0 and row["hash_mismatches"] == 0 and row["hashes_match"] is True
        assert row["decode_errors"] == 0 and row["unknown_parents"] == 0 and row["gaps"] == 0


def test_chat_completion_is_scored_with_the_same_messages(
    service: Service, pods: tuple[RunningPod, RunningPod]
) -> None:
    a, b = pods
    messages = [
        {"role": "system", "content": prompt_text("chat", 4)},
        {"role": "user", "content": "Which section covers step two?"},
    ]
    out = b.chat(messages, max_tokens=5)
    assert out["object"] == "chat.completion"
    assert out["choices"][0]["message"]["role"] == "assistant"
    service.synced(b)
    scored = service.score(messages=messages)
    assert scored["total_tokens"] == out["usage"]["prompt_tokens"]  # same template, same tokens
    first = scored["scores"][0]
    assert first["pod"] == b.pod_id and first["matched_blocks"] == scored["total_blocks"] > 2
    assert a.pod_id not in {s["pod"] for s in scored["scores"] if s["matched_blocks"]}


def test_cached_tokens_grow_on_a_repeated_prompt(service: Service, pods: tuple[RunningPod, RunningPod]) -> None:
    a, _ = pods
    prompt = prompt_text("repeat")
    first = a.complete(prompt)["usage"]
    second = a.complete(prompt)["usage"]
    n = first["prompt_tokens"]
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    # vLLM always recomputes the last prompt token, so a hit covers at most (n - 1) // 16 blocks.
    assert second["prompt_tokens_details"]["cached_tokens"] == (n - 1) // 16 * 16 > 0
    # A prompt sharing only the leading blocks hits only those.
    third = a.complete(prompt.replace("Question: what comes first?", "Question: what comes last?"))["usage"]
    assert 0 < third["prompt_tokens_details"]["cached_tokens"] <= second["prompt_tokens_details"]["cached_tokens"]


def test_evictions_under_a_small_pool_leave_the_index(service: Service) -> None:
    pod = RunningPod(service.zmq, capacity=12)
    try:
        pod.wait_subscribed()
        old = prompt_text("old", 8)
        pod.complete(old, max_tokens=4)
        service.synced(pod)
        before = service.score(prompt=old)
        assert before["scores"][0]["matched_blocks"] == before["total_blocks"] >= 8
        for topic in ("new-one", "new-two"):
            pod.complete(prompt_text(topic, 8), max_tokens=4)
        service.synced(pod)
        health = pod.http.get("/health").json()
        assert health["evictions"] > 0 and health["cached_blocks"] <= 12
        after = service.score(prompt=old)
        matched = {s["pod"]: s["matched_blocks"] for s in after["scores"]}.get(pod.pod_id, 0)
        # The index says exactly what the pool holds: the evicted blocks are gone from it.
        tokens = pod.engine.tokenize_prompt(old)
        keys = TokenProcessor(block_size=16).block_keys(tokens)
        assert matched == pod.engine.pod.pool.cached_prefix(keys) < before["total_blocks"]
        row = service.pod(pod.pod_id)
        assert row is not None and row["blocks_by_tier"]["GPU"] == health["cached_blocks"]
    finally:
        pod.close()


def test_reset_prefix_cache_clears_the_pod_in_the_index(service: Service) -> None:
    pod = RunningPod(service.zmq)
    try:
        pod.wait_subscribed()
        prompt = prompt_text("reset")
        pod.complete(prompt)
        service.synced(pod)
        assert service.score(prompt=prompt)["best_pod"] == pod.pod_id
        assert pod.http.post("/reset_prefix_cache").status_code == 200
        service.synced(pod)
        assert service.score(prompt=prompt)["best_pod"] is None
        assert pod.complete(prompt)["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    finally:
        pod.close()


@pytest.mark.parametrize("fmt", ["0.23", "0.11", "0.24"])
def test_older_wire_formats_are_ingested_with_matching_hashes(service: Service, fmt: str) -> None:
    pod = RunningPod(service.zmq, vllm_format=fmt, capacity=8)
    try:
        pod.wait_subscribed()
        prompts = [prompt_text(f"{fmt}-{i}", 3) for i in range(3)]  # the third evicts
        for p in prompts:
            pod.complete(p, max_tokens=4)
        row = service.synced(pod)
        assert row["decode_errors"] == 0 and row["unknown_event_types"] == 0
        assert row["hash_matches"] > 0 and row["hash_mismatches"] == 0
        assert row["blocks_by_tier"]["GPU"] == pod.engine.pod.pool.cached_blocks
        assert service.score(prompt=prompts[-1])["best_pod"] == pod.pod_id
    finally:
        pod.close()


def test_models_health_and_request_errors(service: Service) -> None:
    pod = RunningPod(service.zmq, max_prompt_tokens=64, max_body_bytes=2048)
    try:
        models = pod.http.get("/v1/models").json()
        assert [m["id"] for m in models["data"]] == [MODEL]
        health = pod.http.get("/health").json()
        assert health["pod_id"] == pod.pod_id and health["zmq_mode"] == "connect"
        post = pod.http.post
        cases = [
            (post("/v1/completions", json={"model": "other", "prompt": "hi"}), 404),
            (post("/v1/completions", json={"model": MODEL, "prompt": "word " * 100}), 400),
            (post("/v1/completions", json={"model": MODEL, "prompt": "x" * 4000}), 413),
            (post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 400),
            (post("/v1/completions", json={"model": MODEL, "prompt": {"a": 1}}), 400),
            (post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 0}), 400),
            (post("/v1/chat/completions", json={"model": MODEL, "messages": "hi"}), 400),
        ]
        for response, status in cases:
            assert response.status_code == status, response.text
            body = response.json()
            assert body["object"] == "error" and body["code"] == status and body["message"]
        # Token ids are accepted as a prompt, and nothing above reached the pool.
        assert pod.engine.pod.pool.cached_blocks == 0
        assert pod.complete(list(range(1, 40)))["usage"]["prompt_tokens"] == 39
    finally:
        pod.close()
