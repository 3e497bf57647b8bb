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
    for src in sorted(OUT.glob("*.json")):
        if src.name == "pytest-benchmark.json":
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
