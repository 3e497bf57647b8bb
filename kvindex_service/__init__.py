"""kvindex: a KV-cache-aware routing index for vLLM fleets."""

from kvindex_service._native import (
    ALGORITHMS,
    ApplyResult,
    ClosedError,
    Indexer,
    IndexStats,
    InvalidInputError,
    KvIndexError,
    PodScore,
    PodState,
    ScoreResult,
    ThreadStartError,
    TokenProcessor,
    __version__,
    index_defaults,
)

__all__ = [
    "ALGORITHMS",
    "ApplyResult",
    "ClosedError",
    "IndexStats",
    "Indexer",
    "InvalidInputError",
    "KvIndexError",
    "PodScore",
    "PodState",
    "ScoreResult",
    "ThreadStartError",
    "TokenProcessor",
    "__version__",
    "index_defaults",
]
