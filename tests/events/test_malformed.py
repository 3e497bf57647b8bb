"""Bad input from the network is counted and skipped; every other pod carries on."""

from __future__ import annotations

import msgpack

from kvindex_service.events import PodEndpoint
from tests.conftest import load_vllm_capture
from tests.events.helpers import Rig, check_expect

BAD_POD = "10.0.0.9:8000"
MODEL = "meta-llama/Llama-3.2-3B-Instruct"


def _seq(n: int) -> bytes:
    return n.to_bytes(8, "big")


# Frame-level garbage: never reaches the core.
FRAME_GARBAGE: list[tuple[str, list[bytes]]] = [
    ("frames", [b"kv@10.0.0.1:8000@m", _seq(0)]),
    ("frames", [b"kv@10.0.0.1:8000@m", _seq(0), b"\x93", b"extra"]),
    ("seq", [f"kv@{BAD_POD}@{MODEL}".encode(), b"\x00" * 7, b"\x90"]),
    ("seq", [f"kv@{BAD_POD}@{MODEL}".encode(), b"", b"\x90"]),
    ("topic", [b"kv@\xff\xfe\xfd@model", _seq(0), b"\x90"]),
    ("topic", [b"kv@no-model", _seq(0), b"\x90"]),
    ("topic", [b"kv@@model", _seq(0), b"\x90"]),
]

# Payload-level garbage, in sequence for one pod: the core counts decode errors.
PAYLOAD_GARBAGE: list[bytes] = [
    b"",
    msgpack.packb([1.0, [{"type": "BlockStored", "block_hashes": [1, 2]}], 0])[:-3],  # truncated
    msgpack.packb("not a batch"),
    msgpack.packb([1.0, "events?", 0]),
    msgpack.packb([1.0, [["BlockStored", "hashes", None, "tokens", 16]], 0]),  # wrong types
    msgpack.packb(
        [1.0, [{"type": "BlockStored", "block_hashes": [1], "token_ids": [1] * 16, "block_size": "sixteen"}], 0]
    ),
    b"\x93\xcb" + b"\x00" * 8 + b"\xdd\xff\xff\xff\xff",  # claims 4 billion events
    b"\x93\xcb" + b"\x00" * 8 + b"\x91\xdf\xff\xff\xff\xff",  # an event map of 4 billion keys
    msgpack.packb(
        [1.0, [{"type": "BlockStored", "block_hashes": list(range(200_000)), "token_ids": [], "block_size": 16}], 0]
    ),  # huge array, wrong length
    b"\xc1" * 32,  # never-used msgpack byte
]


def test_garbage_is_counted_and_skipped_in_bind_mode(rig: Rig) -> None:
    capture = load_vllm_capture("0.24.0")
    ix = rig.indexer(capture)
    sub = rig.subscriber(ix, bind="tcp://127.0.0.1:*")
    pub = rig.bound_publisher(sub)
    bad = rig.bound_publisher(sub)
    after_probes = sub.stats()
    garbage = iter(FRAME_GARBAGE)
    payloads = iter(enumerate(PAYLOAD_GARBAGE))
    for msg in capture["messages"]:
        # Interleave garbage between every real message, from another connection.
        for _ in range(2):
            frame_bad = next(garbage, None)
            if frame_bad is not None:
                bad.send_wait(sub, frame_bad[1])
            payload_bad = next(payloads, None)
            if payload_bad is not None:
                seq, payload = payload_bad
                bad.send_wait(sub, [f"kv@{BAD_POD}@{MODEL}".encode(), _seq(seq), payload])
        pub.send_wait(sub, msg["frames"])
        check_expect(ix, capture, msg["expect_after"])
    for seq, payload in payloads:
        bad.send_wait(sub, [f"kv@{BAD_POD}@{MODEL}".encode(), _seq(seq), payload])

    stats = sub.stats()
    for reason in ("frames", "seq", "topic"):
        expected = sum(1 for r, _ in FRAME_GARBAGE if r == reason)
        assert stats[f"malformed_{reason}"] - after_probes[f"malformed_{reason}"] == expected
    assert stats["internal_errors"] == stats["submit_errors"] == 0
    assert stats["messages_applied"] == len(capture["messages"]) + len(PAYLOAD_GARBAGE)
    assert sub.running
    bad_state = sub.pod_state(BAD_POD)
    assert bad_state is not None
    # All but the huge token-less store are decode errors; that one is a well-formed
    # store of blocks the core cannot place (no tokens, unknown hashes), which it counts.
    assert bad_state["decode_errors"] == len(PAYLOAD_GARBAGE) - 1
    assert bad_state["malformed_messages"] == 2  # the two bad seq frames
    assert bad_state["blocks_by_tier"].get("GPU", 0) == 0
    assert bad_state["gaps"] == 0 and bad_state["last_seq"] == len(PAYLOAD_GARBAGE) - 1
    for pod in ("10.0.0.1:8000", "10.0.0.2:8000"):
        good = sub.pod_state(pod)
        assert good is not None
        assert good["decode_errors"] == 0 and good["malformed_messages"] == 0


def test_garbage_on_a_named_connect_endpoint_is_attributed_to_its_pod(rig: Rig) -> None:
    capture = load_vllm_capture("0.11.0")
    ix = rig.indexer(capture)
    pub = rig.publisher()
    # the probe itself is a one-frame message
    sub = rig.subscriber(ix, pods=[PodEndpoint(pub.endpoint, pod_id="pod-a")], probe=[pub])
    for _, frames in FRAME_GARBAGE:
        pub.send_wait(sub, frames)
    state = sub.pod_state("pod-a")
    assert state is not None
    # With an explicit pod id, everything on the connection is that pod's (+1: the probe).
    assert state["malformed_messages"] == len(FRAME_GARBAGE) + 1
    first = [m for m in capture["messages"] if m["pod"] == "10.0.0.1:8000"][0]
    pub.send_wait(sub, first["frames"])
    check_expect(
        ix, capture, {"10.0.0.1:8000": first["expect_after"]["10.0.0.1:8000"]}, rename={"10.0.0.1:8000": "pod-a"}
    )


def test_oversized_message_drops_only_that_connection(rig: Rig) -> None:
    """A message over max_message_bytes makes libzmq drop the connection before the message is
    buffered; the pod reconnects and later messages flow again."""
    capture = load_vllm_capture("0.26.0")
    ix = rig.indexer(capture)
    big = rig.publisher()
    other = rig.publisher()
    pods = [PodEndpoint(big.endpoint), PodEndpoint(other.endpoint)]
    sub = rig.subscriber(ix, pods=pods, max_message_bytes=64 * 1024, probe=[big, other])
    received = sub.stats()["messages_received"]
    probes = sub.stats()["malformed_frames"]
    big.send([f"kv@{BAD_POD}@{MODEL}".encode(), _seq(0), b"\x00" * (1024 * 1024)])
    msgs = capture["messages"]
    second = [m for m in msgs if m["pod"] == "10.0.0.2:8000"]
    other.send_wait(sub, second[0]["frames"])
    # The big connection reconnects and re-subscribes; probing waits for that.
    big.probe(sub)
    first = [m for m in msgs if m["pod"] == "10.0.0.1:8000"][0]
    big.send_wait(sub, first["frames"])
    check_expect(ix, capture, {"10.0.0.1:8000": first["expect_after"]["10.0.0.1:8000"]})
    assert sub.pod_state(BAD_POD) is None  # the oversized message never got in
    stats = sub.stats()
    assert stats["messages_applied"] == 2
    assert stats["reconnects"] >= 1  # re-dialled after libzmq dropped the link
    # Everything received since is one of the two real messages or a probe.
    assert stats["messages_received"] - received == 2 + stats["malformed_frames"] - probes
    check_expect(ix, capture, {"10.0.0.2:8000": second[0]["expect_after"]["10.0.0.2:8000"]})
