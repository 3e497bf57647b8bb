"""What the Grafana dashboard and the Prometheus rules reference, a small PromQL sanity check,
and a reader for the Prometheus text format's HELP/TYPE lines and samples.

Metric names are pulled out of every PromQL expression with ``kvindex_[a-z0-9_]+``. A name
used in a query is a *sample* name: ``X_total`` for a counter family ``X``, ``X_bucket`` /
``X_sum`` / ``X_count`` for a histogram ``X``, ``X`` for a gauge. prometheus_client writes a
counter's HELP/TYPE under ``X_total`` and a histogram's under ``X``, so a referenced name is
registered when a TYPE line names it directly (gauges, counters) or names its base with the
right type (histogram suffixes).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "kvindex.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
PROMTOOL_BUILD = ROOT / "tools" / "promtool" / "build-promtool.sh"

METRIC_RE = re.compile(r"\bkvindex_[a-z0-9_]+")
_HIST_SUFFIXES = ("_bucket", "_sum", "_count")

# Every function the expressions may call (PromQL functions and aggregation operators).
KNOWN_FUNCTIONS = frozenset(
    {
        "abs", "absent", "avg", "ceil", "clamp_min", "clamp_max", "count", "delta", "deriv", "floor",
        "histogram_quantile", "increase", "irate", "label_replace", "label_values", "max", "min",
        "rate", "round", "sum", "time", "topk", "bottomk", "vector", "scalar", "avg_over_time",
        "max_over_time", "min_over_time", "changes", "resets", "timestamp", "quantile",
    }
)  # fmt: skip
# Words followed by "(" that are not function calls.
_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless"})


def _walk_exprs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            elif key in ("query", "definition") and isinstance(value, str) and "kvindex_" in value:
                yield value  # template variable queries: label_values(kvindex_..., label)
            else:
                yield from _walk_exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk_exprs(item)


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_exprs() -> list[str]:
    return list(_walk_exprs(dashboard()))


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def alert_exprs() -> list[str]:
    return [str(rule["expr"]) for rule in alert_rules()]


def referenced_metrics() -> dict[str, set[str]]:
    """Sample name -> where it is used ("dashboard", "alerts")."""
    refs: dict[str, set[str]] = {}
    for where, exprs in (("dashboard", dashboard_exprs()), ("alerts", alert_exprs())):
        for expr in exprs:
            for name in METRIC_RE.findall(expr):
                refs.setdefault(name, set()).add(where)
    return refs


def as_promql(expr: str) -> str:
    """A dashboard query as plain PromQL: Grafana's variables replaced by valid stand-ins."""
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
    return re.sub(r"\$\{?[a-z_]+\}?", ".*", expr)


def sanity_errors(expr: str) -> list[str]:
    """Problems a reader can see without a PromQL parser: unbalanced brackets or quotes,
    unknown functions, malformed metric names."""
    errors = []
    stripped = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    if stripped.count('"') % 2:
        errors.append("unbalanced quotes")
    depth = {"(": 0, "[": 0, "{": 0}
    closing = {")": "(", "]": "[", "}": "{"}
    for ch in stripped:
        if ch in depth:
            depth[ch] += 1
        elif ch in closing:
            depth[closing[ch]] -= 1
            if depth[closing[ch]] < 0:
                errors.append(f"unexpected {ch!r}")
    errors += [f"unclosed {k!r}" for k, v in depth.items() if v > 0]
    for word in re.findall(r"\b([a-z_][a-z0-9_]*)\s*\(", stripped):
        if word not in KNOWN_FUNCTIONS and word not in _KEYWORDS:
            errors.append(f"unknown function {word!r}")
    for name in METRIC_RE.findall(stripped):
        if name.endswith("_") or "__" in name:
            errors.append(f"malformed metric name {name!r}")
    return errors


def types_and_samples(text: str) -> tuple[dict[str, str], set[str]]:
    """The ``# TYPE`` names with their type, and every sample name, of one exposition."""
    types: dict[str, str] = {}
    helps: set[str] = set()
    samples: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert name in helps, f"TYPE before HELP for {name}"
            types[name] = kind
        elif line.startswith("# HELP "):
            helps.add(line.split(" ", 3)[2])
        elif line and not line.startswith("#"):
            samples.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return types, samples


def is_registered(name: str, types: dict[str, str]) -> bool:
    """Whether the sample name ``name`` belongs to a family with HELP/TYPE lines."""
    if name in types:
        return types[name] in ("gauge", "counter", "untyped")
    for suffix in _HIST_SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and types.get(base) in ("histogram", "summary"):
            return suffix != "_bucket" or types[base] == "histogram"
    return False


def find_promtool() -> str | None:
    """promtool from KVINDEX_PROMTOOL, the PATH, or the cache the build script fills."""
    env = os.environ.get("KVINDEX_PROMTOOL")
    if env:
        return env
    found = shutil.which("promtool")
    if found:
        return found
    cache = Path(os.environ.get("KVINDEX_CACHE", Path.home() / ".cache" / "kvindex"))
    built = sorted(p for p in cache.glob("promtool-v*") if p.suffix != ".tmp")
    return str(built[-1]) if built else None
