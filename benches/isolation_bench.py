"""``/score`` latency while the service ingests KV events: idle, steady ingest, flood, one run.

The real service runs as its own process (``benches/serving.py``), filled over ZMQ. One
open-loop client (``benches/http_load.py``) sends 2,048-token-id ``/score`` bodies at a fixed
rate for the whole run, while ``benches/ingest_publisher.py --schedule`` (its own process,
real vLLM 0.33-shaped batches over ZMQ TCP) alternates phases:

* ``idle``   the publisher is silent;
* ``steady`` it paces itself to ``--ingest-rate`` blocks/s (default 100k);
* ``flood``  it sends as fast as the service takes them (last: it leaves a backlog).

Idle and steady windows alternate ``--rounds`` times, so a change in the shared machine's load
hits both alike. Each request is assigned to the phase it was due in (the publisher reports
its windows on the same monotonic clock; ``GUARD`` seconds at each edge are left out). Per
phase: p50/p99/max, the blocks/s the publisher sent (ZMQ buffers part of a flood), the
batches/s the service applied (``/pods``, sampled each second) and the ingest push-back
counters the service counted; ratios are p99 / idle p99. Results go to ``benches/out/isolation[-VARIANT].json``
(folded into REPORT.md by ``benches/report.py``). ``--env KEY=VALUE`` passes settings to the
service, so options can be compared:

    .venv/bin/python benches/isolation_bench.py
    .venv/bin/python benches/isolation_bench.py --variant one-shard --env KVINDEX_INDEX__SHARDS=1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from benches.conftest import write_result
from benches.http_load import run_open_loop
from benches.serving import Service, fill, token_id_bodies

PUBLISHER = Path(__file__).with_name("ingest_publisher.py")
GUARD = 0.5
"""Seconds left out at each phase edge (ZMQ and queue backlog crossing the edge)."""


def _counters(base: str) -> dict[str, float]:
    """The ingest push-back counters from /metrics."""
    out: dict[str, float] = {}
    for line in httpx.get(f"{base}/metrics", timeout=60).text.splitlines():
        name, _, value = line.partition(" ")
        if not name.startswith("#") and ("pushback" in name or "throttl" in name):
            out[name] = float(value)
    return out


class AppliedSampler(threading.Thread):
    """Samples the batches the service applied (``/pods``) once a second, with the time."""

    def __init__(self, base: str) -> None:
        super().__init__(daemon=True)
        self.base, self.done = base, threading.Event()
        self.samples = [(time.monotonic(), self._applied())]

    def _applied(self) -> int:
        pods = httpx.get(f"{self.base}/pods", timeout=60).json()["pods"]
        return sum(p["batches_applied"] for p in pods)

    def run(self) -> None:
        while not self.done.wait(1.0):
            self.samples.append((time.monotonic(), self._applied()))

    def rate(self, lo: float, hi: float) -> float:
        """Batches/s applied between the first and last samples inside [lo, hi]."""
        inside = [(t, n) for t, n in self.samples if lo <= t <= hi]
        if len(inside) < 2:
            return float("nan")
        (t0, n0), (t1, n1) = inside[0], inside[-1]
        return (n1 - n0) / (t1 - t0)


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 1) if values else float("nan")


def _pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return round(values[min(len(values) - 1, int(p * len(values)))] * 1000, 3) if values else float("nan")


def measure(service: Service, bodies: list[bytes], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    plan = [("idle", 0.0), ("steady", args.ingest_rate)] * args.rounds + [("idle", 0.0), ("flood", -1.0)]
    schedule = ",".join(("max" if r < 0 else f"{r:g}") + f":{args.seconds:g}" for _, r in plan)
    pub = subprocess.Popen(
        [sys.executable, str(PUBLISHER), "--connect", service.zmq, "--schedule", schedule],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert pub.stdout is not None
    json.loads(pub.stdout.readline())  # {"ready": t}: subscribed; the first (idle) phase begins
    c0 = _counters(service.url)
    sampler = AppliedSampler(service.url)
    sampler.start()
    total = args.seconds * len(plan)
    res = asyncio.run(run_open_loop(f"{service.url}/score", bodies, rate=args.rate, duration=total, warmup=0.5))
    stdout, _ = pub.communicate(timeout=300)
    sampler.done.set()
    sampler.join()
    c1 = _counters(service.url)
    windows = json.loads(stdout.strip().splitlines()[-1])["phases"]
    phases: dict[str, dict[str, Any]] = {}
    for (name, _), win in zip(plan, windows, strict=True):
        lo, hi = win["start"] + GUARD, win["end"] - GUARD
        ph = phases.setdefault(name, {"lat": [], "blocks": 0, "seconds": 0.0, "applied": []})
        ph["lat"] += [lat for due, lat in zip(res.dues_s, res.latencies_s, strict=True) if lo <= due < hi]
        ph["applied"].append(sampler.rate(win["start"], win["end"]))
        ph["blocks"] += win["blocks"]
        ph["seconds"] += win["end"] - win["start"]
    out: dict[str, dict[str, Any]] = {}
    for name, ph in phases.items():
        lat = ph["lat"]
        out[name] = {
            "requests": len(lat),
            "p50_ms": _pct(lat, 0.5),
            "p99_ms": _pct(lat, 0.99),
            "max_ms": _pct(lat, 1.0),
            "publisher_blocks_per_s": round(ph["blocks"] / ph["seconds"]),
            "applied_batches_per_s": _mean([r for r in ph["applied"] if r == r]),
        }
    out["flood"].update({k: v - c0.get(k, 0.0) for k, v in c1.items()})  # whole run; flood dominates
    out["all"] = {"errors": res.errors, "requests": res.sent}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=200.0, help="/score requests per second")
    ap.add_argument("--seconds", type=float, default=6.0, help="seconds per phase window")
    ap.add_argument("--rounds", type=int, default=3, help="idle/steady window pairs")
    ap.add_argument("--ingest-rate", type=float, default=100_000.0, help="blocks/s of the steady phase")
    ap.add_argument("--variant", default="", help="suffix of the result file (isolation-VARIANT.json)")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="a service setting")
    args = ap.parse_args(argv)
    env = dict(kv.split("=", 1) for kv in args.env)
    command = "python benches/isolation_bench.py " + shlex.join(argv if argv is not None else sys.argv[1:])

    with tempfile.TemporaryDirectory() as tmp:
        service = Service(Path(tmp), env=env)
        try:
            chains = fill(service, random.Random(11))
            bodies = [json.dumps(b).encode() for b in token_id_bodies(chains, random.Random(5))]
            phases = measure(service, bodies, args)
        finally:
            service.stop()
    idle = phases["idle"]["p99_ms"]
    flat: dict[str, Any] = {
        "command": command.strip(),
        "score_rate_rps": args.rate,
        "steady_ingest_blocks_per_s": args.ingest_rate,
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "cores": len(os.sched_getaffinity(0)),
    }
    for name, data in phases.items():
        flat.update({f"{name}/{k}": v for k, v in data.items() if isinstance(v, int | float)})
        if "p99_ms" in data:
            flat[f"{name}/p99_over_idle_p99"] = round(data["p99_ms"] / idle, 2)
    write_result("isolation" + (f"-{args.variant}" if args.variant else ""), flat)
    for name in ("idle", "steady", "flood"):
        d = phases[name]
        print(
            f"{name:7s} p50 {d['p50_ms']:8.2f} ms  p99 {d['p99_ms']:8.2f} ms  (x{d['p99_ms'] / idle:.2f} idle)"
            f"  {d['requests']} requests, publisher {d['publisher_blocks_per_s']:,} blocks/s,"
            f" applied {d['applied_batches_per_s']:,.0f} batches/s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
