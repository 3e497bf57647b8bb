"""Numbers, tables, JSON and plots from simulator runs.

Every number is computed from the per-request records and the pods' true pools, never from
what a router believed, so the oracle and kvindex are judged by the same yardstick.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .engine import RequestRecord, RouterRun

__all__ = [
    "WALL_CLOCK_FIELDS",
    "format_table",
    "percentile",
    "router_metrics",
    "strip_wall_clock",
    "write_json",
    "write_plot",
]

WALL_CLOCK_FIELDS = frozenset({"wall_seconds", "generated_at"})
"""Fields that vary between identical runs; everything else is a function of the seed."""

TIME_BUCKETS = 12


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (no interpolation, so results are exact and reproducible)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100.0 * len(ordered)))
    return ordered[rank - 1]


def _imbalance(per_pod: Sequence[float]) -> float | None:
    mean = sum(per_pod) / len(per_pod) if per_pod else 0.0
    return max(per_pod) / mean if mean > 0 else None


def _stickiness(records: Sequence[RequestRecord]) -> tuple[float | None, int]:
    """Fraction of a session's follow-up requests served by the pod of its previous one."""
    last: dict[str, int] = {}
    follow_ups = same = 0
    for rec in sorted(records, key=lambda r: (r.arrival, r.rid)):
        if rec.session is None:
            continue
        prev = last.get(rec.session)
        if prev is not None:
            follow_ups += 1
            same += prev == rec.pod
        last[rec.session] = rec.pod
    return (same / follow_ups if follow_ups else None), follow_ups


def _hit_rate_over_time(records: Sequence[RequestRecord], span: float) -> list[dict[str, Any]]:
    width = span / TIME_BUCKETS if span > 0 else 1.0
    cached: dict[int, int] = defaultdict(int)
    prompt: dict[int, int] = defaultdict(int)
    for rec in records:
        b = min(TIME_BUCKETS - 1, int(rec.arrival / width))
        cached[b] += rec.cached_tokens
        prompt[b] += rec.prompt_tokens
    return [
        {
            "t_start": round(b * width, 6),
            "t_end": round((b + 1) * width, 6),
            "hit_rate": cached[b] / prompt[b] if prompt[b] else None,
        }
        for b in range(TIME_BUCKETS)
    ]


def router_metrics(run: RouterRun, *, span: float) -> dict[str, Any]:
    """The per-router numbers of the report (see docs/simulator.md for definitions)."""
    done = [r for r in run.records if not r.rejected and r.finished is not None]
    n_pods = len(run.pod_ids)
    req_per_pod = [0] * n_pods
    prefill_per_pod = [0] * n_pods
    for r in done:
        req_per_pod[r.pod] += 1
        prefill_per_pod[r.pod] += r.prompt_tokens - r.cached_tokens
    prompt_tokens = sum(r.prompt_tokens for r in done)
    cached_tokens = sum(r.cached_tokens for r in done)
    ttfts = [r.ttft for r in done if r.ttft is not None]
    waits = [r.admitted - r.arrival for r in done if r.admitted is not None]
    stick, follow_ups = _stickiness(done)
    if done:
        makespan = max(r.finished or 0.0 for r in done) - min(r.arrival for r in done)
    else:
        makespan = 0.0
    out_tokens = sum(r.output_tokens for r in done)
    metrics: dict[str, Any] = {
        "requests": len(run.records),
        "completed": len(done),
        "rejected": sum(r.rejected for r in run.records),
        "prompt_tokens": prompt_tokens,
        "cached_tokens": cached_tokens,
        "hit_rate": cached_tokens / prompt_tokens if prompt_tokens else None,
        "stickiness": stick,
        "follow_ups": follow_ups,
        "requests_per_pod": req_per_pod,
        "prefill_tokens_per_pod": prefill_per_pod,
        "imbalance_requests": _imbalance(req_per_pod),
        "imbalance_prefill_tokens": _imbalance(prefill_per_pod),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p90_s": percentile(ttfts, 90),
        "ttft_p99_s": percentile(ttfts, 99),
        "ttft_mean_s": sum(ttfts) / len(ttfts) if ttfts else None,
        "queue_wait_p90_s": percentile(waits, 90),
        "makespan_s": makespan,
        "throughput_rps": len(done) / makespan if makespan > 0 else None,
        "throughput_output_tps": out_tokens / makespan if makespan > 0 else None,
        "evictions": sum(run.evictions),
        "hit_rate_over_time": _hit_rate_over_time(done, span),
        "wall_seconds": run.wall_seconds,
    }
    metrics.update(run.router_stats)
    return metrics


def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    if value is None:
        return "-"
    return format(value * scale, spec)


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """A fixed-width table, one row per router."""
    header = (
        f"{'router':<16}{'hit rate':>9}{'of bound':>9}{'sticky':>8}{'imb req':>8}{'imb pre':>8}"
        f"{'TTFT p50':>10}{'p90':>9}{'p99':>9}{'req/s':>7}{'idx acc':>9}"
    )
    lines = [header, "-" * len(header)]
    for name, m in results.items():
        acc = m.get("index_accuracy", {}).get("accuracy")
        lines.append(
            f"{name:<16}{_fmt(m['hit_rate'], '8.1%'):>9}{_fmt(m.get('hit_rate_of_bound'), '8.1%'):>9}"
            f"{_fmt(m['stickiness'], '7.1%'):>8}"
            f"{_fmt(m['imbalance_requests'], '.2f'):>8}"
            f"{_fmt(m['imbalance_prefill_tokens'], '.2f'):>8}"
            f"{_fmt(m['ttft_p50_s'], '.0f', 1000) + 'ms':>10}"
            f"{_fmt(m['ttft_p90_s'], '.0f', 1000) + 'ms':>9}"
            f"{_fmt(m['ttft_p99_s'], '.0f', 1000) + 'ms':>9}"
            f"{_fmt(m['throughput_rps'], '.2f'):>7}{_fmt(acc, '8.2%'):>9}"
        )
    return "\n".join(lines)


def strip_wall_clock(obj: Any) -> Any:
    """A copy of a report without the fields that depend on the machine's speed."""
    if isinstance(obj, dict):
        return {k: strip_wall_clock(v) for k, v in obj.items() if k not in WALL_CLOCK_FIELDS}
    if isinstance(obj, list):
        return [strip_wall_clock(v) for v in obj]
    return obj


def write_json(report: dict[str, Any], path: str | Path) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def write_plot(results: dict[str, dict[str, Any]], path: str | Path, *, title: str) -> None:
    """Three panels: hit rate per router, TTFT percentiles per router, hit rate over time.

    Uses a bare Figure with the Agg canvas, so no pyplot global state and no display."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(results)
    fig = Figure(figsize=(15, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax_hit, ax_ttft, ax_time = fig.subplots(1, 3)
    xs = range(len(names))
    hits = [(results[n]["hit_rate"] or 0.0) * 100 for n in names]
    bars = ax_hit.bar(xs, hits, color="tab:blue")
    ax_hit.bar_label(bars, fmt="%.1f%%", fontsize=8)
    ax_hit.set_xticks(list(xs), names, rotation=30, ha="right")
    ax_hit.set_ylabel("prefix-cache hit rate (% of prompt tokens)")
    ax_hit.set_ylim(0, 105)
    ax_hit.set_title("Hit rate (true pools)")

    width = 0.27
    for k, (key, label) in enumerate((("ttft_p50_s", "p50"), ("ttft_p90_s", "p90"), ("ttft_p99_s", "p99"))):
        vals = [(results[n][key] or 0.0) * 1000 for n in names]
        ax_ttft.bar([x + (k - 1) * width for x in xs], vals, width, label=label)
    ax_ttft.set_xticks(list(xs), names, rotation=30, ha="right")
    ax_ttft.set_ylabel("modeled TTFT (ms)")
    ax_ttft.set_title("Time to first token")
    ax_ttft.legend()

    for n in names:
        buckets = results[n]["hit_rate_over_time"]
        ts = [(b["t_start"] + b["t_end"]) / 2 for b in buckets if b["hit_rate"] is not None]
        hs = [b["hit_rate"] * 100 for b in buckets if b["hit_rate"] is not None]
        ax_time.plot(ts, hs, marker="o", markersize=3, label=n)
    ax_time.set_xlabel("simulated time (s)")
    ax_time.set_ylabel("hit rate (%)")
    ax_time.set_ylim(0, 105)
    ax_time.set_title("Hit rate over time")
    ax_time.legend(fontsize=7)
    fig.suptitle(title)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
