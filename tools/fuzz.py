"""Coverage-guided fuzzing (atheris, i.e. libFuzzer) of what arrives from the network.

Targets, each run in its own process for a fixed time (``make fuzz``; not part of ``make test``):

* ``decode``: raw bytes as a ZMQ payload through ``Indexer.apply`` (the msgpack decoder and
  the event application), seeded with every payload of the captured vLLM fixtures. The index
  must stay within ``max_keys`` / ``max_pods_per_key`` and its tier table within its bounds.
* ``body``: raw bytes as an HTTP request body through ``parse_body`` for every JSON request
  model of the API (``/score``, the llm-d and Mooncake compatibility routes, ``POST /pods``).
  Only MalformedJSONError (400) and ValidationError (422) may come out.

Coverage feedback comes from the Python layers (validators, request models, the binding); the
Rust core is not instrumented, so the decoder is reached through mutations of real payloads.
Any other exception, or a broken bound, is a crash: libFuzzer writes the input to
``crash-*`` in the working directory.

    python tools/fuzz.py [--seconds 60] [--target decode|body|all] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT.parent / "shared" / "fixtures" / "vllm"
MAX_KEYS, MAX_PODS_PER_KEY = 512, 4
PODS = ("10.0.0.1:8000", "10.0.0.2:8000", "pod-c", "pod-d")


def seed_payloads() -> list[bytes]:
    out = []
    for path in sorted(FIXTURES.glob("vllm-*.json")):
        for msg in json.loads(path.read_text())["messages"]:
            out.append(base64.b64decode(msg["frames_b64"][-1]))
    return out


SEED_BODIES = [
    b'{"model": "m", "token_ids": [1, 2, 3]}',
    b'{"model": "m", "prompt": "hello", "pods": ["a"]}',
    b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}',
    b'{"prompt": "x", "model": "m"}',
    b'{"model": "m", "token_ids": [1], "lora_name": "l", "block_size": 16, "medium": ["GPU"]}',
    b'{"model": "m", "block_hashes": [1, 2]}',
    b'{"pod": "10.0.0.9:8000", "endpoint": "tcp://10.0.0.9:5557"}',
]


def run_decode(argv: list[str]) -> None:
    import atheris  # type: ignore[import-untyped]

    with atheris.instrument_imports():
        from kvindex_service import Indexer

    ix = Indexer(block_size=16, max_keys=MAX_KEYS, max_pods_per_key=MAX_PODS_PER_KEY, shards=1)
    runs = [0]
    seeds = seed_payloads()

    @atheris.instrument_func  # type: ignore[untyped-decorator]
    def outcome(res: Any) -> None:
        # The Rust core is not instrumented: these branches are the feedback that keeps the
        # inputs reaching each outcome in the corpus.
        if res.events and res.stored_blocks > 4:
            pass
        if res.events and res.stored_blocks:
            pass
        if res.events and res.removed_blocks:
            pass
        if res.events and res.cleared:
            pass
        if res.events and res.unknown_parents:
            pass
        if res.events and res.decode_errors:
            pass
        if res.decode_errors:
            pass
        if res.unknown_event_types:
            pass
        if res.dp_rank is not None:
            pass

    def mutate(data: bytes, max_size: int, seed: int) -> bytes:
        # half of the time start again from a real vLLM payload
        if seed % 2 == 0:
            data = seeds[(seed >> 1) % len(seeds)]
        return bytes(atheris.Mutate(data, max(max_size, len(data))))

    def one(data: bytes) -> None:
        pod = PODS[data[-1] % len(PODS)] if data else PODS[0]
        outcome(ix.apply(pod, "m", data, runs[0]))
        runs[0] += 1
        if runs[0] % 256 == 0:
            st = ix.stats()
            assert st.keys <= MAX_KEYS and st.entries <= MAX_KEYS * MAX_PODS_PER_KEY, st
            for p in PODS:
                state = ix.pod_state(p)
                assert state is None or len(state.blocks_by_tier) <= 16, state

    atheris.Setup(argv, one, custom_mutator=mutate)
    atheris.Fuzz()


def run_body(argv: list[str]) -> None:
    import atheris

    with atheris.instrument_imports():
        from pydantic import BaseModel, ValidationError

        from kvindex_service.api.body import MalformedJSONError, parse_body
        from kvindex_service.api.routes import compat, pods
        from kvindex_service.scoring import ScoreRequest

    models: list[type[BaseModel]] = [
        ScoreRequest,
        compat.LlmdCompletionsRequest,
        compat.LlmdChatRequest,
        compat.QueryRequest,
        compat.QueryByHashRequest,
        pods.AddPodRequest,
    ]
    loop = asyncio.new_event_loop()

    class Body:
        def __init__(self, data: bytes) -> None:
            self.data = data

        async def body(self) -> bytes:
            return self.data

    def one(data: bytes) -> None:
        model = models[data[0] % len(models)] if data else models[0]
        try:
            loop.run_until_complete(parse_body(Body(data[1:]), model))  # type: ignore[arg-type]
        except (MalformedJSONError, ValidationError):
            pass

    atheris.Setup(argv, one)
    atheris.Fuzz()


def corpus(kind: str, workdir: Path) -> Path:
    d = workdir / f"corpus-{kind}"
    d.mkdir(parents=True, exist_ok=True)
    seeds: list[bytes] = seed_payloads() if kind == "decode" else [bytes([i]) + b for i, b in enumerate(SEED_BODIES)]
    for i, s in enumerate(seeds):
        (d / f"seed-{i:04d}").write_bytes(s)
    return d


def main(args: Any = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=int, default=60, help="per target")
    p.add_argument("--target", choices=("decode", "body", "all"), default="all")
    p.add_argument("--workdir", type=Path, default=None, help="corpus and crash files (default: a temp dir)")
    p.add_argument("--child", choices=("decode", "body"), help=argparse.SUPPRESS)
    ns, rest = p.parse_known_args(args)
    if ns.child:
        (run_decode if ns.child == "decode" else run_body)([sys.argv[0], *rest])
        return 0
    workdir = ns.workdir or Path(tempfile.mkdtemp(prefix="kvindex-fuzz-"))
    targets = ("decode", "body") if ns.target == "all" else (ns.target,)
    failed = []
    for kind in targets:
        d = corpus(kind, workdir)
        cmd = [sys.executable, __file__, "--child", kind, f"-max_total_time={ns.seconds}", "-timeout=10",
               "-rss_limit_mb=2048", f"-artifact_prefix={workdir}/{kind}-", "-print_final_stats=1", str(d)]  # fmt: skip
        print(f"fuzz {kind}: {ns.seconds} s, corpus {d}", flush=True)
        rc = subprocess.run(cmd, cwd=workdir).returncode
        if rc != 0:
            failed.append(kind)
            print(f"fuzz {kind}: FAILED (exit {rc}); inputs in {workdir}", flush=True)
    print("fuzz: " + (f"crashes in {', '.join(failed)}" if failed else "no crash"), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
