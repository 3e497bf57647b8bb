"""``benches/compare.py`` (make bench-compare): what counts as a regression, and the exit code."""

from __future__ import annotations

import json
from pathlib import Path

from benches import compare


def _table(path: Path, medians: dict[str, float], machine: str = "m") -> Path:
    path.write_text(json.dumps({"machine": machine, "medians_s": medians}))
    return path


def test_regressions_past_the_tolerance_are_named_with_their_change() -> None:
    base = {"a": 1.0e-3, "b": 2.0e-3, "c": 1.0e-6, "gone": 1.0}
    now = {"a": 1.5e-3, "b": 2.1e-3, "c": 0.5e-6, "new": 1.0}
    lines, regressions = compare.compare(base, now, 0.25)
    assert regressions == 1
    assert lines[0].startswith("a ") and "+50.0%" in lines[0] and "REGRESSED" in lines[0]
    assert "REGRESSED" not in "".join(lines[1:])
    assert any("c" in ln and "improved" in ln for ln in lines)
    assert any(ln.startswith("gone") and "only in the baseline" in ln for ln in lines)
    assert any(ln.startswith("new") and "no baseline" in ln for ln in lines)


def test_exit_codes(tmp_path: Path) -> None:
    base = _table(tmp_path / "base.json", {"a": 1.0})
    assert compare.main(["compare", str(base), str(_table(tmp_path / "ok.json", {"a": 1.1}))]) == 0
    assert compare.main(["compare", str(base), str(_table(tmp_path / "bad.json", {"a": 2.0}))]) == 1
    assert compare.main(["compare", str(tmp_path / "missing.json"), str(base)]) == 2


def test_snapshot_reads_pytest_benchmark_json(tmp_path: Path) -> None:
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"benchmarks": [{"fullname": "benches/test_x.py::test_y", "stats": {"median": 0.5}}]}))
    out = tmp_path / "snap.json"
    assert compare.main(["snapshot", str(out), "--pytest", str(run)]) == 0
    data = json.loads(out.read_text())
    assert data["medians_s"] == {"py:test_x.py::test_y": 0.5}
    assert data["machine"] == compare.machine()
