"""Capture vLLM's own publisher sending a hybrid-attention model's KV events.

vLLM's allocator for hybrid models (gpt-oss, Gemma 3, Llama 4: full-attention layers plus
sliding-window layers) keeps one KV-cache group per attention type and publishes every store
and removal per group (``group_idx``, vLLM >= 0.20), with the group's kind and window on
stores (``kv_cache_spec_kind``, ``kv_cache_spec_sliding_window``, vLLM >= 0.22). Its engine
core needs torch and a GPU; its event code does not. This script loads
``vllm/distributed/kv_events.py`` from the vLLM wheel as it is (``KVEventBatch``,
``BlockStored``, ``BlockRemoved``, ``AllBlocksCleared``, ``ZmqEventPublisher``), with small
stand-ins for the modules it imports that need torch or a running engine (logger, config
class, network helpers, the ``ExternalBlockHash`` alias), and has one publisher per pod send
the events of a scripted two-group pod life (group 0 ``full_attention``, group 1
``sliding_window`` of 32 tokens, block size 16, the kind strings of vLLM's
``KVCacheSpecKind``) to a real ZMQ SUB socket. Block hashes and token ids are vLLM's own, taken
from ``tests/fixtures/vllm/vllm-0.33.0.json`` (seed 42, ``sha256_cbor``).

``expect_after[pod][prompt]`` is the hit vLLM's ``HybridKVCacheCoordinator`` gives after each
message, worked out by hand in ``SCRIPT`` below (the tests check it against their own
reference of the rule and against the index).

    python3 -m venv /tmp/gen && /tmp/gen/bin/pip install msgspec pyzmq
    pip download --no-deps -d /tmp/whl vllm==0.33.0
    /tmp/gen/bin/python tools/vllm_hybrid_fixture.py /tmp/whl/vllm-0.33.0-*.whl \\
        tests/fixtures/hybrid/vllm-0.33.0-hybrid.json
"""

from __future__ import annotations

import base64
import json
import logging
import re
import sys
import time
import types
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "tests" / "fixtures" / "vllm" / "vllm-0.33.0.json"
# the token ids are Llama 3.2 ids; the index keys on tokens, the model only names a key space
MODEL = "hybrid-swa-demo"
WINDOW = 32
BLOCK = 16
PODS = ("10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000")


def load_vllm_events(wheel: Path) -> types.ModuleType:
    """``vllm.distributed.kv_events`` from the wheel, its torch-bound imports stood in for."""

    def module(name: str, **attrs: Any) -> types.ModuleType:
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        m.__path__ = []  # a package, so submodules resolve
        sys.modules[name] = m
        return m

    @dataclass
    class KVEventsConfig:  # the fields of vllm/config/kv_events.py, without vLLM's config decorator
        enable_kv_cache_events: bool = False
        publisher: str | None = None
        endpoint: str = "tcp://*:5557"
        replay_endpoint: str | None = None
        buffer_steps: int = 10_000
        hwm: int = 100_000
        max_queue_size: int = 100_000
        topic: str = ""

    def split_zmq_path(path: str) -> tuple[str, str, str]:
        scheme, rest = path.split("://", 1)
        host, _, port = rest.rpartition(":")
        return scheme, host, port

    for pkg in ("vllm", "vllm.config", "vllm.utils", "vllm.v1", "vllm.v1.core", "vllm.distributed"):
        module(pkg)
    module("vllm.config.kv_events", KVEventsConfig=KVEventsConfig)
    module("vllm.logger", init_logger=logging.getLogger)
    module(
        "vllm.utils.network_utils",
        get_ip=lambda: "127.0.0.1",
        get_tcp_uri=lambda ip, port: f"tcp://{ip}:{port}",
        is_valid_ipv6_address=lambda ip: ":" in ip,
        split_zmq_path=split_zmq_path,
    )
    # vllm/v1/core/kv_cache_utils.py: `ExternalBlockHash: TypeAlias = bytes | int`
    module("vllm.v1.core.kv_cache_utils", ExternalBlockHash=bytes | int)
    with zipfile.ZipFile(wheel) as z:
        source = z.read("vllm/distributed/kv_events.py").decode()
        version = next(m[1] for n in z.namelist() if (m := re.fullmatch(r"vllm-([^/]+)\.dist-info/METADATA", n)))
    events = module("vllm.distributed.kv_events")
    events.__dict__["__version__"] = version
    exec(compile(source, "vllm/distributed/kv_events.py", "exec"), events.__dict__)
    return events


def script(ev: types.ModuleType, tokens: dict[str, list[int]], hashes: dict[str, list[int]]) -> list[Any]:
    """(pod, events, expect_after) per message. Hits by vLLM's rule with a 32-token window
    (cdiv(32 - 1, 16) = 2 blocks): P1 has 6 blocks, P2 5; they share blocks 0-1."""

    def stored(prompt: str, lo: int, hi: int, group: int) -> Any:
        kind, window = ("full_attention", None) if group == 0 else ("sliding_window", WINDOW)
        return ev.BlockStored(
            block_hashes=hashes[prompt][lo:hi],
            parent_block_hash=hashes[prompt][lo - 1] if lo else None,
            token_ids=tokens[prompt][lo * BLOCK : hi * BLOCK],
            block_size=BLOCK,
            lora_id=None,
            medium="GPU",
            lora_name=None,
            group_idx=group,
            kv_cache_spec_kind=kind,
            kv_cache_spec_sliding_window=window,
        )

    def removed(prompt: str, blocks: list[int], group: int) -> Any:
        return ev.BlockRemoved(block_hashes=[hashes[prompt][i] for i in blocks], medium="GPU", group_idx=group)

    def both(prompt: str, lo: int, hi: int) -> list[Any]:
        return [stored(prompt, lo, hi, 0), stored(prompt, lo, hi, 1)]

    a, b, c = PODS
    return [
        # A: a prefill of P1's first 4 blocks, then the rest, in both groups
        (a, both("P1", 0, 4), {"P1": 4, "P2": 2}),
        (a, both("P1", 4, 6), {"P1": 6, "P2": 2}),
        # A: the sliding group frees blocks 0-3 (outside the window of a hit at 6): P1 keeps
        # its hit; P2's hit at 2 needed its window (blocks 0-1) in the sliding group: gone
        (a, [removed("P1", [0, 1, 2, 3], 1)], {"P1": 6, "P2": 0}),
        # A: P2's own blocks 2-4 in both groups (parent: the shared block 1)
        (a, both("P2", 2, 5), {"P1": 6, "P2": 5}),
        # B: all of P1 in both groups, then full attention evicts blocks 4-5: the hit shortens
        # to 4, whose window (blocks 2-3) the sliding group still holds
        (b, both("P1", 0, 6), {"P1": 6, "P2": 2}),
        (b, [removed("P1", [4, 5], 0)], {"P1": 4, "P2": 2}),
        # C: P2 in both groups, then full attention evicts all of it: the sliding group alone
        # holds P2 and no hit is left
        (c, both("P2", 0, 5), {"P1": 2, "P2": 5}),
        (c, [removed("P2", [0, 1, 2, 3, 4], 0)], {"P1": 0, "P2": 0}),
        # A: everything cleared
        (a, [ev.AllBlocksCleared()], {"P1": 0, "P2": 0}),
    ]


def main() -> None:
    import msgspec
    import zmq

    wheel, out = Path(sys.argv[1]), Path(sys.argv[2])
    ev = load_vllm_events(wheel)
    source = json.loads(SOURCE.read_text())
    tokens, hashes = source["prompts"], source["vllm_block_hashes"]
    ctx = zmq.Context.instance()
    # each publisher binds as vLLM's default endpoint does (tcp://*:0: the node's IP, a free port)
    publishers = {
        pod: ev.ZmqEventPublisher(data_parallel_rank=0, endpoint="tcp://*:0", topic=f"kv@{pod}@{MODEL}") for pod in PODS
    }
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    for p in publishers.values():
        sub.connect(p.get_publisher_config().endpoint)
    time.sleep(1.0)  # let the subscription reach every publisher before publishing
    expect: dict[str, dict[str, int]] = {pod: {"P1": 0, "P2": 0} for pod in PODS}
    messages = []
    for pod, events, after in script(ev, tokens, hashes):
        publishers[pod].publish(ev.KVEventBatch(ts=time.time(), events=events))
        if not sub.poll(5000):
            raise SystemExit("no message from the publisher")
        frames = sub.recv_multipart()
        expect[pod] = after
        messages.append(
            {
                "pod": pod,
                "frames_b64": [base64.b64encode(f).decode() for f in frames],
                "topic": frames[0].decode(),
                "seq": int.from_bytes(frames[1], "big"),
                "decoded": msgspec.msgpack.decode(frames[2]),
                "expect_after": json.loads(json.dumps(expect)),
            }
        )
    for p in publishers.values():
        p.shutdown()
    sub.close(linger=0)
    fixture = {
        "what": "Frames received by a ZMQ SUB from vLLM's own ZmqEventPublisher for a hybrid-attention pod "
        "(group 0 full attention, group 1 sliding window), with vLLM's own block hashes",
        "vllm_version": ev.__version__,
        "made_by": "tools/vllm_hybrid_fixture.py",
        "hash_algo": source["hash_algo"],
        "pythonhashseed": source["pythonhashseed"],
        "block_size": BLOCK,
        "model": MODEL,
        "tokenizer_model": source["model"],
        "groups": [
            {"group_idx": 0, "kv_cache_spec_kind": "full_attention", "kv_cache_spec_sliding_window": None},
            {"group_idx": 1, "kv_cache_spec_kind": "sliding_window", "kv_cache_spec_sliding_window": WINDOW},
        ],
        "prompts": tokens,
        "vllm_block_hashes": hashes,
        "messages": messages,
        "expect_note": "expect_after[pod][prompt] = the hit (blocks) vLLM's HybridKVCacheCoordinator gives "
        "the prompt on that pod after the message (full prompt length as the bound)",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"{out}: {len(messages)} messages from vLLM {ev.__version__}")


if __name__ == "__main__":
    main()
