"""Benchmarks run only under `make bench` (pytest-benchmark enabled); they never assert on time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).parent / "out"


def write_result(name: str, data: dict[str, Any]) -> Path:
    """Merge `data` into benches/out/<name>.json, which benches/report.py folds into REPORT.md."""
    OUT.mkdir(exist_ok=True)
    path = OUT / f"{name}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    old.update(data)
    path.write_text(json.dumps(old, indent=2, sort_keys=True))
    return path
