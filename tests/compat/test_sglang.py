"""SGLang's own KV events (tests/fixtures/sglang/, made by tools/sglang/capture_sglang_events.py
from the ``sglang`` wheel's RadixCache and ZmqEventPublisher) through real ZMQ into the real
Subscriber and Indexer.

What the captures show: SGLang publishes vLLM's three-frame messages and batches; events are
arrays up to 0.5.22 and maps from 0.5.23 (which adds ``cache_salt``, ``session_id`` and
``lora_name`` and coalesces a chain of pages into one store); its page size is the block size;
its block hashes are SHA-256 page chains cut to a signed 64-bit integer (never kvindex's keys,
so removals go through the engine-hash bridge); its replay ROUTER answers ``[b"", seq, payload]``
(0.5.10) or ``[b"", topic, seq, payload]`` (0.5.23). SGLang 0.4 hashed each page alone with
Python's ``hash()`` and gave root pages the parent ``hash(())``: it cannot be placed, and the
test pins that it is counted, never guessed.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from kvindex_service import Indexer
from kvindex_service.events.topic import PodEndpoint
from tests.events.helpers import Publisher, Rig, matched

DIR = Path(__file__).parents[1] / "fixtures" / "sglang"
SUPPORTED = ("0.5.10", "0.5.23")


def load(version: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DIR / f"sglang-{version}.json").read_text())
    for msg in data["messages"]:
        msg["frames"] = [base64.b64decode(f) for f in msg["frames_b64"]]
    return data


def pods(capture: dict[str, Any]) -> list[str]:
    return sorted({m["pod"] for m in capture["messages"]})


def indexer(rig: Rig, capture: dict[str, Any]) -> Indexer:
    return rig.indexer(block_size=capture["page_size"])


def check(ix: Indexer, capture: dict[str, Any], expect: dict[str, dict[str, int]]) -> None:
    for pod, per_prompt in expect.items():
        for prompt, pages in per_prompt.items():
            salt = capture["cache_salts"].get(prompt)
            lora = capture.get("lora_names", {}).get(prompt)
            tokens = capture["prompts"][prompt]
            scores = ix.score(capture["model"], tokens, lora_name=lora, cache_salt=salt, pods=[pod]).scores
            got = next(s.matched_blocks for s in scores if s.pod == pod)
            assert got == pages, f"{pod} {prompt}: {got} blocks, expected {pages}"


def replay(capture: dict[str, Any], sub: Any, pubs: dict[str, Publisher], ix: Indexer) -> None:
    for msg in capture["messages"]:
        pubs[msg["pod"]].send_wait(sub, msg["frames"])
        check(ix, capture, msg["expect_after"])


@pytest.mark.parametrize("version", SUPPORTED)
def test_captures_decode_and_score_exactly_in_connect_mode(rig: Rig, version: str) -> None:
    capture = load(version)
    ix = indexer(rig, capture)
    pubs = {pod: rig.publisher() for pod in pods(capture)}
    sub = rig.subscriber(ix, pods=[PodEndpoint(p.endpoint) for p in pubs.values()], probe=pubs.values())
    replay(capture, sub, pubs, ix)
    stats = sub.stats()
    assert stats["messages_applied"] == len(capture["messages"])
    assert stats["gaps"] == stats["resets"] == stats["unrecoverable_gaps"] == 0
    for state in sub.pod_states():
        assert state["decode_errors"] == 0 and state["models"] == [capture["model"]]
        assert state["hashes_match"] is False  # SGLang's hashes are its own: the bridge carries them
    counters = ix.counters()
    assert counters["unknown_parents"] == counters["unplaced_blocks"] == 0
    assert counters["block_size_mismatches"] == 0
    assert counters["blocks_removed"] > 0  # the evictions went through the bridge
    # every message changed something the expectations can see
    assert len({json.dumps(m["expect_after"], sort_keys=True) for m in capture["messages"]}) > 4


@pytest.mark.parametrize("version", SUPPORTED)
def test_captures_score_exactly_in_bind_mode(rig: Rig, version: str) -> None:
    capture = load(version)
    ix = indexer(rig, capture)
    sub = rig.subscriber(ix, bind="tcp://127.0.0.1:*")
    pubs = {pod: rig.bound_publisher(sub) for pod in pods(capture)}
    replay(capture, sub, pubs, ix)
    assert {s["pod"] for s in sub.pod_states()} == set(pubs)
    assert all(s["gaps"] == 0 and s["mode"] == "bind" for s in sub.pod_states())


def test_salted_store_matches_only_under_its_salt(rig: Rig) -> None:
    """0.5.23's ``cache_salt``: the salted P1 is held in full under the salt, and the same
    tokens without it match only what the pod holds unsalted (P2's first two pages)."""
    capture = load("0.5.23")
    msg = next(m for m in capture["messages"] if "cache_salt" in m["what"])
    stored = [e for e in msg["decoded"][1] if e["type"] == "BlockStored"]
    assert stored and all(e["cache_salt"] == capture["cache_salts"]["P1+salt"] for e in stored)
    ix = indexer(rig, capture)
    pubs = {pod: rig.publisher() for pod in pods(capture)}
    sub = rig.subscriber(ix, pods=[PodEndpoint(p.endpoint) for p in pubs.values()], probe=pubs.values())
    for m in capture["messages"]:
        pubs[m["pod"]].send_wait(sub, m["frames"])
        if m is msg:
            break
    pod, tokens = msg["pod"], capture["prompts"]["P1"]
    full = len(tokens) // capture["page_size"]
    salted = ix.score(capture["model"], tokens, cache_salt="tenant-a", pods=[pod]).scores[0].matched_blocks
    other = ix.score(capture["model"], tokens, cache_salt="tenant-b", pods=[pod]).scores[0].matched_blocks
    assert (salted, matched(ix, capture["model"], tokens, pod), other) == (full, 2, 0)


def test_lora_store_matches_only_under_its_adapter(rig: Rig) -> None:
    """0.5.23's ``lora_name``: P2 cached for an adapter is held in full for requests naming it,
    and is no match for the base model or another adapter."""
    capture = load("0.5.23")
    msg = next(m for m in capture["messages"] if "LoRA" in m["what"])
    stored = [e for e in msg["decoded"][1] if e["type"] == "BlockStored"]
    assert stored and all(e["lora_name"] == capture["lora_names"]["P2+lora"] for e in stored)
    ix = indexer(rig, capture)
    pub = rig.publisher()
    sub = rig.subscriber(ix, pods=[PodEndpoint(pub.endpoint)], probe=[pub])
    pub.send_wait(sub, msg["frames"])  # a chain root: needs nothing before it
    pod, tokens = msg["pod"], capture["prompts"]["P2"]

    def blocks(lora: str | None) -> int:
        return ix.score(capture["model"], tokens, lora_name=lora, pods=[pod]).scores[0].matched_blocks

    assert (blocks("sql-adapter"), blocks(None), blocks("other")) == (len(tokens) // capture["page_size"], 0, 0)


@pytest.mark.parametrize("version", SUPPORTED)
def test_real_replay_reply_fills_a_gap(rig: Rig, version: str) -> None:
    """The first pod's batches 2.. are withheld from the live stream; the subscriber asks the
    replay ROUTER for them and gets SGLang's own reply frames (3 frames in 0.5.10, 4 with the
    topic in 0.5.23, ended by seq -1), and scores exactly afterwards."""
    capture = load(version)
    first = capture["replay_from_seq_2_of_first_pod"]["pod"]
    request = [base64.b64decode(f) for f in capture["replay_from_seq_2_of_first_pod"]["request_frames_b64"]]
    replies = [[base64.b64decode(f) for f in r] for r in capture["replay_from_seq_2_of_first_pod"]["reply_frames_b64"]]
    assert {len(r) for r in replies} == ({3} if version == "0.5.10" else {4})
    router = rig.router(lambda start: replies if start == 2 else [replies[-1]])
    ix = indexer(rig, capture)
    pub = rig.publisher()
    sub = rig.subscriber(ix, pods=[PodEndpoint(pub.endpoint, replay_endpoint=router.endpoint)], probe=[pub])
    mine = [m for m in capture["messages"] if m["pod"] == first]
    last = mine[-1]
    for m in mine:
        if m["seq"] < 2 or m is last:  # 2 .. last-1 are lost; the last one reveals the gap
            pub.send_wait(sub, m["frames"])
    assert sub.sync(20.0)
    assert [r[1] for r in router.requests] == [request[1]]
    state = sub.pod_state(first)
    assert state is not None and (state["gaps"], state["unrecoverable_gaps"]) == (1, 0)
    check(ix, capture, {first: last["expect_after"][first]})


def test_sglang_0_4_hashes_cannot_be_placed_and_are_counted(rig: Rig) -> None:
    """0.4.10's pages are hashed alone (``hash(tuple(page))``) and a root page's parent is
    ``hash(())``, a value no store ever announced: nothing is placed, every store is counted
    as an unknown parent, and no pod is ever scored above what it holds."""
    capture = load("0.4.10.post2")
    first = capture["messages"][0]
    roots = [e for e in first["decoded"][1] if e[0] == "BlockStored"]
    assert roots[0][2] == hash(())  # CPython's hash of the empty tuple: the same in every process
    ix = indexer(rig, capture)
    pubs = {pod: rig.publisher() for pod in pods(capture)}
    sub = rig.subscriber(ix, pods=[PodEndpoint(p.endpoint) for p in pubs.values()], probe=pubs.values())
    for msg in capture["messages"]:
        pubs[msg["pod"]].send_wait(sub, msg["frames"])
        for pod, per_prompt in msg["expect_after"].items():
            for prompt in per_prompt:
                assert matched(ix, capture["model"], capture["prompts"][prompt], pod) == 0
    assert ix.counters()["unknown_parents"] > 0
    assert all(s["unknown_parents"] > 0 for s in sub.pod_states() if s["batches_applied"] > 1)


def test_page_size_below_the_block_size_is_refused_and_counted(rig: Rig) -> None:
    """SGLang's default ``--page-size 1`` publishes one-token blocks: with kvindex's 16-token
    blocks nothing can be keyed, so every store is refused as a block-size mismatch, visible per
    pod, and no pod is ever scored."""
    capture = load("0.5.23-page1")
    assert capture["page_size"] == 1
    ix = rig.indexer(block_size=16)
    pubs = {pod: rig.publisher() for pod in pods(capture)}
    sub = rig.subscriber(ix, pods=[PodEndpoint(p.endpoint) for p in pubs.values()], probe=pubs.values())
    for msg in capture["messages"]:
        pubs[msg["pod"]].send_wait(sub, msg["frames"])
    for pod in pubs:
        for prompt in ("P1", "P2", "P3"):
            assert matched(ix, capture["model"], capture["prompts"][prompt], pod) == 0
    stores = sum(1 for m in capture["messages"] for e in m["decoded"][1] if e["type"] == "BlockStored")
    assert ix.counters()["block_size_mismatches"] == stores
    assert all(s["decode_errors"] > 0 for s in sub.pod_states())


def test_sglang_default_empty_topic_never_reaches_the_index(rig: Rig) -> None:
    """SGLang's ``topic`` defaults to "": such messages do not start with the subscription
    prefix ``kv@``, so ZMQ's own filter drops them before the subscriber sees them, and the pod
    stays without index state (``GET /pods`` shows it silent); the operator sets
    ``"topic": "kv@<ip:port>@<model>"``. The same frames with a topic are applied."""
    capture = load("0.5.23")
    ix = indexer(rig, capture)
    pub = rig.publisher()
    pod = "10.0.0.1:30000"
    sub = rig.subscriber(ix, pods=[PodEndpoint(pub.endpoint, pod_id=pod)], probe=[pub])
    mine = [m for m in capture["messages"] if m["pod"] == pod]
    for msg in mine[:2]:
        pub.send([b"", *msg["frames"][1:]])
    pub.probe(sub)  # anything published before the probe has been delivered by now
    assert sub.stats()["messages_applied"] == 0
    assert ix.pod_state(pod) is None
    pub.send_wait(sub, mine[0]["frames"])
    assert sub.stats()["messages_applied"] == 1 and ix.pod_state(pod) is not None
