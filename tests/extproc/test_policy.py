"""The choice policy through the real stack: KV first, load, session affinity, round-robin,
and fail-open when the scorer is down, slow or refuses the prompt.

With the captured index, P1 is 4/6 on POD1 and 2/6 on POD2 (weighted prefixes .667 / .333).
"""

from __future__ import annotations

from typing import Any

from kvindex_service.extproc import EnvoyClient, ExtprocConfig, PolicyWeights, start_picker
from tests.extproc.support import POD1, POD2, PODS, completion_body, run

UNKNOWN = "A prompt about tomato gardening that no pod has ever seen, long enough for a block or two."


def test_round_robin_on_ties_and_load_spreading(scorer_url: str, model: str) -> None:
    async def scenario() -> None:
        server = await start_picker(ExtprocConfig(endpoints=PODS, scorer_url=scorer_url, timeout_ms=5000))
        try:
            async with EnvoyClient(f"127.0.0.1:{server.port}") as client:
                body = completion_body(model, UNKNOWN)
                picks = [(await client.route("/v1/completions", body)).endpoint for _ in range(4)]
                assert picks[0] != picks[1] and picks[:2] == picks[2:]
                assert server.picker.stats()["decisions"] == {"round_robin": 4}
                held = [await client.route("/v1/completions", body, complete=False) for _ in range(6)]
                assert server.picker.inflight() == {POD1: 3, POD2: 3}
                for h in held:
                    await h.finish()
            assert server.picker.inflight() == {}
        finally:
            await server.stop()

    run(scenario())


def test_longest_prefix_wins_until_its_load_costs_more(
    scorer_url: str, model: str, prompt_text: dict[str, str]
) -> None:
    async def scenario(weights: PolicyWeights) -> list[str | None]:
        config = ExtprocConfig(endpoints=PODS, scorer_url=scorer_url, timeout_ms=5000, weights=weights)
        server = await start_picker(config)
        try:
            async with EnvoyClient(f"127.0.0.1:{server.port}") as client:
                body = completion_body(model, prompt_text["P1"])
                held = [await client.route("/v1/completions", body, complete=False) for _ in range(3)]
                for h in held:
                    await h.finish()
                return [h.endpoint for h in held]
        finally:
            await server.stop()

    # One extra in-flight request costing a quarter of the prompt: POD1's lead is a third, so
    # it takes two requests and the third spills to POD2.
    assert run(scenario(PolicyWeights(load=0.25))) == [POD1, POD1, POD2]
    # The default (a tenth): POD1 keeps all three.
    assert run(scenario(PolicyWeights())) == [POD1, POD1, POD1]
    # Load ignored: everything piles onto the longest prefix.
    assert run(scenario(PolicyWeights(load=0.0))) == [POD1, POD1, POD1]
    # KV ignored: pure least-loaded.
    picks = run(scenario(PolicyWeights(kv=0.0)))
    assert sorted(p or "" for p in picks[:2]) == sorted(PODS)


def test_sessions_stick(scorer_url: str, model: str) -> None:
    async def scenario() -> None:
        server = await start_picker(ExtprocConfig(endpoints=PODS, scorer_url=scorer_url, timeout_ms=5000))
        try:
            async with EnvoyClient(f"127.0.0.1:{server.port}") as client:
                body = completion_body(model, UNKNOWN)
                a = [
                    (await client.route("/v1/completions", body, headers={"x-session-id": "a"})).endpoint
                    for _ in range(5)
                ]
                b = [
                    (await client.route("/v1/completions", body, headers={"x-session-id": "b"})).endpoint
                    for _ in range(5)
                ]
                assert len(set(a)) == 1 and len(set(b)) == 1
                assert a[0] != b[0]  # the first picks alternated; each session then stayed
                assert server.picker.stats()["decisions"] == {"round_robin": 2, "affinity": 8}
                assert server.picker.session_count() == 2
        finally:
            await server.stop()

    run(scenario())


def test_session_moves_only_for_a_clearly_longer_prefix(
    scorer_url: str, model: str, prompt_text: dict[str, str]
) -> None:
    async def scenario(margin: float) -> str | None:
        config = ExtprocConfig(endpoints=PODS, scorer_url=scorer_url, timeout_ms=5000, affinity_margin=margin)
        server = await start_picker(config)
        try:
            async with EnvoyClient(f"127.0.0.1:{server.port}") as client:
                s = {"x-session-id": "conv-1"}
                first = await client.route("/v1/completions", completion_body(model, UNKNOWN), headers=s, subset=[POD2])
                assert first.endpoint == POD2
                # POD1 holds 4/6 of P1, the session's POD2 2/6: a lead of one third.
                nxt = await client.route("/v1/completions", completion_body(model, prompt_text["P1"]), headers=s)
                assert server.picker.session_endpoint("conv-1") == nxt.endpoint
                return nxt.endpoint
        finally:
            await server.stop()

    assert run(scenario(0.25)) == POD1
    assert run(scenario(0.5)) == POD2


def test_session_leaves_an_overloaded_pod(scorer_url: str, model: str) -> None:
    async def scenario() -> None:
        server = await start_picker(
            ExtprocConfig(endpoints=PODS, scorer_url=scorer_url, timeout_ms=5000, affinity_max_load_gap=4)
        )
        try:
            async with EnvoyClient(f"127.0.0.1:{server.port}") as client:
                body = completion_body(model, UNKNOWN)
                s = {"x-session-id": "busy"}
                assert (await client.route("/v1/completions", body, headers=s, subset=[POD1])).endpoint == POD1
                held = [await client.route("/v1/completions", body, subset=[POD1], complete=False) for _ in range(3)]
                assert (await client.route("/v1/completions", body, headers=s)).endpoint == POD1
                held.append(await client.route("/v1/completions", body, subset=[POD1], complete=False))
                assert server.picker.inflight() == {POD1: 4}
                assert (await client.route("/v1/completions", body, headers=s)).endpoint == POD2
                assert server.picker.session_endpoint("busy") == POD2
                for h in held:
                    await h.finish()
        finally:
            await server.stop()

    run(scenario())


def test_session_header_is_configurable(scorer_url: str, model: str) -> None:
    async def scenario() -> None:
        server = await start_picker(
            ExtprocConfig(endpoints=PODS, scorer_url=scorer_url, session_header="X-Conversation")
        )
        try:
            async with EnvoyClient(f"127.0.0.1:{server.port}") as client:
                body = completion_body(model, UNKNOWN)
                picks = {
                    (await client.route("/v1/completions", body, headers={"x-conversation": "c"})).endpoint
                    for _ in range(4)
                }
                assert len(picks) == 1
                assert server.picker.session_endpoint("c") in PODS
        finally:
            await server.stop()

    run(scenario())


def test_fail_open_when_scorer_is_down(closed_url: str, model: str, prompt_text: dict[str, str]) -> None:
    async def scenario() -> None:
        config = ExtprocConfig(endpoints=PODS, scorer_url=closed_url, breaker_failures=3, breaker_cooldown_s=3600)
        server = await start_picker(config)
        try:
            async with EnvoyClient(f"127.0.0.1:{server.port}") as client:
                body = completion_body(model, prompt_text["P1"])
                picks = [(await client.route("/v1/completions", body, mode="FULL_DUPLEX_STREAMED")) for _ in range(5)]
                assert all(p.status is None and p.body == body for p in picks)
                assert sorted(p.endpoint or "" for p in picks[:2]) == sorted(PODS)  # load + round-robin
                sticky = {
                    (await client.route("/v1/completions", body, headers={"x-session-id": "s"})).endpoint
                    for _ in range(3)
                }
                assert len(sticky) == 1  # affinity still holds without scores
            stats: dict[str, Any] = server.picker.stats()
            # Three failures open the breaker; later requests skip the dead scorer at once.
            assert stats["scorer_outcomes"] == {"error": 3, "breaker_open": 5}
            assert stats["fail_open"] == 8
            assert stats["breaker_open"] is True
            assert server.picker.inflight() == {}
        finally:
            await server.stop()

    run(scenario())


def test_fail_open_when_scorer_is_slow(slow_scorer_url: str, model: str, prompt_text: dict[str, str]) -> None:
    async def scenario() -> None:
        server = await start_picker(ExtprocConfig(endpoints=PODS, scorer_url=slow_scorer_url, timeout_ms=50))
        try:
            async with EnvoyClient(f"127.0.0.1:{server.port}") as client:
                body = completion_body(model, prompt_text["P2"])
                for mode in ("BUFFERED", "STREAMED", "FULL_DUPLEX_STREAMED"):
                    r = await client.route("/v1/completions", body, mode=mode)
                    assert r.endpoint in PODS
            assert server.picker.stats()["scorer_outcomes"] == {"timeout": 3}
            assert server.picker.fail_open == 3
        finally:
            await server.stop()

    run(scenario())


def test_scorer_rejection_routes_without_opening_the_breaker(scorer_url: str) -> None:
    """An unknown model is the scorer's 4xx: counted as rejected, routed, breaker closed."""

    async def scenario() -> None:
        server = await start_picker(
            ExtprocConfig(endpoints=PODS, scorer_url=scorer_url, breaker_failures=1, timeout_ms=5000)
        )
        try:
            async with EnvoyClient(f"127.0.0.1:{server.port}") as client:
                for _ in range(3):
                    r = await client.route("/v1/completions", completion_body("no/such-model", "hello"))
                    assert r.endpoint in PODS
            stats = server.picker.stats()
            assert stats["scorer_outcomes"] == {"rejected": 3}
            assert stats["breaker_open"] is False
        finally:
            await server.stop()

    run(scenario())
