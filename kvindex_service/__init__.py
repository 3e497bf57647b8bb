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
    TokenProcessor,
    __version__,
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
    "TokenProcessor",
    "__version__",
]
