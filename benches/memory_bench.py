"""Index memory per (key, pod) entry: process RSS growth and ``Indexer.stats().bytes_used``,
at 1, 1.5, 2 and 8 pods per key, each averaged over 0.5M, 0.75M, 1M and 1.25M random keys
(so the steps of table growth average out). Every point runs in a fresh process.

Run by hand (not in ``make test``; a few minutes, up to ~1 GiB)::

    .venv/bin/python benches/memory_bench.py

``--native PATH.so`` measures another build of the core (for example the previous layout,
built with ``cargo build --release --features python --lib`` from an older checkout) and
stores its figures under ``before_``; the numbers go to benches/out/memory.json.

``--eviction`` measures eviction quality instead: the hit ratio of prefix lookups under a
``max_keys`` bound, replaying /work/shared/traces/mooncake-synthetic.jsonl (each request
scored, then stored on the best pod of 8) and a Zipf(1.0) stream of single blocks over 1M ids
(looked up; stored on a miss). Compare with the same run under ``--native``.
"""

from __future__ import annotations

import argparse
import gc
import importlib.machinery
import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benches" / "out" / "memory.json"
MODEL = "bench/model"
PODS = 16
CHUNK = 1 << 16
SIZES = (500_000, 750_000, 1_000_000, 1_250_000)
SHARING = (1.0, 1.5, 2.0, 8.0)
TRACE = Path("/work/shared/traces/mooncake-synthetic.jsonl")
TRACE_BOUNDS = (4096, 8192, 16384)
ZIPF_BOUNDS = (8192, 32768)


def native(path: str | None) -> ModuleType:
    if path is None:
        from kvindex_service import _native

        return _native
    loader = importlib.machinery.ExtensionFileLoader("_native", path)
    spec = importlib.util.spec_from_file_location("_native", path, loader=loader)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def chunk(rng: random.Random, n: int, per_key: float) -> list[list[int]]:
    """`n` random keys as one list per pod: each on `per_key` pods (a fraction: on average)."""
    whole, frac = int(per_key), per_key - int(per_key)
    batch: list[list[int]] = [[] for _ in range(PODS)]
    for _ in range(n):
        k = rng.getrandbits(64)
        first = rng.randrange(PODS)
        for p in range(whole + (1 if rng.random() < frac else 0)):
            batch[(first + p) % PODS].append(k)
    return batch


def child(keys: int, per_key: float, path: str | None) -> dict[str, float]:
    """Fill one index in this process; the RSS it grew by and what it says it uses."""
    mod = native(path)
    ix = mod.Indexer(max_keys=keys + keys // 8, key_memo=0)
    # one chunk built and dropped first: the baseline holds Python's own peak for a chunk
    warm = chunk(random.Random(0), CHUNK, per_key)
    del warm
    gc.collect()
    before = rss()
    rng = random.Random(keys)
    for start in range(0, keys, CHUNK):
        batch = chunk(rng, min(CHUNK, keys - start), per_key)
        for p, ks in enumerate(batch):
            if ks:
                ix.add_blocks(f"10.0.0.{p}:8000", MODEL, ks)
        del batch
    gc.collect()
    grown = rss() - before
    st = ix.stats()
    return {"entries": st.entries, "keys": st.keys, "rss": grown, "bytes_used": st.bytes_used}


def measure(per_key: float, path: str | None) -> dict[str, float]:
    rss_pe, used_pe = [], []
    for keys in SIZES:
        cmd = [sys.executable, __file__, "--child", str(keys), str(per_key)]
        if path:
            cmd += ["--native", path]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        rss_pe.append(r["rss"] / r["entries"])
        used_pe.append(r["bytes_used"] / r["entries"])
        print(f"  {keys:>9,} keys x {per_key} pods: {rss_pe[-1]:5.1f} B/entry RSS, "
              f"{used_pe[-1]:5.1f} B/entry bytes_used", file=sys.stderr)  # fmt: skip
    return {"rss": sum(rss_pe) / len(rss_pe), "used": sum(used_pe) / len(used_pe)}


def replay_trace(mod: ModuleType, max_keys: int) -> float:
    """Blocks found by prefix lookups over all blocks asked for, replaying the trace."""
    ix = mod.Indexer(max_keys=max_keys, key_memo=0, algorithm="xxh3")
    hit = total = 0
    for n, line in enumerate(TRACE.read_text().splitlines()):
        keys = [h * 0x9E3779B97F4A7C15 % (1 << 64) for h in json.loads(line)["hash_ids"]]
        scores = ix.score_keys(MODEL, keys).scores
        hit += scores[0].matched_blocks if scores else 0
        total += len(keys)
        ix.add_blocks(scores[0].pod if scores else f"10.0.0.{n % 8}:8000", MODEL, keys)
    return hit / total


def replay_zipf(mod: ModuleType, max_keys: int, n: int = 300_000) -> float:
    """Hit ratio of single-block lookups drawn from Zipf(1.0) over 1M ids (stored on a miss)."""
    ix = mod.Indexer(max_keys=max_keys, key_memo=0, algorithm="xxh3")
    rng = random.Random(5)
    ids = 1_000_000
    cum, acc = [], 0.0
    for i in range(1, ids + 1):
        acc += 1.0 / i
        cum.append(acc)
    hits = 0
    for k in rng.choices(range(ids), cum_weights=cum, k=n):
        key = [k * 0x9E3779B97F4A7C15 % (1 << 64) + 1]
        if ix.score_keys(MODEL, key).scores:
            hits += 1
        else:
            ix.add_blocks("10.0.0.1:8000", MODEL, key)
    return hits / n


def eviction(path: str | None, out: dict[str, Any], prefix: str) -> None:
    mod = native(path)
    for bound in TRACE_BOUNDS:
        out[f"{prefix}hit_ratio_mooncake_{bound}keys"] = round(replay_trace(mod, bound), 4)
    for bound in ZIPF_BOUNDS:
        out[f"{prefix}hit_ratio_zipf_{bound}keys"] = round(replay_zipf(mod, bound), 4)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--native", help="path of another build's _native .so (figures stored as before_)")
    ap.add_argument("--eviction", action="store_true", help="measure eviction quality, not memory")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(int(a.child[0]), float(a.child[1]), a.native)))
        return 0
    prefix = "before_" if a.native else ""
    out: dict[str, Any] = json.loads(OUT.read_text()) if OUT.exists() else {}
    for per_key in () if a.eviction else SHARING:
        m = measure(per_key, a.native)
        tag = f"{per_key:g}pods"
        out[f"{prefix}rss_bytes_per_entry_{tag}"] = round(m["rss"], 1)
        out[f"{prefix}stats_bytes_per_entry_{tag}"] = round(m["used"], 1)
        out[f"{prefix}stats_over_rss_{tag}"] = round(m["used"] / m["rss"], 3)
    if a.eviction:
        eviction(a.native, out, prefix)
    out["command"] = "python benches/memory_bench.py [--eviction] [--native OLD.so]"
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(json.dumps(out, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
