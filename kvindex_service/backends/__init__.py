"""Where the block index lives: in this process (``memory``, the Rust core's ``Indexer``) or in a
shared Redis / Valkey server (``RedisIndex``), behind one ``BlockIndex`` contract that the
contract suite (``tests/redis/test_contract.py``) runs against both."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from kvindex_service._native import Indexer, ScoreResult
from kvindex_service.backends.url import BackendURL, parse_backend

__all__ = ["BackendURL", "BlockIndex", "MemoryIndex", "parse_backend"]


class BlockIndex(Protocol):
    """add / remove / clear pod / remove pod / lookup / score / stats, and a bound on the
    entries one key holds (``max_pods_per_key``)."""

    max_pods_per_key: int

    def add(self, pod: str, model: str, keys: Sequence[int], tier: str = "GPU") -> None: ...
    def remove(self, pod: str, model: str, keys: Sequence[int], tier: str = "GPU") -> None: ...
    def clear_pod(self, pod: str) -> Any: ...
    def remove_pod(self, pod: str) -> None: ...
    def lookup(
        self, model: str, keys: Sequence[int], *, pods: Sequence[str] | None = None
    ) -> list[list[tuple[str, str]]]: ...
    def score(
        self,
        model: str,
        token_ids: Sequence[int],
        *,
        lora_name: str | None = None,
        cache_salt: str | None = None,
        pods: Sequence[str] | None = None,
    ) -> ScoreResult: ...
    def score_keys(self, model: str, keys: Sequence[int], *, pods: Sequence[str] | None = None) -> ScoreResult: ...
    def stats(self) -> dict[str, Any]: ...


class MemoryIndex:
    """The in-process ``Indexer`` seen through the ``BlockIndex`` contract (writes that the
    core queues are flushed, so each call has taken effect when it returns)."""

    def __init__(self, indexer: Indexer, *, max_pods_per_key: int = 64) -> None:
        self.indexer = indexer
        self.max_pods_per_key = max_pods_per_key

    def add(self, pod: str, model: str, keys: Sequence[int], tier: str = "GPU") -> None:
        self.indexer.add_blocks(pod, model, keys, tier)

    def remove(self, pod: str, model: str, keys: Sequence[int], tier: str = "GPU") -> None:
        self.indexer.remove_blocks(pod, model, keys, tier)

    def clear_pod(self, pod: str) -> None:
        self.indexer.clear_pod(pod)
        self.indexer.flush()

    def remove_pod(self, pod: str) -> None:
        self.indexer.remove_pod(pod)
        self.indexer.flush()

    def lookup(
        self, model: str, keys: Sequence[int], *, pods: Sequence[str] | None = None
    ) -> list[list[tuple[str, str]]]:
        return self.indexer.lookup(model, keys, pods=pods)

    def score(
        self,
        model: str,
        token_ids: Sequence[int],
        *,
        lora_name: str | None = None,
        cache_salt: str | None = None,
        pods: Sequence[str] | None = None,
    ) -> ScoreResult:
        return self.indexer.score(
            model, token_ids, lora_name=lora_name, cache_salt=cache_salt, pods=list(pods) if pods else pods
        )

    def score_keys(self, model: str, keys: Sequence[int], *, pods: Sequence[str] | None = None) -> ScoreResult:
        return self.indexer.score_keys(model, keys, pods=pods)

    def stats(self) -> dict[str, Any]:
        s = self.indexer.stats()
        return {"pods": s.pods, "keys": s.keys, "entries": s.entries}
