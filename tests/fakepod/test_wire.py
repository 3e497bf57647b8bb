"""What a fake pod puts on the wire: vLLM's frames, its block keys, its replay socket."""

from __future__ import annotations

import struct
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest
import zmq

from kvindex_service import TokenProcessor
from kvindex_service.events.replay import build_request, parse_reply
from kvindex_service.fakepod import binds
from tests.fakepod.support import MODEL, RunningPod, prompt_text


def test_vllms_bind_or_connect_rule() -> None:
    for endpoint in ("tcp://*:5557", "tcp://[::]:5557", "ipc:///tmp/kv", "inproc://kv"):
        assert binds(endpoint)
    for endpoint in ("tcp://127.0.0.1:5557", "tcp://kvindex.default.svc:5557"):
        assert not binds(endpoint)


def _subscribe(pod: RunningPod) -> tuple[zmq.Context[Any], zmq.Socket[Any]]:
    ctx: zmq.Context[Any] = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv@")
    sub.connect(pod.engine.publisher.endpoint)
    pod.wait_subscribed()
    return ctx, sub


@pytest.mark.parametrize("seed", [None, "42"])
def test_published_keys_equal_the_services_keys(seed: str | None) -> None:
    pod = RunningPod("tcp://127.0.0.1:*", hash_seed=seed)
    ctx, sub = _subscribe(pod)
    try:
        assert pod.http.get("/health").json()["zmq_mode"] == "bind"
        prompt = prompt_text("keys")
        usage = pod.complete(prompt, max_tokens=32)["usage"]
        assert sub.poll(30_000)
        topic, seq, payload = sub.recv_multipart()
        assert topic == f"kv@{pod.pod_id}@{MODEL}".encode()
        assert struct.unpack(">Q", seq) == (0,)
        ts, events, dp_rank = msgpack.unpackb(payload)
        assert isinstance(ts, float) and dp_rank == 0
        (stored,) = events
        assert stored["type"] == "BlockStored" and stored["parent_block_hash"] is None
        tokens = pod.engine.tokenize_prompt(prompt)
        assert len(tokens) == usage["prompt_tokens"] and stored["token_ids"] == tokens[: len(tokens) // 16 * 16]
        # What the service's token processor computes for these tokens, with the same seed.
        assert stored["block_hashes"] == TokenProcessor(block_size=16, hash_seed=seed).block_keys(tokens)
        # The output's blocks follow in the next batch, chained to the prompt's last block.
        assert sub.poll(30_000)
        _, seq2, payload2 = sub.recv_multipart()
        assert struct.unpack(">Q", seq2) == (1,)
        (more,) = msgpack.unpackb(payload2)[1]
        assert more["parent_block_hash"] == stored["block_hashes"][-1]
    finally:
        sub.close()
        ctx.term()
        pod.close()


@pytest.mark.parametrize(("fmt", "frames"), [("0.33", 4), ("0.24", 3), ("0.23", 3), ("array", 3)])
def test_replay_socket_answers_in_the_versions_format(fmt: str, frames: int) -> None:
    pod = RunningPod("tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*", vllm_format=fmt, capacity=10)
    replay = pod.engine.publisher.replay_endpoint
    assert replay is not None
    ctx: zmq.Context[Any] = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        for i in range(3):  # capacity 10: the third request evicts
            pod.complete(prompt_text(f"replay-{i}", 3), max_tokens=4)
        last = pod.engine.publisher.next_seq - 1
        dealer.connect(replay)
        dealer.send_multipart(build_request(1))
        seqs: list[int] = []
        kinds: set[str] = set()
        while True:
            assert dealer.poll(30_000)
            reply = dealer.recv_multipart()
            parsed = parse_reply(reply)
            if parsed.seq is None:
                break
            assert len(reply) == frames
            assert (parsed.topic is not None) == (frames == 4)
            seqs.append(parsed.seq)
            for event in msgpack.unpackb(parsed.payload)[1]:
                array = isinstance(event, list)
                assert array == (fmt in ("0.23", "array"))
                kinds.add(event[0] if array else event["type"])
                if array and event[0] == "BlockStored":
                    assert len(event) == 12 and event[6] == "GPU" and event[9] == 0
        assert seqs == list(range(1, last + 1))
        assert kinds == {"BlockStored", "BlockRemoved"}
    finally:
        dealer.close()
        ctx.term()
        pod.close()
