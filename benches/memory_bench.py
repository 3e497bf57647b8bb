"""Index memory per (key, pod) entry: process RSS growth and ``Indexer.stats().bytes_used``,
at 1, 1.5, 2 and 8 pods per key, each averaged over 0.5M, 0.75M, 1M and 1.25M random keys
(so the steps of table growth average out). Every point runs in a fresh process.

Run by hand (not in ``make test``; a few minutes, up to ~1 GiB)::

    .venv/bin/python benches/memory_bench.py

``--native PATH.so`` measures another build of the core (for example the previous layout,
built with ``cargo build --release --features python --lib`` from an older checkout) and
stores its figures under ``before_``; the numbers go to benches/out/memory.json.
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


def child(keys: int, per_key: float, path: str | None) -> dict[str, float]:
    """Fill one index in this process; the RSS it grew by and what it says it uses."""
    mod = native(path)
    ix = mod.Indexer(max_keys=keys + keys // 8, key_memo=0)
    rng = random.Random(keys)
    # warm the allocator with one chunk's worth of Python objects before the baseline
    warm = [rng.getrandbits(64) for _ in range(CHUNK)]
    del warm
    gc.collect()
    before = rss()
    whole, frac = int(per_key), per_key - int(per_key)
    for start in range(0, keys, CHUNK):
        batch: list[list[int]] = [[] for _ in range(PODS)]
        for j in range(start, min(start + CHUNK, keys)):
            k = rng.getrandbits(64)
            n = whole + (1 if rng.random() < frac else 0)
            first = rng.randrange(PODS)
            for p in range(n):
                batch[(first + p) % PODS].append(k)
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--native", help="path of another build's _native .so (figures stored as before_)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(int(a.child[0]), float(a.child[1]), a.native)))
        return 0
    prefix = "before_" if a.native else ""
    out: dict[str, Any] = json.loads(OUT.read_text()) if OUT.exists() else {}
    for per_key in SHARING:
        m = measure(per_key, a.native)
        tag = f"{per_key:g}pods"
        out[f"{prefix}rss_bytes_per_entry_{tag}"] = round(m["rss"], 1)
        out[f"{prefix}stats_bytes_per_entry_{tag}"] = round(m["used"], 1)
        out[f"{prefix}stats_over_rss_{tag}"] = round(m["used"] / m["rss"], 3)
    out["command"] = "python benches/memory_bench.py [--native OLD.so]"
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(json.dumps(out, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
