"""The cache-pressure experiment of docs/simulator.md, run from the page itself: the
documented command (``make sim-pressure``) is parsed out of the page and replayed over a
shorter window, with fewer routers, through the real simulator; the relations the page
reports must already hold there."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest

from kvindex_service.sim.cli import build_parser, main

PAGE = Path(__file__).resolve().parents[2] / "docs" / "simulator.md"
SECTION = "## Cache pressure"


def documented_command() -> list[str]:
    """The argv of the first ``sh`` block under the cache-pressure heading."""
    text = PAGE.read_text(encoding="utf-8")
    start = text.index(SECTION)
    block = re.search(r"```sh\n(.*?)```", text[start:], re.S)
    assert block is not None, f"no sh block under {SECTION!r}"
    argv = shlex.split(block.group(1).replace("\\\n", " "))
    assert argv[:2] == ["kvindex", "simulate"], argv
    return argv[2:]


def _set(argv: list[str], flag: str, value: str) -> list[str]:
    out = list(argv)
    if flag in out:
        out[out.index(flag) + 1] = value
    else:
        out += [flag, value]
    return out


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("pressure")
    argv = documented_command()
    build_parser().parse_args(argv)  # the page's command parses as it stands
    argv = _set(argv, "--duration", "40")
    argv = _set(argv, "--routers", "round-robin,approximate,kvindex")
    argv = _set(argv, "--plot", str(tmp / "pressure.png"))
    argv = _set(argv, "--json", str(tmp / "pressure.json"))
    assert main([*argv, "--quiet"]) == 0
    assert (tmp / "pressure.png").stat().st_size > 0
    return json.loads((tmp / "pressure.json").read_text())


def test_documented_setting_puts_the_fleet_under_pressure(report: dict[str, Any]) -> None:
    fleet, w = report["fleet"], report["workload"]
    r = report["routers"]
    assert all(m["evictions"] > 0 for m in r.values())
    assert fleet["approx_capacity_blocks"] == fleet["pod_capacity_blocks"]  # the router is told the true size
    assert w["reuse_bound"]["hit_rate"] > 0.8


def test_precise_routing_beats_approximate_and_round_robin(report: dict[str, Any]) -> None:
    r = report["routers"]
    hit = {n: m["hit_rate"] for n, m in r.items()}
    assert r["kvindex"]["index_accuracy"]["accuracy"] == 1.0
    assert hit["kvindex"] >= 3 * hit["round-robin"]
    assert hit["kvindex"] > hit["approximate"]
    assert r["kvindex"]["stickiness"] > r["approximate"]["stickiness"]
