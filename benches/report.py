"""Fold every benchmark result into benches/out/REPORT.md.

Sources: criterion's estimates (target/criterion/**/new/estimates.json, medians) and the
JSON files the pytest-benchmark suites write into benches/out/.
"""

from __future__ import annotations

import json
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benches" / "out"


def _fmt(v: object) -> str:
    if isinstance(v, float):
        if abs(v) >= 1e6:
            return f"{v / 1e6:,.2f} M"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.3g}"
    return str(v)


def criterion_rows() -> list[tuple[str, float]]:
    rows = []
    for est in sorted((ROOT / "target" / "criterion").glob("**/new/estimates.json")):
        bench = est.parent.parent.relative_to(ROOT / "target" / "criterion")
        median_ns = json.loads(est.read_text())["median"]["point_estimate"]
        rows.append((str(bench), median_ns))
    return rows


def isolation_table(name: str, data: dict[str, Any]) -> list[str]:
    """``benches/isolation_bench.py``: /score latency per ingest phase, ratios to idle."""
    lines = ["", f"## {name}: `/score` under ingest (`{data.get('command', '')}`)", ""]
    lines += [
        "| phase | p50 | p99 | p99 / idle p99 | requests | publisher blocks/s | applied batches/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for phase in ("idle", "steady", "flood"):
        if f"{phase}/p99_ms" not in data:
            continue
        lines.append(
            f"| {phase} | {data[f'{phase}/p50_ms']:.2f} ms | {data[f'{phase}/p99_ms']:.2f} ms "
            f"| {data[f'{phase}/p99_over_idle_p99']:.2f}x | {data[f'{phase}/requests']} "
            f"| {data[f'{phase}/publisher_blocks_per_s']:,} | {data.get(f'{phase}/applied_batches_per_s', '')} |"
        )
    extra = {k: v for k, v in data.items() if "pushback" in k or "throttl" in k}
    if extra:
        lines += ["", "Ingest push-back during the run: " + ", ".join(f"`{k}` {_fmt(v)}" for k, v in extra.items())]
    return lines


def http_native_table(data: dict[str, Any]) -> list[str]:
    """``benches/http_native_bench.py``: oha, open loop, per case and rate."""
    lines = ["", f"## `/score` under a native load generator (oha; `{data.get('command', '')}`)", ""]
    lines += ["| case | rate | achieved | p50 | p99 | non-200 | oha CPU share |", "|---|---|---|---|---|---|---|"]
    for key in sorted(k for k in data if k.endswith("/p50_ms")):
        case, rate, _ = key.split("/")
        pre = f"{case}/{rate}"
        lines.append(
            f"| {case} | {rate.removesuffix('rps')} req/s | {data[pre + '/achieved_rps']:,.0f} "
            f"| {data[pre + '/p50_ms']:.2f} ms | {data[pre + '/p99_ms']:.2f} ms | {data[pre + '/non_200']} "
            f"| {data[pre + '/generator_cpu_share']:.1%} |"
        )
    for key in sorted(k for k in data if k.endswith("/max_rps_p99_le_5ms")):
        lines.append(f"\nHighest rate holding p99 <= 5 ms, {key.split('/')[0]}: {data[key]:g} req/s")
    return lines


def main() -> int:
    OUT.mkdir(exist_ok=True)
    lines = [
        "# kvindex benchmark report",
        "",
        f"Generated {datetime.now(UTC):%Y-%m-%d %H:%M UTC} on {platform.machine()}, "
        f"Python {platform.python_version()}, {len(__import__('os').sched_getaffinity(0))} cores. "
        "Medians; the machine is shared, so compare ratios rather than absolute values.",
        "",
        "## Rust core (criterion, `make bench-rust`)",
        "",
        "| bench | median |",
        "|---|---|",
    ]
    for name, ns in criterion_rows():
        unit = f"{ns / 1000:.1f} µs" if ns < 1e6 else f"{ns / 1e6:.2f} ms"
        lines.append(f"| {name} | {unit} |")
    for src in sorted(OUT.glob("isolation*.json")):
        lines += isolation_table(src.stem, json.loads(src.read_text()))
    native = OUT / "http-native.json"
    if native.exists():
        lines += http_native_table(json.loads(native.read_text()))
    for src in sorted(OUT.glob("*.json")):
        if src.name in ("pytest-benchmark.json", "http-native.json") or src.name.startswith(("isolation", "compare")):
            continue
        data = json.loads(src.read_text())
        lines += [
            "",
            f"## {src.stem} (`benches/`, pytest-benchmark and load runs)",
            "",
            "| metric | value |",
            "|---|---|",
        ]
        for k, v in sorted(data.items()):
            if isinstance(v, (int, float, str)):
                lines.append(f"| {k} | {_fmt(v)} |")
    (OUT / "REPORT.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT / 'REPORT.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
