"""Prometheus view of pod discovery, read at scrape time (registered when the runtime starts
discovery, so every series exists from then on, at zero)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvindex_service.discovery.reconcile import POD_STATES

if TYPE_CHECKING:
    from kvindex_service.discovery.watch import Discovery

__all__ = ["DiscoveryCollector"]


class DiscoveryCollector(Collector):
    """``kvindex_discovery_pods{state}``, ``kvindex_discovery_resyncs_total``,
    ``kvindex_discovery_watch_errors_total``."""

    def __init__(self, discovery: Callable[[], Discovery | None]) -> None:
        self._discovery = discovery

    def collect(self) -> Iterator[Metric]:
        disc = self._discovery()
        if disc is None:
            return
        pods = GaugeMetricFamily(
            "kvindex_discovery_pods",
            "Pods the label selector finds, by state (subscribed, unready: in the grace, pending, failed)",
            labels=["state"],
        )
        counts = disc.counts()
        for state in POD_STATES:
            pods.add_metric([state], counts.get(state, 0))
        yield pods
        yield CounterMetricFamily(
            "kvindex_discovery_resyncs", "Pod lists after the first (410 Gone, reconnects)", value=disc.resyncs
        )
        yield CounterMetricFamily(
            "kvindex_discovery_watch_errors",
            "Failed pod lists or watches (retried with backoff)",
            value=disc.watch_errors,
        )
        yield GaugeMetricFamily(
            "kvindex_discovery_synced", "1 once the first pod list is applied", value=int(disc.synced)
        )
