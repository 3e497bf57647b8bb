"""End to end: Envoy-shaped ext_proc streams -> real picker -> real scoring service.

The prompts are vLLM's own captured P1/P2 (decoded with the real Llama 3.2 tokenizer), the
index is fed with vLLM's own captured KV-event frames; the picker must send each prompt to
the pod holding its longest prefix, in every body mode, over HTTP and in-process.
"""

from __future__ import annotations

from typing import Any

import pytest

from kvindex_service.extproc import EnvoyClient, ExtprocConfig, InProcessScorer, start_picker
from kvindex_service.extproc.server import DESTINATION_HEADER
from tests.extproc.support import (
    POD1,
    POD2,
    PODS,
    block_stored_payload,
    chat_body,
    completion_body,
    run,
)

MODES = ["BUFFERED", "STREAMED", "FULL_DUPLEX_STREAMED"]
EXPECTED = {"P1": POD1, "P2": POD2}


def _check_pick_shape(result: Any, endpoint: str) -> None:
    """Header via raw_value only, clear_route_cache, the same value in envoy.lb metadata."""
    assert result.status is None
    assert result.endpoint == endpoint
    assert result.metadata_endpoint == endpoint
    header = result.header_value
    assert header.key == DESTINATION_HEADER
    assert header.raw_value == endpoint.encode()
    assert header.value == ""
    carrying = [r for r in result.responses if r.HasField("dynamic_metadata")]
    assert len(carrying) == 1
    kind = carrying[0].WhichOneof("response")
    assert getattr(carrying[0], kind).response.clear_route_cache is True
    meta = carrying[0].dynamic_metadata
    assert meta.fields["envoy.lb"].struct_value.fields[DESTINATION_HEADER].string_value == endpoint


@pytest.mark.parametrize("mode", MODES)
def test_longest_prefix_over_http(mode: str, scorer_url: str, model: str, prompt_text: dict[str, str]) -> None:
    async def scenario() -> None:
        server = await start_picker(ExtprocConfig(endpoints=PODS, scorer_url=scorer_url, timeout_ms=5000))
        try:
            async with EnvoyClient(f"127.0.0.1:{server.port}") as client:
                for name, want in EXPECTED.items():
                    body = completion_body(model, prompt_text[name])
                    result = await client.route("/v1/completions", body, mode=mode, chunk_size=97)
                    _check_pick_shape(result, want)
                    if mode == "FULL_DUPLEX_STREAMED":
                        assert result.body == body
            stats = server.picker.stats()
            assert stats["scorer_outcomes"] == {"ok": 2}
            assert stats["decisions"] == {"kv": 2}
            assert server.picker.inflight() == {}
        finally:
            await server.stop()

    run(scenario())


@pytest.mark.parametrize("mode", ["BUFFERED", "FULL_DUPLEX_STREAMED"])
def test_longest_prefix_in_process(mode: str, scoring_service: Any, model: str, prompt_text: dict[str, str]) -> None:
    async def scenario() -> None:
        scorer = InProcessScorer(scoring_service, timeout_ms=5000)
        server = await start_picker(ExtprocConfig(endpoints=list(reversed(PODS))), scorer=scorer)
        try:
            async with EnvoyClient(f"127.0.0.1:{server.port}") as client:
                for name, want in EXPECTED.items():
                    # The batch form: the first prompt decides.
                    body = completion_body(model, [prompt_text[name], "unrelated text"])
                    result = await client.route("/v1/completions?x=1", body, mode=mode)
                    _check_pick_shape(result, want)
            assert server.picker.stats()["scorer_outcomes"] == {"ok": 2}
        finally:
            await server.stop()

    run(scenario())


def test_token_id_prompt_in_process(scoring_service: Any, model: str, capture: dict[str, Any]) -> None:
    """``prompt`` given as token ids (vLLM accepts them) is scored as ids, no tokenizer."""

    async def scenario() -> None:
        server = await start_picker(
            ExtprocConfig(endpoints=PODS), scorer=InProcessScorer(scoring_service, timeout_ms=5000)
        )
        try:
            async with EnvoyClient(f"127.0.0.1:{server.port}") as client:
                for name, want in EXPECTED.items():
                    result = await client.route("/v1/completions", completion_body(model, capture["prompts"][name]))
                    assert result.endpoint == want
        finally:
            await server.stop()

    run(scenario())


def test_chat_messages_rendered_by_scorer(scoring_service: Any, model: str) -> None:
    """/v1/chat/completions: the messages reach the scorer, which renders them with the
    Llama 3 chat template; a pod holding that rendered prefix (stored through a real vLLM-format
    event batch) wins, while a pod holding the raw text's tokens does not."""
    messages = [
        {"role": "system", "content": "You route freight. " * 40},
        {"role": "user", "content": "Which warehouse ships to Lyon on Tuesdays?"},
    ]
    pool = scoring_service.tokenizers
    ix = scoring_service.indexer
    rendered = pool.tokenize_chat(model, messages, add_generation_prompt=True).token_ids
    plain = pool.tokenize(model, messages[0]["content"], add_special_tokens=True).token_ids
    chat_pod, text_pod = "10.0.0.7:8000", "10.0.0.8:8000"
    keys = ix.block_keys(rendered)
    assert len(keys) >= 8
    assert ix.apply(chat_pod, model, block_stored_payload(keys[:8], rendered)).stored_blocks == 8
    plain_keys = ix.block_keys(plain)
    assert ix.apply(text_pod, model, block_stored_payload(plain_keys, plain)).stored_blocks == len(plain_keys)

    async def scenario() -> None:
        scorer = InProcessScorer(scoring_service, timeout_ms=5000)
        server = await start_picker(ExtprocConfig(endpoints=[text_pod, chat_pod]), scorer=scorer)
        try:
            async with EnvoyClient(f"127.0.0.1:{server.port}") as client:
                for mode in MODES:
                    result = await client.route("/v1/chat/completions", chat_body(model, messages), mode=mode)
                    _check_pick_shape(result, chat_pod)
        finally:
            await server.stop()

    try:
        run(scenario())
    finally:
        ix.remove_pod(chat_pod)
        ix.remove_pod(text_pod)
        ix.flush(5)


def test_chat_over_http(scorer_url: str, model: str) -> None:
    """A chat nobody holds still routes (scored, all zero -> round-robin), via HTTP."""

    async def scenario() -> None:
        server = await start_picker(ExtprocConfig(endpoints=PODS, scorer_url=scorer_url, timeout_ms=5000))
        try:
            async with EnvoyClient(f"127.0.0.1:{server.port}") as client:
                body = chat_body(model, [{"role": "user", "content": "hello there"}])
                picks = [(await client.route("/v1/chat/completions", body)).endpoint for _ in range(4)]
            assert sorted(picks) == sorted(PODS * 2)
            assert server.picker.stats()["scorer_outcomes"] == {"ok": 4}
            assert server.picker.stats()["decisions"] == {"round_robin": 4}
        finally:
            await server.stop()

    run(scenario())


def test_subset_hint_limits_candidates(scorer_url: str, model: str, prompt_text: dict[str, str]) -> None:
    async def scenario() -> None:
        server = await start_picker(ExtprocConfig(endpoints=PODS, scorer_url=scorer_url, timeout_ms=5000))
        try:
            async with EnvoyClient(f"127.0.0.1:{server.port}") as client:
                p1 = completion_body(model, prompt_text["P1"])
                # P1 is best on POD1, but only POD2 is eligible (an unconfigured pod in a hint is dropped).
                r = await client.route("/v1/completions", p1, subset=["10.0.0.9:8000", POD2])
                assert r.endpoint == POD2
                r = await client.route("/v1/completions", p1, subset=[POD2], mode="FULL_DUPLEX_STREAMED")
                assert r.endpoint == POD2
                r = await client.route("/v1/completions", p1, subset=["10.0.0.1:8000"])
                assert r.endpoint == POD1
                r = await client.route("/v1/completions", p1, subset=[])
                assert r.status == 503
                assert r.endpoint is None
        finally:
            await server.stop()

    run(scenario())


def test_non_openai_paths_are_routed_unscored(scorer_url: str) -> None:
    async def scenario() -> None:
        server = await start_picker(ExtprocConfig(endpoints=PODS, scorer_url=scorer_url))
        try:
            async with EnvoyClient(f"127.0.0.1:{server.port}") as client:
                r = await client.route("/v1/models", b"")
                assert r.endpoint in PODS
                assert [x.WhichOneof("response") for x in r.responses] == ["request_headers", "response_headers"]
                body = b'{"input": "embed me"}' * 5000
                r = await client.route("/v1/embeddings", body, mode="FULL_DUPLEX_STREAMED", chunk_size=7000)
                assert r.endpoint in PODS
                assert r.body == body
            stats = server.picker.stats()
            assert stats["scorer_outcomes"] == {"unscored": 2}
        finally:
            await server.stop()

    run(scenario())


def test_cache_salt_separates_key_spaces(scorer_url: str, model: str, prompt_text: dict[str, str]) -> None:
    """vLLM's ``cache_salt`` reaches the scorer: a salted P1 matches no unsalted block."""

    async def scenario() -> None:
        server = await start_picker(ExtprocConfig(endpoints=PODS, scorer_url=scorer_url, timeout_ms=5000))
        try:
            async with EnvoyClient(f"127.0.0.1:{server.port}") as client:
                salted = completion_body(model, prompt_text["P1"], cache_salt="tenant-a")
                picks = [(await client.route("/v1/completions", salted)).endpoint for _ in range(2)]
                assert sorted(p or "" for p in picks) == sorted(PODS)
            assert server.picker.stats()["decisions"] == {"round_robin": 2}
            assert server.picker.stats()["scorer_outcomes"] == {"ok": 2}
        finally:
            await server.stop()

    run(scenario())


def test_in_process_scores_equal_the_json_answer(scoring_service: Any, model: str, prompt_text: dict[str, str]) -> None:
    """The in-process scorer reads the native result directly; it must agree with what the
    HTTP scorer reads from the same service's JSON answer."""
    from kvindex_service.extproc.prompt import PromptQuery
    from kvindex_service.extproc.scorer_client import kv_scores_from_json
    from kvindex_service.scoring import ScoreRequest

    async def scenario() -> None:
        scorer = InProcessScorer(scoring_service, timeout_ms=5000)
        for text in prompt_text.values():
            typed = await scorer.score(PromptQuery(model=model, prompt=text), PODS)
            answer = await scoring_service.score(ScoreRequest(model=model, prompt=text, pods=PODS))
            assert typed == kv_scores_from_json(answer.model_dump(mode="json"))
            assert max(typed.weighted_prefix.values()) > 0

    run(scenario())


def test_scoring_block_size_is_the_indexers(scoring_service: Any) -> None:
    from kvindex_service.scoring import ScoringService

    ix = scoring_service.indexer
    assert scoring_service.block_size == ix.block_size
    assert ScoringService(ix, None, block_size=ix.block_size).block_size == ix.block_size
    with pytest.raises(ValueError, match="does not match"):
        ScoringService(ix, None, block_size=ix.block_size + 1)
