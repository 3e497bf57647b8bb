"""Shared index on Redis vs the in-memory index vs llm-d's Redis layout, in one run.

Measures, on a redis-server this script starts (loopback, its own port and directory):

- ``/score`` over HTTP (a real uvicorn server per backend): 2k and 8k tokens, every block held
  by ``--pods`` pods (the longest walk), median and p99 of ``--requests`` sequential requests;
- the lookup alone: the core (memory), ``RedisIndex.score`` (one EVALSHA that stops at the
  first block no pod extends), and llm-d's layout (one Redis hash per block key, pod entries as
  fields, one pipelined ``HKEYS`` per key, the prefix computed client-side);
- ingestion in blocks/s: vLLM-shaped batches (one ``BlockStored`` of 16 blocks) through the
  core, through ``RedisIndex.apply_batch`` and through llm-d's layout (pipelined ``HSET`` per
  block plus the engine-hash -> key mapping);
- Redis memory per entry (``INFO memory`` used_memory before/after), both layouts.

Usage: python benches/redis_bench.py --out benches/out/redis-bench.json (``make bench-redis``).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import msgpack
import redis
import uvicorn

from kvindex_service._native import Indexer
from kvindex_service.api import create_app
from kvindex_service.backends import parse_backend
from kvindex_service.backends.redis_index import RedisIndex
from kvindex_service.config import Settings
from kvindex_service.runtime import Runtime

MODEL = "bench-model"
SEED = "42"


@contextmanager
def redis_server() -> Iterator[int]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    with tempfile.TemporaryDirectory(prefix="kvindex-redis-bench-") as d:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", d, "--save", "", "--appendonly", "no"]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            c = redis.Redis(port=port)
            for _ in range(500):
                try:
                    c.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.02)
            yield port
        finally:
            proc.terminate()
            proc.wait(10)


@contextmanager
def http_server(settings: Settings) -> Iterator[tuple[str, Runtime]]:
    app = create_app(settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on"))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield url, app.state.runtime
    finally:
        server.should_exit = True
        t.join(30)
        sock.close()


def timings(fn: Callable[[], Any], n: int) -> dict[str, float]:
    for _ in range(min(20, n)):
        fn()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return {"median_us": statistics.median(samples) * 1e6, "p99_us": samples[int(len(samples) * 0.99) - 1] * 1e6}


# -- llm-d's layout, reproduced from its description: hash per block key, fields = pod entries --
class LlmdLayout:
    def __init__(self, client: redis.Redis) -> None:
        self.c = client

    def _key(self, model: str, k: int) -> str:
        return f"{model}@{k}"

    def add(self, pod: str, model: str, engine: list[int], keys: list[int], tier: str) -> None:
        pipe = self.c.pipeline(transaction=False)
        for e, k in zip(engine, keys, strict=True):
            pipe.hset(self._key(model, k), f"{pod}@{tier}", time.time())
            pipe.set(f"engine:{model}@{e}", k)
        pipe.execute()

    def score(self, model: str, keys: list[int]) -> dict[str, int]:
        pipe = self.c.pipeline(transaction=False)
        for k in keys:
            pipe.hkeys(self._key(model, k))
        out: dict[str, int] = {}
        alive: set[str] | None = None
        for fields in pipe.execute():
            pods = {f.decode().rsplit("@", 1)[0] for f in fields}
            alive = pods if alive is None else alive & pods
            if not alive:
                break
            for p in alive:
                out[p] = out.get(p, 0) + 1
        return out


def used_memory(c: redis.Redis) -> int:
    return int(c.info("memory")["used_memory"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benches/out/redis-bench.json")
    ap.add_argument("--pods", type=int, default=8)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--ingest-batches", type=int, default=2000)
    ap.add_argument("--memory-entries", type=int, default=200_000)
    args = ap.parse_args()
    rng = random.Random(7)
    prompts = {n: [rng.randrange(1, 128_000) for _ in range(n)] for n in (2048, 8192)}
    pods = [f"10.0.0.{i}:8000" for i in range(args.pods)]
    report: dict[str, Any] = {
        "command": "python benches/redis_bench.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
        "pods": args.pods,
    }
    with redis_server() as port:
        raw = redis.Redis(port=port)
        url = f"redis://127.0.0.1:{port}/0"
        report["redis_version"] = raw.info("server")["redis_version"]
        backend_url = parse_backend(url)
        assert backend_url is not None
        mem = Indexer(hash_seed=SEED)
        rx = RedisIndex(backend_url, hash_seed=SEED, timeout=5.0)
        llmd = LlmdLayout(raw)
        keys = {n: mem.block_keys(t) for n, t in prompts.items()}
        for n in prompts:
            for p in pods:
                mem.add_blocks(p, MODEL, keys[n])
                rx.add(p, MODEL, keys[n])
                llmd.add(p, MODEL, keys[n], keys[n], "GPU")

        # -- the lookup alone -------------------------------------------------------------
        lookup: dict[str, Any] = {}
        for n, toks in prompts.items():
            ks = keys[n]
            lookup[str(n)] = {
                "memory": timings(lambda t=toks: mem.score(MODEL, t), args.requests),
                "redis": timings(lambda t=toks: rx.score(MODEL, t), args.requests),
                "llmd_layout": timings(lambda t=toks: llmd.score(MODEL, mem.block_keys(t)), args.requests),
            }
            assert {s.pod: s.matched_blocks for s in rx.score(MODEL, toks).scores} == llmd.score(MODEL, ks)
        report["lookup"] = lookup

        # -- /score over HTTP -----------------------------------------------------------------
        http: dict[str, Any] = {}
        base = {"http": {"host": "127.0.0.1", "port": 0}, "zmq": {"bind": None}}
        for name, index in (
            ("memory", {"hash_seed": SEED}),
            ("redis", {"hash_seed": SEED, "backend": url, "backend_timeout": 2.0}),
        ):
            settings = Settings.model_validate({**base, "index": index})
            with http_server(settings) as (srv, runtime), httpx.Client(base_url=srv, timeout=10) as c:
                if name == "memory":  # this server's own index gets the same entries
                    own = runtime.require_indexer()
                    for n in prompts:
                        for p in pods:
                            own.add_blocks(p, MODEL, keys[n])
                for n, toks in prompts.items():
                    body = {"model": MODEL, "token_ids": toks}
                    got = c.post("/score", json=body).json()
                    assert got["scores"][0]["matched_blocks"] == n // 16 and not got["degraded"], got
                    http.setdefault(str(n), {})[name] = timings(lambda b=body: c.post("/score", json=b), args.requests)
        report["http_score"] = http

        # -- ingestion ------------------------------------------------------------------------
        raw.flushall()
        batches = []
        for i in range(args.ingest_batches):
            toks = [rng.randrange(1, 128_000) for _ in range(256)]
            ks = mem.block_keys(toks)
            ev = ["BlockStored", ks, None, toks, 16, None, "GPU"]
            batches.append((pods[i % len(pods)], bytes(msgpack.packb([time.time(), [ev], 0])), ks))
        blocks = sum(len(b[2]) for b in batches)
        ingest: dict[str, float] = {}
        fresh = Indexer(hash_seed=SEED, shards=1)
        t0 = time.perf_counter()
        for pod, payload, _ in batches:
            fresh.apply(pod, MODEL, payload)
        ingest["memory_blocks_per_s"] = blocks / (time.perf_counter() - t0)
        fresh.close()
        m0 = used_memory(raw)
        t0 = time.perf_counter()
        for pod, payload, _ in batches:
            rx.apply_batch(pod, MODEL, payload)
        ingest["redis_blocks_per_s"] = blocks / (time.perf_counter() - t0)
        m1 = used_memory(raw)
        raw.flushall()
        m2 = used_memory(raw)
        t0 = time.perf_counter()
        for pod, _, ks in batches:
            llmd.add(pod, MODEL, ks, ks, "GPU")
        ingest["llmd_layout_blocks_per_s"] = blocks / (time.perf_counter() - t0)
        m3 = used_memory(raw)
        report["ingest"] = {**ingest, "blocks": blocks, "batches": len(batches)}
        report["memory_per_entry_bytes"] = {"redis": (m1 - m0) / blocks, "llmd_layout": (m3 - m2) / blocks}
        rx.close()
        mem.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


def markdown(r: dict[str, Any]) -> str:
    lines = [f"Command: `{r['command']}` — Redis {r['redis_version']}, {r['pods']} pods holding every block", ""]
    lines += ["| tokens | path | memory median / p99 (µs) | Redis median / p99 (µs) | llm-d layout median / p99 (µs) |",
              "|---|---|---|---|---|"]  # fmt: skip
    for n, row in r["lookup"].items():
        cells = [f"{row[k]['median_us']:.0f} / {row[k]['p99_us']:.0f}" for k in ("memory", "redis", "llmd_layout")]
        lines.append(f"| {n} | lookup | " + " | ".join(cells) + " |")
    for n, row in r["http_score"].items():
        cells = [f"{row[k]['median_us']:.0f} / {row[k]['p99_us']:.0f}" for k in ("memory", "redis")]
        lines.append(f"| {n} | HTTP /score | " + " | ".join(cells) + " | — |")
    ing, mem = r["ingest"], r["memory_per_entry_bytes"]
    lines += ["", "| | memory | Redis | llm-d layout |", "|---|---|---|---|",
              f"| ingestion (blocks/s) | {ing['memory_blocks_per_s']:,.0f} | {ing['redis_blocks_per_s']:,.0f} | "
              f"{ing['llmd_layout_blocks_per_s']:,.0f} |",
              f"| Redis memory per entry (bytes) | — | {mem['redis']:.0f} | {mem['llmd_layout']:.0f} |", ""]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
