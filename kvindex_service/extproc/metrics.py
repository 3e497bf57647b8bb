"""Prometheus metrics of one picker, in a registry of its own.

Counters are not incremented here: a collector reads the picker's and the server's plain
counters at scrape time, so the hot path pays for one dict increment, not a metrics call.
Only the latency histograms are observed as requests go.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from kvindex_service.extproc.picker import Picker
    from kvindex_service.extproc.stats import StreamStats

__all__ = ["PickerMetrics"]

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (
    0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip


class _Collector(Collector):
    def __init__(self, picker: Picker, streams: StreamStats) -> None:
        self._picker = picker
        self._streams = streams

    def collect(self) -> Iterator[Metric]:
        p = self._picker
        decisions = CounterMetricFamily(
            "kvindex_extproc_decisions", "Endpoints chosen, by the rule that chose them", labels=["reason"]
        )
        for reason, n in sorted(dict(p.decisions).items()):
            decisions.add_metric([reason], n)
        yield decisions
        picks = CounterMetricFamily(
            "kvindex_extproc_picks",
            'Requests routed, by endpoint chosen ("other" past 1024 endpoints)',
            labels=["endpoint"],
        )
        chosen = dict(p.picks)
        for ep in p.endpoints.current():
            chosen.setdefault(ep, 0)
        for ep, n in sorted(chosen.items()):
            picks.add_metric([ep], n)
        yield picks
        scorer = CounterMetricFamily(
            "kvindex_extproc_scorer_requests",
            "Scorer calls by outcome (ok, error, timeout, unauthorized, rejected, breaker_open, no_scorer, unscored)",
            labels=["outcome"],
        )
        for outcome, n in sorted(dict(p.scorer_outcomes).items()):
            scorer.add_metric([outcome], n)
        yield scorer
        yield CounterMetricFamily(
            "kvindex_extproc_fail_open",
            "Requests routed without KV scores because the scorer failed, timed out or was skipped",
            value=p.fail_open,
        )
        immediate = CounterMetricFamily(
            "kvindex_extproc_immediate_responses",
            "Requests answered by the picker itself, by HTTP status",
            labels=["status"],
        )
        for status, n in sorted(dict(p.rejections).items()):
            immediate.add_metric([str(status)], n)
        for status, n in sorted(dict(self._streams.bad_requests).items()):
            immediate.add_metric([str(status)], n)
        yield immediate
        dropped = CounterMetricFamily(
            "kvindex_extproc_subset_hint_dropped",
            "Subset-hint entries not routed to, by reason (malformed, not_unicast, not_configured, over_limit)",
            labels=["reason"],
        )
        for reason, n in sorted(dict(self._streams.hint_dropped).items()):
            dropped.add_metric([reason], n)
        yield dropped
        inflight = GaugeMetricFamily(
            "kvindex_extproc_inflight_requests", "Requests in flight per endpoint", labels=["endpoint"]
        )
        current = p.inflight()
        for ep in p.endpoints.current():
            current.setdefault(ep, 0)
        for ep, n in sorted(current.items()):
            inflight.add_metric([ep], n)
        yield inflight
        yield GaugeMetricFamily("kvindex_extproc_sessions", "Sessions remembered", value=p.session_count())
        s = self._streams
        yield GaugeMetricFamily("kvindex_extproc_streams_active", "Open ext_proc streams", value=s.active)
        yield CounterMetricFamily("kvindex_extproc_streams", "ext_proc streams opened", value=s.opened)
        yield CounterMetricFamily(
            "kvindex_extproc_streams_cancelled", "Streams closed by Envoy before the response", value=s.cancelled
        )
        yield CounterMetricFamily(
            "kvindex_extproc_protocol_errors",
            "Streams failed for an unexpected message sequence",
            value=s.protocol_errors,
        )
        yield CounterMetricFamily(
            "kvindex_extproc_internal_errors", "Streams failed for a bug in the picker", value=s.internal_errors
        )


class PickerMetrics:
    """The registry, histograms and optional HTTP exporter of one picker server."""

    def __init__(self, picker: Picker, streams: StreamStats) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.pick_seconds = Histogram(
            "kvindex_extproc_pick_duration_seconds",
            "Time from the last request message needed to the pick (scoring included)",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.scorer_seconds = Histogram(
            "kvindex_extproc_scorer_duration_seconds",
            "Scorer call latency (successful calls)",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_Collector(picker, streams))
        self._httpd: Any = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Start the exporter thread; returns the bound port."""
        httpd, thread = start_http_server(port, addr=host, registry=self.registry)
        self._httpd, self._thread = httpd, thread
        self.port = int(httpd.server_port)
        log.info("metrics exporter listening", extra={"host": host, "port": self.port})
        return self.port

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
