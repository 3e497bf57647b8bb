"""``/score`` over HTTP driven by a native open-loop load generator (``oha``), not a Python client.

The real service runs as its own process (``benches/serving.py``), filled over ZMQ. ``oha``
sends a fixed request rate (``-q``, open loop, with ``--latency-correction`` so a request
that had to wait for a connection counts from when it was due) for ``--seconds`` per step:

* ``token_ids``  2,048-token-id bodies sharing 64-128 leading blocks with stored prompts;
* ``text_seen``  a ~4k-token text prompt already in the prefix store.

Per case and rate: p50/p99, the achieved rate, non-200 answers, and the load generator's own
CPU share (its user + system CPU seconds over the wall time, from ``getrusage`` of the child:
the machine's other core-seconds are what the service had). Then the highest rate of
``--search`` whose p99 stays <= 5 ms. Results: ``benches/out/http-native.json`` (REPORT.md).

    make bench-http       # or: .venv/bin/python benches/http_native_bench.py [--oha PATH]

``oha`` comes from crates.io (``cargo install oha --locked``); the script looks for it on PATH
and in ``~/.cargo/bin``, and says how to get it when it is missing (exit 2).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benches.conftest import write_result
from benches.serving import MODEL, Service, fill, token_id_bodies, words

P99_BOUND_MS = 5.0


def find_oha(given: str | None) -> str | None:
    if given:
        return given
    return shutil.which("oha") or next((str(p) for p in [Path.home() / ".cargo" / "bin" / "oha"] if p.exists()), None)


def run_oha(oha: str, url: str, body: Path, rate: float, seconds: float, connections: int) -> dict[str, Any]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    proc = subprocess.run(
        [oha, url, "-m", "POST", "-T", "application/json", "-D", str(body), "-q", f"{rate:g}",
         "-z", f"{seconds:g}s", "-c", str(connections), "--latency-correction", "--no-tui",
         "--output-format", "json"],
        capture_output=True, text=True, check=True, timeout=seconds + 120,
    )  # fmt: skip
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    data = json.loads(proc.stdout)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    lat = data["latencyPercentiles"]
    statuses = data.get("statusCodeDistribution", {})
    return {
        "rate_rps": rate,
        "achieved_rps": round(data["summary"]["requestsPerSec"], 1),
        "p50_ms": round(lat["p50"] * 1000, 3),
        "p99_ms": round(lat["p99"] * 1000, 3),
        "non_200": sum(v for k, v in statuses.items() if k != "200"),
        "generator_cpu_share": round(cpu / wall / (os.cpu_count() or 1), 3),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--oha", help="path of the oha binary")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--rates", default="500,1000,2000", help="the table's rates (req/s)")
    ap.add_argument("--search", default="250,500,750,1000,1500,2000,3000", help="rates tried for the p99 bound")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="a service setting")
    args = ap.parse_args(argv)
    oha = find_oha(args.oha)
    if oha is None:
        print("http_native_bench: oha not found; install it with `cargo install oha --locked`", file=sys.stderr)
        return 2
    env = dict(kv.split("=", 1) for kv in args.env)
    rates = [float(r) for r in args.rates.split(",")]
    search = [float(r) for r in args.search.split(",")]
    results: dict[str, Any] = {"command": "python benches/http_native_bench.py " + " ".join(argv or sys.argv[1:])}
    with tempfile.TemporaryDirectory() as tmp:
        service = Service(Path(tmp), env=env)
        try:
            chains = fill(service, random.Random(11))
            url = f"{service.url}/score"
            ids = Path(tmp, "token_ids.json")
            ids.write_text(json.dumps(token_id_bodies(chains, random.Random(5), n=1)[0]))
            text = Path(tmp, "text_seen.json")
            prompt = words(random.Random(9), 1950) + "\nQuestion: which depot ships first?"
            text.write_text(json.dumps({"model": MODEL, "prompt": prompt}))
            tokens = httpx.post(url, content=text.read_bytes(), timeout=60).json()["total_tokens"]  # now seen
            results["text_seen/prompt_tokens"] = tokens
            for case, body in (("token_ids_2048", ids), ("text_seen", text)):
                for rate in rates:
                    r = run_oha(oha, url, body, rate, args.seconds, args.connections)
                    results.update({f"{case}/{rate:g}rps/{k}": v for k, v in r.items() if k != "rate_rps"})
                    print(case, json.dumps(r), flush=True)
                best = 0.0
                for rate in search:
                    r = run_oha(oha, url, body, rate, args.seconds, args.connections)
                    print(case, "search", json.dumps(r), flush=True)
                    if r["p99_ms"] > P99_BOUND_MS or r["non_200"] or r["achieved_rps"] < 0.95 * rate:
                        break
                    best = rate
                results[f"{case}/max_rps_p99_le_5ms"] = best
        finally:
            service.stop()
    write_result("http-native", results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
