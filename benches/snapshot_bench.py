"""Warm restart figures: snapshot size, write and load time at N (key, pod) entries, the
longest shard-lock hold and score latency while writing, and start-to-ready of
``kvindex serve --snapshot-file`` against a cold start.

Run by hand (not in ``make test``; minutes and GiBs at 10M entries)::

    .venv/bin/python benches/snapshot_bench.py --entries 10000000
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from kvindex_service import Indexer
from kvindex_service.snapshot import write_file

ROOT = Path(__file__).resolve().parents[1]
MODEL = "bench/model"


def capacity(entries: int) -> int:
    """Room for every key: shards fill unevenly, so a full index would evict a few."""
    return entries + entries // 8


def build(entries: int, pods: int) -> Indexer:
    ix = Indexer(hash_seed="42", max_keys=capacity(entries))
    step = max(1, min(1_000_000, entries // (4 * pods)))
    for i, start in enumerate(range(0, entries, step)):
        ix.add_blocks(f"10.0.0.{i % pods}:8000", MODEL, range(start, min(start + step, entries)))
    return ix


def write_while_scoring(ix: Indexer, path: str) -> tuple[dict[str, float], float]:
    """Write the snapshot while another thread scores; the slowest score seen meanwhile."""
    stop = threading.Event()
    worst = 0.0

    def score() -> None:
        nonlocal worst
        keys = list(range(1000, 1064))
        while not stop.is_set():
            t0 = time.perf_counter()
            ix.score_keys(MODEL, keys)
            worst = max(worst, time.perf_counter() - t0)

    t = threading.Thread(target=score)
    t.start()
    try:
        info = write_file(ix, path)
    finally:
        stop.set()
        t.join()
    return info, worst


def start_to_ready(args: list[str]) -> tuple[float, float]:
    """Seconds from spawning ``kvindex serve`` to /readyz 200, and from SIGTERM to exit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVINDEX_")}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvindex_service", "serve", "--host", "127.0.0.1", "--port", "0",
         "--zmq-bind", "tcp://127.0.0.1:*", "--hash-seed", "42", "--log-json", *args],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    url = None
    while url is None:
        line = proc.stderr.readline()
        if not line:
            raise RuntimeError("serve exited before serving HTTP")
        m = re.search(r'"http":"(http://[^"]+)"', line)
        url = m.group(1) if m else None
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    with httpx.Client(base_url=url, timeout=5.0) as c:
        while c.get("/readyz").status_code != 200:
            time.sleep(0.01)
    ready = time.perf_counter() - t0
    t1 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    proc.wait(300)
    return ready, time.perf_counter() - t1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--entries", type=int, default=10_000_000)
    p.add_argument("--pods", type=int, default=8)
    p.add_argument("--dir", default=None, help="where the snapshot file goes (default: a temp dir)")
    a = p.parse_args()
    out: dict[str, float] = {"entries": a.entries}
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        path = str(Path(d) / "kvindex.snapshot")
        t0 = time.perf_counter()
        ix = build(a.entries, a.pods)
        out["build_s"] = round(time.perf_counter() - t0, 2)
        out["index_bytes"] = ix.stats().bytes_used
        info, worst = write_while_scoring(ix, path)
        out |= {"snapshot_bytes": info["bytes"], "write_s": info["seconds"]}
        out |= {"max_lock_hold_ms": info["max_lock_hold_ms"], "max_score_ms_during_write": round(worst * 1e3, 2)}
        ix.close()
        del ix
        fresh = Indexer(hash_seed="42", max_keys=capacity(a.entries))
        t0 = time.perf_counter()
        loaded = fresh.load_snapshot_file(path)
        out["load_s"] = round(time.perf_counter() - t0, 2)
        assert loaded["entries"] == a.entries, loaded
        fresh.close()
        del fresh
        max_keys = ["--config", str(Path(d) / "bench.yaml")]
        (Path(d) / "bench.yaml").write_text(f"index: {{max_keys: {capacity(a.entries)}}}\n")
        out["cold_start_to_ready_s"], _ = (round(x, 2) for x in start_to_ready(max_keys))
        ready, stop = start_to_ready([*max_keys, "--snapshot-file", path])
        out["warm_start_to_ready_s"], out["sigterm_to_exit_with_write_s"] = round(ready, 2), round(stop, 2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
