"""Prometheus metrics: a per-runtime registry, latency histograms, and a collector that reads
the core's counters at scrape time.

Why a collector rather than counters we increment: the Rust core already counts every event,
decode error and eviction on its own threads; copying those numbers into Python counters on
each batch would cost GIL time on the write path. ``RuntimeCollector.collect`` asks the core
(and the subscriber and the tokenizer pool) once per scrape instead.

Names follow ``kvindex_<subsystem>_<name>_<unit>``. Nothing here touches the global
``prometheus_client.REGISTRY``: each :class:`ServiceMetrics` owns a ``CollectorRegistry``, so
two apps in one process (tests) never collide.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["RuntimeCollector", "ServiceMetrics", "Sources"]

logger = logging.getLogger(__name__)

# Sub-millisecond resolution: a score over token ids takes microseconds.
_LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0,
)  # fmt: skip


class ServiceMetrics:
    """The instruments the Python side updates itself, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.score_seconds = Histogram(
            "kvindex_scoring_score_duration_seconds",
            "Time to score one request against the index (tokenization excluded)",
            labelnames=("input",),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokenize_seconds = Histogram(
            "kvindex_tokenization_duration_seconds",
            "Time to render (chat) and tokenize one prompt",
            labelnames=("kind",),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.http_requests = Counter(
            "kvindex_http_requests",
            "HTTP requests by route template, method and status",
            labelnames=("route", "method", "status"),
            registry=self.registry,
        )
        self.http_seconds = Histogram(
            "kvindex_http_request_duration_seconds",
            "HTTP request latency inside the server, by route template",
            labelnames=("route", "method"),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        # Estimated prefix hit rate: matched / prompt blocks, summed over every score.
        self.score_prompt_blocks = Counter(
            "kvindex_score_prompt_blocks",
            "Full KV blocks of the prompts scored",
            registry=self.registry,
        )
        self.score_matched_blocks = Counter(
            "kvindex_score_matched_blocks",
            "Leading blocks the best pod held, summed over the prompts scored",
            registry=self.registry,
        )

    def render(self) -> bytes:
        """The Prometheus text exposition of everything in the registry."""
        return generate_latest(self.registry)


class Sources:
    """Getters for the live components; each may return None (not started, or disabled)."""

    def __init__(
        self,
        indexer: Callable[[], Any],
        subscriber: Callable[[], Any],
        tokenizers: Callable[[], Any],
    ) -> None:
        self.indexer = indexer
        self.subscriber = subscriber
        self.tokenizers = tokenizers


# Native counter -> (metric family, labels). Counters not listed are still exported, under
# kvindex_core_<name>_total, so a new core counter shows up without a change here.
_EVENT_TYPES = {
    "events_block_stored": "BlockStored",
    "events_block_removed": "BlockRemoved",
    "events_all_blocks_cleared": "AllBlocksCleared",
}
_NAMED_COUNTERS: dict[str, tuple[str, str, dict[str, str]]] = {
    "events_unknown_type": ("processed", "Events by type and outcome", {"type": "unknown", "outcome": "ignored"}),
    "batch_decode_errors": ("decode_errors", "Undecodable payloads and events", {"level": "batch"}),
    "event_decode_errors": ("decode_errors", "Undecodable payloads and events", {"level": "event"}),
    "batches_queued": ("batches", "Event batches by stage", {"stage": "queued"}),
    "batches_applied": ("batches", "Event batches by stage", {"stage": "applied"}),
    "blocks_stored": ("blocks", "Blocks stored/removed by events", {"op": "stored"}),
    "blocks_removed": ("blocks", "Blocks stored/removed by events", {"op": "removed"}),
    "hash_matches": ("engine_hashes", "Stored blocks whose engine hash equalled kvindex's key", {"match": "true"}),
    "hash_mismatches": ("engine_hashes", "Stored blocks whose engine hash equalled kvindex's key", {"match": "false"}),
}
# kvindex_index_<name> -> (help, IndexStats attribute)
_INDEX_GAUGES = {
    "keys": ("Block keys in the index", "keys"),
    "entries": ("(key, pod, tier) entries in the index", "entries"),
    "memory_bytes": ("Approximate bytes used by the index", "bytes_used"),
    "pods": ("Pods known to the index", "pods"),
    "models": ("Models known to the index", "models"),
    "max_keys": ("Configured key capacity", "max_keys"),
}
# PodState attribute -> help; exported as kvindex_pod_<attr>_total{pod}.
_POD_NATIVE_COUNTERS = {
    "batches_applied": "Batches applied per pod",
    "events_applied": "Events applied per pod",
    "decode_errors": "Undecodable batches and events per pod",
    "unknown_parents": "Stored blocks whose parent the index did not know, per pod",
    "hash_mismatches": "Stored blocks whose engine hash differed from kvindex's key",
}
# Subscriber record key -> help; exported as kvindex_pod_<key>_total{pod}.
_POD_WIRE_COUNTERS = {
    "messages_received": "KV-event messages received per pod",
    "gaps": "Sequence gaps seen per pod",
    "replays": "Replays requested per pod",
    "unrecoverable_gaps": "Gaps the replay socket could not fill, per pod",
}
_SUBSCRIBER_GAUGES = {"replays_in_progress", "pods", "endpoints", "connected_pods", "running"}
_TOKENIZER_GAUGES = {
    "prefix_store_chars",
    "prefix_store_tokens",
    "prefix_store_capacity_chars",
    "cached_entries",
    "background_pending",
    "models_loaded",
    "tokenizers_loaded",
}
_NAME_OK = re.compile(r"[^a-zA-Z0-9_]")


def _metric_name(raw: str) -> str:
    return _NAME_OK.sub("_", raw).strip("_").lower()


def _num(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    return None


class RuntimeCollector(Collector):
    """Reads the index, subscriber and tokenizer counters when Prometheus scrapes."""

    def __init__(self, sources: Sources) -> None:
        self._sources = sources

    def describe(self) -> Iterable[Metric]:
        # Unknown until scrape time: an empty describe keeps registration cheap and lazy.
        return []

    def collect(self) -> Iterator[Metric]:
        for part in (self._index_metrics, self._pod_metrics, self._subscriber_metrics, self._tokenizer_metrics):
            try:
                yield from part()
            except Exception:  # a broken source must not take /metrics down
                logger.exception("metrics source failed", extra={"source": part.__name__})

    # -- index ----------------------------------------------------------------------------
    def _index_metrics(self) -> Iterator[Metric]:
        indexer = self._sources.indexer()
        if indexer is None:  # not started: the fixed families exist, without samples
            yield CounterMetricFamily(
                "kvindex_events_processed", "Events by type and outcome", labels=("type", "outcome")
            )
            for fam_name, doc, labels in {v[0]: v for v in _NAMED_COUNTERS.values()}.values():
                yield CounterMetricFamily(f"kvindex_events_{fam_name}", doc, labels=tuple(labels))
            for name, (doc, _attr) in _INDEX_GAUGES.items():
                yield GaugeMetricFamily(f"kvindex_index_{name}", doc)
            yield CounterMetricFamily("kvindex_index_evictions", "LRU evictions", labels=("kind",))
            return
        counters: Mapping[str, int] = indexer.counters()
        events = CounterMetricFamily(
            "kvindex_events_processed", "Events by type and outcome", labels=("type", "outcome")
        )
        families: dict[str, CounterMetricFamily] = {"processed": events}
        generic: list[CounterMetricFamily] = []
        for key, value in sorted(counters.items()):
            if key in _EVENT_TYPES:
                events.add_metric([_EVENT_TYPES[key], "applied"], value)
            elif key in _NAMED_COUNTERS:
                fam_name, doc, labels = _NAMED_COUNTERS[key]
                fam = families.get(fam_name)
                if fam is None:
                    fam = CounterMetricFamily(f"kvindex_events_{fam_name}", doc, labels=tuple(labels))
                    families[fam_name] = fam
                fam.add_metric(list(labels.values()), value)
            else:
                generic.append(
                    CounterMetricFamily(f"kvindex_core_{_metric_name(key)}", f"Core counter {key}", value=value)
                )
        yield from families.values()
        yield from generic

        stats = indexer.stats()
        for name, (doc, attr) in _INDEX_GAUGES.items():
            yield GaugeMetricFamily(f"kvindex_index_{name}", doc, value=getattr(stats, attr))
        evictions = CounterMetricFamily("kvindex_index_evictions", "LRU evictions", labels=("kind",))
        evictions.add_metric(["key"], stats.key_evictions)
        evictions.add_metric(["entry"], stats.entry_evictions)
        yield evictions

    def _pod_metrics(self) -> Iterator[Metric]:
        """Per-pod families, always yielded (empty before the first pod). One series per pod
        the index or the subscriber knows, which admission bounds to ``zmq.max_pods``."""
        fams: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "blocks": GaugeMetricFamily("kvindex_pod_blocks", "Blocks held per pod and tier", labels=("pod", "tier")),
            "last_ts": GaugeMetricFamily(
                "kvindex_pod_last_event_timestamp_seconds",
                "vLLM timestamp of the last applied batch",
                labels=("pod",),
            ),
        }
        for attr, doc in _POD_NATIVE_COUNTERS.items():
            fams[attr] = CounterMetricFamily(f"kvindex_pod_{attr}", doc, labels=("pod",))
        for key, doc in _POD_WIRE_COUNTERS.items():
            fams[key] = CounterMetricFamily(f"kvindex_pod_{key}", doc, labels=("pod",))
        subscribed = GaugeMetricFamily(
            "kvindex_pod_subscribed", "1 while the subscriber is subscribed to the pod's stream", labels=("pod",)
        )
        indexer = self._sources.indexer()
        for state in indexer.pod_states() if indexer is not None else ():
            for tier, count in sorted(state.blocks_by_tier.items()):
                fams["blocks"].add_metric([state.pod, tier], count)
            for attr in _POD_NATIVE_COUNTERS:
                fams[attr].add_metric([state.pod], getattr(state, attr))
            if state.last_event_ts is not None:
                fams["last_ts"].add_metric([state.pod], state.last_event_ts)
        subscriber = self._sources.subscriber()
        for record in subscriber.pod_states() if subscriber is not None else ():
            pod = record.get("pod")
            if not pod:  # a configured endpoint that has not named its pod yet
                continue
            for key in _POD_WIRE_COUNTERS:
                fams[key].add_metric([str(pod)], float(record.get(key) or 0))
            subscribed.add_metric([str(pod)], 1.0 if record.get("subscribed") else 0.0)
        yield from fams.values()
        yield subscribed

    # -- subscriber -----------------------------------------------------------------------
    def _subscriber_metrics(self) -> Iterator[Metric]:
        from kvindex_service.events.admission import REJECT_REASONS

        subscriber = self._sources.subscriber()
        # Always exported (zeros until a subscriber exists), so alerts can rely on it.
        rejected = CounterMetricFamily(
            "kvindex_events_rejected", "KV event messages refused at the edge, by reason", labels=("reason",)
        )
        counts: Mapping[str, int] = subscriber.rejections() if subscriber is not None else {}
        for reason in REJECT_REASONS:
            rejected.add_metric([reason], counts.get(reason, 0))
        yield rejected
        if subscriber is not None:
            stats: Mapping[str, Any] = subscriber.stats()
        else:  # no subscriber (yet): the families exist, without samples
            from kvindex_service.events.subscriber import _STAT_KEYS

            stats = dict.fromkeys((*_STAT_KEYS, "replays_in_progress", "pods"))
        for key, value in sorted(stats.items()):
            num = _num(value)
            if key.startswith("rejected_") or (num is None and subscriber is not None):
                continue
            name = _metric_name(key)
            if name in _SUBSCRIBER_GAUGES:
                yield GaugeMetricFamily(f"kvindex_subscriber_{name}", f"Subscriber {key}", value=num)
            else:
                name = name.removesuffix("_total")
                yield CounterMetricFamily(f"kvindex_subscriber_{name}", f"Subscriber counter {key}", value=num)

    # -- tokenization ---------------------------------------------------------------------
    def _tokenizer_metrics(self) -> Iterator[Metric]:
        pool = self._sources.tokenizers()
        if pool is None:
            return
        stats: Mapping[str, Any] = pool.stats()
        for key, value in sorted(stats.items()):
            num = _num(value)
            if num is None:
                continue
            name = _metric_name(key)
            if name == "prefix_store_hit_ratio":
                yield GaugeMetricFamily(
                    "kvindex_tokenization_prefix_store_hit_ratio",
                    "Share of prefix-store look-ups that reused cached tokens",
                    value=num,
                )
            elif name in _TOKENIZER_GAUGES:
                yield GaugeMetricFamily(f"kvindex_tokenization_{name}", f"Tokenizer pool {key}", value=num)
            else:
                yield CounterMetricFamily(f"kvindex_tokenization_{name}", f"Tokenizer pool {key}", value=num)
