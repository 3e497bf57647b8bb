"""`kvindex simulate` end to end: real ZMQ events into kvindex, decisions through the real
Envoy picker, compared with the baselines on one request stream."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kvindex_service.sim.cli import main
from kvindex_service.sim.report import strip_wall_clock

ARGS = [
    "--workload", "shared-prefix", "--pods", "3", "--duration", "15", "--rate", "6",
    "--groups", "12", "--system-tokens", "512", "--question-tokens", "64", "--output-tokens", "16",
    "--pod-capacity", "160", "--quiet",
]  # fmt: skip


def _run(tmp_path: Path, name: str, *extra: str) -> dict[str, Any]:
    out = tmp_path / f"{name}.json"
    assert main([*ARGS, "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _run(
        tmp_path_factory.mktemp("sim"), "a", "--seed", "5", "--plot", str(tmp_path_factory.getbasetemp() / "sim.png")
    )


def test_kvindex_beats_round_robin_and_tracks_the_oracle(report: dict[str, Any]) -> None:
    r = report["routers"]
    assert set(r) >= {"random", "round-robin", "session-sticky", "least-loaded", "kvindex", "oracle"}
    hit = {name: m["hit_rate"] for name, m in r.items()}
    assert hit["kvindex"] > 1.5 * hit["round-robin"]
    assert hit["kvindex-direct"] >= hit["oracle"] - 0.02
    for name in ("kvindex", "kvindex-direct"):
        acc = r[name]["index_accuracy"]
        assert acc["decisions"] == report["workload"]["requests"]
        assert acc["accuracy"] >= 0.99


def _assert_no_fallback(rep: dict[str, Any]) -> None:
    """Every kvindex pick was scored: a pick that fell open (scorer deadline, breaker,
    shedding) would make the numbers depend on the machine's speed."""
    m = rep["routers"]["kvindex"]
    assert m["picker_fallbacks"] == 0
    assert m["picker"]["fail_open"] == 0
    assert m["picker"]["scorer_outcomes"] == {"ok": rep["workload"]["requests"]}


def test_same_seed_same_numbers(tmp_path: Path, report: dict[str, Any]) -> None:
    again = _run(tmp_path, "b", "--seed", "5")
    _assert_no_fallback(report)
    _assert_no_fallback(again)
    assert strip_wall_clock(again["routers"]) == strip_wall_clock(report["routers"])
    other = _run(tmp_path, "c", "--seed", "6", "--routers", "round-robin")
    assert other["workload"] != report["workload"]


def test_plot_is_written(tmp_path_factory: pytest.TempPathFactory, report: dict[str, Any]) -> None:
    png = tmp_path_factory.getbasetemp() / "sim.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_flags_fail_cleanly(tmp_path: Path) -> None:
    assert main(["--routers", "nope", "--quiet"]) != 0
    assert main(["--workload", "trace", "--trace", str(tmp_path / "missing.jsonl"), "--quiet"]) != 0


def test_chat_sessions_stick_and_hit_with_kvindex(tmp_path: Path) -> None:
    out = tmp_path / "chat.json"
    argv = ["--workload", "chat", "--duration", "20", "--rate", "0.6", "--turns", "4",
            "--think-time", "3", "--system-tokens", "128", "--question-tokens", "32",
            "--output-tokens", "32", "--pod-capacity", "256", "--seed", "3", "--quiet",
            "--routers", "round-robin,kvindex-direct,oracle", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    r = json.loads(out.read_text())["routers"]
    assert r["round-robin"]["follow_ups"] > 0
    assert r["kvindex-direct"]["stickiness"] > r["round-robin"]["stickiness"]
    assert r["kvindex-direct"]["hit_rate"] > r["round-robin"]["hit_rate"]
    assert r["kvindex-direct"]["index_accuracy"]["accuracy"] >= 0.99


def test_mooncake_trace_replays_through_kvindex(tmp_path: Path) -> None:
    from tests.conftest import MOONCAKE_TRACE

    out = tmp_path / "trace.json"
    argv = ["--workload", "trace", "--trace", str(MOONCAKE_TRACE), "--max-requests", "40",
            "--duration", "1000", "--pod-capacity", "16384", "--seed", "1", "--quiet",
            "--routers", "round-robin,kvindex-direct", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    rep = json.loads(out.read_text())
    assert rep["workload"]["requests"] == 40
    r = rep["routers"]
    assert r["kvindex-direct"]["completed"] + r["kvindex-direct"]["rejected"] == 40
    assert r["kvindex-direct"]["hit_rate"] >= r["round-robin"]["hit_rate"]
    assert r["kvindex-direct"]["index_accuracy"]["accuracy"] >= 0.99


def test_routers_in_parallel_processes_give_the_same_numbers(tmp_path: Path, report: dict[str, Any]) -> None:
    routers = "round-robin,kvindex,approximate,oracle"
    serial = _run(tmp_path, "serial", "--seed", "5", "--routers", routers)
    parallel = _run(tmp_path, "parallel", "--seed", "5", "--routers", routers, "--jobs", "2")
    assert list(parallel["routers"]) == routers.split(",")
    assert strip_wall_clock(parallel["routers"]) == strip_wall_clock(serial["routers"])
    assert strip_wall_clock(parallel["workload"]) == strip_wall_clock(serial["workload"])
