"""Envoy ext_proc endpoint picker: routes OpenAI requests to the vLLM pod that already holds
the longest prefix of the prompt, without hot-spotting one pod.

Transport-free policy in :mod:`.picker`, gRPC in :mod:`.server` (started with the endpoint
source and the health port by :mod:`.app`), scoring adapters in
:mod:`.scorer_client`, an Envoy-like client for tests and simulation in :mod:`.client`.
This package never imports :mod:`kvindex_service.api` (and vice versa).
"""

from kvindex_service.extproc.app import PickerServer, start_picker
from kvindex_service.extproc.client import EnvoyClient, PendingRoute, RouteResult
from kvindex_service.extproc.config import ExtprocConfig, PolicyWeights
from kvindex_service.extproc.picker import Decision, Lease, Picker
from kvindex_service.extproc.prompt import BadRequest, PromptQuery, parse_body
from kvindex_service.extproc.scorer_client import (
    HttpScorer,
    InProcessScorer,
    KvScores,
    Scorer,
    ScorerError,
    ScorerRejected,
    ScorerTimeout,
    ScorerUnauthorized,
)
from kvindex_service.extproc.server import DESTINATION_HEADER, MAX_STREAMED_CHUNK

__all__ = [
    "DESTINATION_HEADER",
    "MAX_STREAMED_CHUNK",
    "BadRequest",
    "Decision",
    "EnvoyClient",
    "ExtprocConfig",
    "HttpScorer",
    "InProcessScorer",
    "KvScores",
    "Lease",
    "PendingRoute",
    "Picker",
    "PickerServer",
    "PolicyWeights",
    "PromptQuery",
    "RouteResult",
    "Scorer",
    "ScorerError",
    "ScorerRejected",
    "ScorerTimeout",
    "ScorerUnauthorized",
    "parse_body",
    "start_picker",
]
