"""The real service as its own process, filled over real ZMQ: shared by the HTTP benches.

``Service`` starts ``python -m kvindex_service serve`` on an ephemeral port (JSON logs on
stderr, read for the bound HTTP and ZMQ addresses) with optional ``KVINDEX_*`` overrides;
``fill`` publishes 16 pods x 100 stored prompts of 2,048 tokens (8 shared 1,024-token system
prompts + a per-request part) and waits until they are applied; ``token_id_bodies`` are
2,048-token ``/score`` bodies sharing 64-128 leading blocks with a stored prompt.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import msgpack
import zmq

__all__ = ["CHAIN_TOKENS", "MODEL", "PODS", "Service", "fill", "token_id_bodies", "words"]

ROOT = Path(__file__).resolve().parents[1]
MODEL = "meta-llama/Llama-3.2-3B-Instruct"
PODS = [f"10.0.2.{i}:8000" for i in range(1, 17)]
SYSTEM_PROMPTS = 8
CHAINS_PER_POD = 100
SYSTEM_TOKENS = 1024
CHAIN_TOKENS = 2048


class Service:
    def __init__(self, tmp: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> None:
        self.log_path = tmp / "serve.log"
        self._log = self.log_path.open("w")
        full = {k: v for k, v in os.environ.items() if not k.startswith("KVINDEX_")}
        full["PYTHONPATH"] = str(ROOT)
        full["KVINDEX_ZMQ__VERIFY_PEER"] = "false"  # the benches publish 10.x pods from loopback
        full.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvindex_service", "serve", "--host", "127.0.0.1", "--port", "0",
             "--zmq-bind", "tcp://127.0.0.1:*", "--hash-seed", "42", "--log-json", *args],
            env=full, stdout=subprocess.DEVNULL, stderr=self._log,
        )  # fmt: skip
        self.url = self._find(r'"http":"(http://127\.0\.0\.1:\d+)"')
        self.zmq = self._find(r'"zmq_bind":"(tcp://127\.0\.0\.1:\d+)"')

    def _find(self, pattern: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.log_path.read_text())
            if m:
                return m.group(1)
            assert self.proc.poll() is None, self.log_path.read_text()
            time.sleep(0.05)
        raise TimeoutError(pattern)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._log.close()


def fill(service: Service, rng: random.Random) -> list[list[int]]:
    """Publish every pod's stored prompts; returns the stored chains (token ids)."""
    systems = [
        [128000] + [rng.randrange(1000, 120_000) for _ in range(SYSTEM_TOKENS - 1)] for _ in range(SYSTEM_PROMPTS)
    ]
    chains: list[list[int]] = []
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        for pod in PODS:
            pub = ctx.socket(zmq.XPUB)
            pub.setsockopt(zmq.SNDHWM, 0)
            pub.connect(service.zmq)
            assert pub.poll(10_000, zmq.POLLIN)
            pub.recv()
            topic = f"kv@{pod}@{MODEL}".encode()
            for seq in range(CHAINS_PER_POD):
                tokens = systems[rng.randrange(SYSTEM_PROMPTS)] + [
                    rng.randrange(1000, 120_000) for _ in range(CHAIN_TOKENS - SYSTEM_TOKENS)
                ]
                chains.append(tokens)
                n = len(tokens) // 16
                event = ["BlockStored", [rng.getrandbits(64) for _ in range(n)], None, tokens, 16, None, "GPU"]
                pub.send_multipart([topic, seq.to_bytes(8, "big"), msgpack.packb([time.time(), [event], 0])])
            pub.close(linger=10_000)
    finally:
        ctx.term()
    with httpx.Client(base_url=service.url, timeout=30) as c:
        deadline = time.monotonic() + 300
        while True:
            pods = c.get("/pods").json()["pods"]
            if sum(p["batches_applied"] for p in pods) >= len(PODS) * CHAINS_PER_POD:
                break
            assert time.monotonic() < deadline, "fill not applied"
            time.sleep(0.2)
        while c.get("/readyz").status_code != 200:
            time.sleep(0.05)
    return chains


def token_id_bodies(chains: list[list[int]], rng: random.Random, n: int = 200) -> list[dict[str, Any]]:
    """``n`` /score bodies of CHAIN_TOKENS token ids, each sharing 64, 96 or 128 leading
    blocks with a stored prompt."""
    bodies = []
    for _ in range(n):
        base = chains[rng.randrange(len(chains))]
        keep = rng.choice([64, 96, 128]) * 16
        tokens = base[:keep] + [rng.randrange(1000, 120_000) for _ in range(CHAIN_TOKENS - keep)]
        bodies.append({"model": MODEL, "token_ids": tokens})
    return bodies


def words(rng: random.Random, n: int) -> str:
    """``n`` made-up words (about two Llama 3 tokens each): text prompts of a known size."""
    vocab = ["shipment", "depot", "pallet", "north", "route", "carrier", "invoice", "customs", "freight",
             "warehouse", "priority", "delay", "schedule", "manifest", "container", "refrigerated"]  # fmt: skip
    return " ".join(f"{rng.choice(vocab)}{rng.randrange(100)}" for _ in range(n))
