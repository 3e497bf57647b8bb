"""Wire-level pieces on their own: topics, seq frames, endpoints, sequence rules, replay frames."""

from __future__ import annotations

import base64

import pytest

from kvindex_service.events import (
    END_SEQ,
    classify,
    decode_seq,
    encode_seq,
    parse_topic,
    validate_endpoint,
)
from kvindex_service.events.replay import build_request, parse_reply
from tests.conftest import VLLM_VERSIONS, load_vllm_capture


@pytest.mark.parametrize(
    ("topic", "prefix", "expected"),
    [
        (
            b"kv@10.0.0.1:8000@meta-llama/Llama-3.2-3B-Instruct",
            "kv@",
            ("10.0.0.1:8000", "meta-llama/Llama-3.2-3B-Instruct"),
        ),
        (b"kv@pod@org/model@rev@2", "kv@", ("pod", "org/model@rev@2")),
        ("kv@pöd@mödel".encode(), "kv@", ("pöd", "mödel")),
        (b"events.pod-1@m", "events.", ("pod-1", "m")),
        (b"pod@m", "", ("pod", "m")),
    ],
)
def test_parse_topic_splits_on_first_two_separators(topic: bytes, prefix: str, expected: tuple[str, str]) -> None:
    assert parse_topic(topic, prefix) == expected


@pytest.mark.parametrize(
    "topic",
    [b"kv@\xff\xfe@model", b"xx@pod@model", b"kv@pod", b"kv@@model", b"kv@pod@", b"", b"kv@"],
)
def test_parse_topic_rejects(topic: bytes) -> None:
    with pytest.raises(ValueError):
        parse_topic(topic)


def test_every_capture_topic_parses_to_its_pod() -> None:
    for version in VLLM_VERSIONS:
        capture = load_vllm_capture(version)
        for msg in capture["messages"]:
            assert parse_topic(msg["frames"][0]) == (msg["pod"], capture["model"])


def test_seq_frames() -> None:
    assert decode_seq(b"\x00" * 7 + b"\x05") == 5
    assert decode_seq(END_SEQ) == 2**64 - 1
    assert encode_seq(258) == b"\x00" * 6 + b"\x01\x02"
    for bad in (b"", b"\x00" * 7, b"\x00" * 9):
        with pytest.raises(ValueError):
            decode_seq(bad)


@pytest.mark.parametrize(
    ("last", "seq", "reset", "missing_from", "joined"),
    [
        (None, 0, False, None, False),
        (4, 5, False, None, False),
        (4, 9, False, 5, False),
        (None, 7, False, 0, True),
        (4, 4, True, 0, True),  # no progress: a restart whose first batches we missed
        (4, 0, True, None, False),
        (9, 3, True, 0, True),  # restarted and its first batches were missed
    ],
)
def test_classify(last: int | None, seq: int, reset: bool, missing_from: int | None, joined: bool) -> None:
    verdict = classify(last, seq)
    assert (verdict.reset, verdict.missing_from, verdict.joined) == (reset, missing_from, joined)


@pytest.mark.parametrize(
    "endpoint",
    ["tcp://127.0.0.1:5557", "tcp://pod-1.ns.svc:5557", "tcp://[::1]:5557", "ipc:///tmp/kv.sock"],
)
def test_valid_endpoints(endpoint: str) -> None:
    assert validate_endpoint(endpoint) == endpoint


@pytest.mark.parametrize(
    "endpoint",
    [
        "127.0.0.1:5557",
        "udp://127.0.0.1:5557",
        "tcp://127.0.0.1",
        "tcp://127.0.0.1:0",
        "tcp://127.0.0.1:65536",
        "tcp://127.0.0.1:x",
        "tcp://*:5557",
        "tcp://127.0.0.1:*",
        "tcp://:5557",
        "inproc://x",
        "ipc://",
        "tcp://a b:1",
        "tcp://[::1:5557",
    ],
)
def test_invalid_connect_endpoints(endpoint: str) -> None:
    with pytest.raises(ValueError):
        validate_endpoint(endpoint)


def test_bind_endpoints_allow_wildcards() -> None:
    assert validate_endpoint("tcp://*:5557", bind=True)
    assert validate_endpoint("tcp://127.0.0.1:*", bind=True)
    with pytest.raises(ValueError):
        validate_endpoint("tcp://127.0.0.1:0", bind=True)


@pytest.mark.parametrize("version", VLLM_VERSIONS)
def test_capture_replay_frames_parse(version: str) -> None:
    capture = load_vllm_capture(version)
    exchange = capture["replay_from_seq_2_of_first_pod"]
    assert build_request(2) == [base64.b64decode(f) for f in exchange["request_frames_b64"]]
    replies = [parse_reply([base64.b64decode(f) for f in fr]) for fr in exchange["reply_frames_b64"]]
    assert [r.seq for r in replies] == [2, 3, 4, 5, None]
    live = {m["seq"]: m["frames"] for m in capture["messages"] if m["pod"] == exchange["pod"]}
    for reply in replies[:-1]:
        assert reply.seq is not None
        assert reply.payload == live[reply.seq][2]
        four_frames = tuple(int(x) for x in version.split(".")[:2]) >= (0, 26)
        assert (reply.topic == live[reply.seq][0]) if four_frames else reply.topic is None


@pytest.mark.parametrize(
    "frames",
    [
        [b"", b"\x00" * 8],
        [b"", b"t", b"\x00" * 8, b"p", b"x"],
        [b"x", b"\x00" * 8, b"p"],
        [b"", b"\x00" * 7, b"p"],
        [b"", b"topic", b"\x00" * 9, b"p"],
    ],
)
def test_bad_replay_frames(frames: list[bytes]) -> None:
    with pytest.raises(ValueError):
        parse_reply(frames)
