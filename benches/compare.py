"""Latency tracking: compare a benchmark run with the committed baseline, print what regressed.

Both sides are medians: pytest-benchmark's JSON (``--benchmark-json``; per benchmark
``stats.median`` in seconds) and criterion's estimates (``target/criterion/**/new/
estimates.json``, nanoseconds), folded into one ``{name: median_seconds}`` table. Lower is
better for every entry. A case is a regression when ``now / baseline - 1`` exceeds the
tolerance; cases on one side only are listed, not judged.

    python benches/compare.py snapshot OUT.json [--pytest RUN.json] [--criterion]
    python benches/compare.py compare BASELINE.json NOW.json [--tolerance 25]

``make bench-baseline`` writes ``benches/baseline/<machine>.json``; ``make bench-compare`` runs
the same benchmarks and compares (exit 1 on a regression past ``BENCH_TOLERANCE`` percent).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def machine() -> str:
    """The baseline file's name: numbers only compare on the same kind of machine."""
    import os

    return f"{platform.machine()}-{len(os.sched_getaffinity(0))}cpu-py{platform.python_version_tuple()[1]}"


def pytest_medians(path: Path) -> dict[str, float]:
    data = json.loads(path.read_text())
    return {f"py:{b['fullname'].removeprefix('benches/')}": b["stats"]["median"] for b in data["benchmarks"]}


def criterion_medians(root: Path = ROOT / "target" / "criterion") -> dict[str, float]:
    out = {}
    for est in sorted(root.glob("**/new/estimates.json")):
        name = str(est.parent.parent.relative_to(root))
        out[f"rs:{name}"] = json.loads(est.read_text())["median"]["point_estimate"] / 1e9
    return out


def compare(base: dict[str, float], now: dict[str, float], tolerance: float) -> tuple[list[str], int]:
    """Report lines and the number of regressions."""
    lines, regressions = [], 0
    rows = []
    for name in sorted(base.keys() & now.keys()):
        change = now[name] / base[name] - 1 if base[name] > 0 else 0.0
        rows.append((change, name))
    width = max((len(n) for _, n in rows), default=10)
    for change, name in sorted(rows, reverse=True):
        mark = "REGRESSED" if change > tolerance else ("improved" if change < -tolerance else "")
        regressions += change > tolerance
        lines.append(f"{name:<{width}}  {_t(base[name]):>10} -> {_t(now[name]):>10}  {change:+7.1%}  {mark}")
    for name in sorted(base.keys() - now.keys()):
        lines.append(f"{name:<{width}}  only in the baseline")
    for name in sorted(now.keys() - base.keys()):
        lines.append(f"{name:<{width}}  new (no baseline)")
    return lines, regressions


def _t(seconds: float) -> str:
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    snap = sub.add_parser("snapshot", help="fold a run's medians into one JSON table")
    snap.add_argument("out", type=Path)
    snap.add_argument("--pytest", type=Path, help="a pytest-benchmark --benchmark-json file")
    snap.add_argument("--criterion", action="store_true", help="criterion's latest estimates under target/")
    cmp = sub.add_parser("compare", help="print what regressed; exit 1 if anything did")
    cmp.add_argument("baseline", type=Path)
    cmp.add_argument("now", type=Path)
    cmp.add_argument("--tolerance", type=float, default=25.0, help="percent slower that counts as a regression")
    args = ap.parse_args(argv)
    if args.cmd == "snapshot":
        table: dict[str, float] = {}
        if args.pytest:
            table.update(pytest_medians(args.pytest))
        if args.criterion:
            table.update(criterion_medians())
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine(), "medians_s": table}, indent=1, sort_keys=True) + "\n")
        print(f"wrote {len(table)} medians to {args.out}", file=sys.stderr)
        return 0
    try:
        base = json.loads(args.baseline.read_text())
    except FileNotFoundError:
        print(f"no baseline {args.baseline}: run `make bench-baseline` on this machine first", file=sys.stderr)
        return 2
    now = json.loads(args.now.read_text())
    if base["machine"] != now["machine"]:
        print(f"note: baseline from {base['machine']}, this run on {now['machine']}", file=sys.stderr)
    lines, regressions = compare(base["medians_s"], now["medians_s"], args.tolerance / 100)
    print("\n".join(lines))
    print(f"{regressions} regression(s) past {args.tolerance:g}% against {args.baseline}")
    return 1 if regressions else 0


if __name__ == "__main__":
    raise SystemExit(main())
