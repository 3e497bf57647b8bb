"""Fleet simulator: simulated vLLM pods publishing real KV events, routers compared on one
request stream, and the numbers that show what KV-cache-aware routing gains.

Entry point: ``kvindex simulate`` (:func:`kvindex_service.sim.cli.main`).
"""

from .engine import FleetConfig, RequestRecord, RouterRun, ServiceModel, run_router, simulate
from .ingest import AccuracyStats, IngestTimeout, KvindexFeed
from .pod import Allocation, BlockPool, EventPublisher, SimPod
from .routers import Router, make_router, router_names
from .workloads import (
    Request,
    TraceError,
    chat_sessions,
    load_mooncake_trace,
    mooncake_requests,
    shared_prefix,
)

__all__ = [
    "AccuracyStats",
    "Allocation",
    "BlockPool",
    "EventPublisher",
    "FleetConfig",
    "IngestTimeout",
    "KvindexFeed",
    "Request",
    "RequestRecord",
    "Router",
    "RouterRun",
    "ServiceModel",
    "SimPod",
    "TraceError",
    "chat_sessions",
    "load_mooncake_trace",
    "make_router",
    "mooncake_requests",
    "router_names",
    "run_router",
    "shared_prefix",
    "simulate",
]
