"""Prometheus families of the shared index, read from ``SharedIndex`` at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from kvindex_service.backends.shared import SharedIndex

__all__ = ["BackendCollector"]

# counter name in SharedIndex -> (family, help, label value or None)
_COUNTERS: dict[str, tuple[str, str, str | None]] = {
    "batches_applied": ("kvindex_backend_batches", "Event batches by outcome", "applied"),
    "batches_dropped": ("kvindex_backend_batches", "Event batches by outcome", "dropped"),
    "write_errors": ("kvindex_backend_write_errors", "Writes that failed and were retried", None),
    "entries_added": ("kvindex_backend_entries", "Entry changes by outcome", "added"),
    "entries_removed": ("kvindex_backend_entries", "Entry changes by outcome", "removed"),
    "entries_refused": ("kvindex_backend_entries", "Entry changes by outcome", "refused"),
    "unknown_parents": ("kvindex_backend_unknown_parents", "Stores whose parent block was unknown", None),
    "decode_errors": ("kvindex_backend_decode_errors", "Events the core could not decode", None),
    "scores": ("kvindex_backend_scores", "Scores asked of the shared index, by outcome", "total"),
    "scores_degraded": ("kvindex_backend_scores", "Scores asked of the shared index, by outcome", "degraded"),
    "reconnects": ("kvindex_backend_reconnects", "Times the shared index became reachable again", None),
}


class BackendCollector(Collector):
    def __init__(self, source: Callable[[], SharedIndex | None]) -> None:
        self._source = source

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        shared = self._source()
        families: dict[str, CounterMetricFamily] = {}
        for name, (fam, doc, label) in _COUNTERS.items():
            if fam not in families:
                families[fam] = CounterMetricFamily(fam, doc, labels=("outcome",) if label else ())
            if shared is not None:
                families[fam].add_metric([label] if label else [], shared.counters[name])
        yield from families.values()
        up = GaugeMetricFamily("kvindex_backend_up", "1 while the shared index answers")
        buffered = GaugeMetricFamily("kvindex_backend_buffered_batches", "Event batches waiting for the shared index")
        if shared is not None:
            up.add_metric([], 1.0 if shared.up else 0.0)
            buffered.add_metric([], float(shared.buffered))
        yield up
        yield buffered
