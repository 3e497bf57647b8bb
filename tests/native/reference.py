"""Pure-Python oracles for the Rust core, written from DESIGN.md §3/§4 rather than from the
Rust sources, so that a shared misunderstanding cannot hide in both.

- `RefTokenProcessor`: vLLM's CBOR block-hash rule (``cbor2`` canonical encoding + ``hashlib``)
  for "sha256_cbor" and "sha256_cbor_64bit". There is deliberately no reference for "xxh3": it
  equals no vLLM hash, so only its determinism and key-space separation are tested.
- `RefIndex`: a plain dict model of (model, key) -> {(pod, tier)} with longest-prefix scoring.
  It has no capacity limit: tests that compare against it size the native index so that
  nothing is evicted.

Both are slow and simple on purpose; they are only used by tests.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import cbor2
import pytest

from kvindex_service import ScoreResult

__all__ = [
    "DEFAULT_TIER_WEIGHTS",
    "NONE_HASH_DEFAULT_SEED",
    "RefIndex",
    "RefPodScore",
    "RefScoreResult",
    "RefTokenProcessor",
    "assert_same_scores",
    "last8",
]

NONE_HASH_DEFAULT_SEED = "vllm-none-hash"
"""What vLLM >= 0.29 hashes for NONE_HASH when PYTHONHASHSEED is unset."""

DEFAULT_TIER_WEIGHTS: Mapping[str, float] = {"GPU": 1.0, "CPU": 0.8}
REFERENCE_ALGORITHMS = ("sha256_cbor", "sha256_cbor_64bit")
U32_MAX = 2**32 - 1


def last8(digest: bytes) -> int:
    """The 64-bit key of a digest: its last 8 bytes read big-endian (what KV events carry)."""
    return int.from_bytes(digest[-8:], "big")


def _cbor(obj: object) -> bytes:
    return cbor2.dumps(obj, canonical=True)


class RefTokenProcessor:
    """Token ids -> chained 64-bit block keys, the vLLM ``hash_block_tokens`` way."""

    def __init__(self, block_size: int = 16, hash_seed: str | None = None, algorithm: str = "sha256_cbor") -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if algorithm not in REFERENCE_ALGORITHMS:
            raise ValueError(f"no reference for algorithm {algorithm!r}")
        self.block_size = block_size
        self.hash_seed = hash_seed
        self.algorithm = algorithm
        seed = NONE_HASH_DEFAULT_SEED if hash_seed is None else hash_seed
        root = hashlib.sha256(_cbor(seed)).digest()
        # 0.10.0-0.10.1 chain on the 64-bit integer value, later versions on the full digest.
        self._root: bytes | int = last8(root) if algorithm == "sha256_cbor_64bit" else root

    def none_hash(self) -> bytes:
        """32-byte NONE_HASH digest, or its 8-byte big-endian value for the 64-bit rule."""
        if isinstance(self._root, int):
            return self._root.to_bytes(8, "big")
        return self._root

    def extra_keys(self, block_index: int, lora_name: str | None, cache_salt: str | None) -> list[str] | None:
        """vLLM's per-block extras: LoRA name on every block, cache_salt on block 0 only;
        None (CBOR null) when there is nothing.

        vLLM tests the salt for truthiness, so an empty salt adds nothing; the core applies the
        same convention to an empty LoRA name (an adapter always has a non-empty name)."""
        extras: list[str] = []
        if lora_name:
            extras.append(lora_name)
        if cache_salt and block_index == 0:
            extras.append(cache_salt)
        return extras or None

    def block_digests(
        self,
        token_ids: Sequence[int],
        *,
        lora_name: str | None = None,
        cache_salt: str | None = None,
    ) -> list[bytes | int]:
        """The chained values vLLM keeps: 32-byte digests, or ints for the 64-bit rule."""
        for t in token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= U32_MAX:
                raise ValueError(f"token id out of range: {t!r}")
        parent: bytes | int = self._root
        out: list[bytes | int] = []
        bs = self.block_size
        for i in range(len(token_ids) // bs):
            block = list(token_ids[i * bs : (i + 1) * bs])
            digest = hashlib.sha256(_cbor([parent, block, self.extra_keys(i, lora_name, cache_salt)])).digest()
            parent = last8(digest) if self.algorithm == "sha256_cbor_64bit" else digest
            out.append(parent)
        return out

    def block_keys(
        self,
        token_ids: Sequence[int],
        *,
        lora_name: str | None = None,
        cache_salt: str | None = None,
    ) -> list[int]:
        return [
            d if isinstance(d, int) else last8(d)
            for d in self.block_digests(token_ids, lora_name=lora_name, cache_salt=cache_salt)
        ]

    def block0_cbor(self, token_ids: Sequence[int]) -> bytes:
        """CBOR bytes hashed for block 0 without extras (checked against vLLM's vectors)."""
        return _cbor([self._root, list(token_ids[: self.block_size]), None])


@dataclass(frozen=True)
class RefPodScore:
    pod: str
    matched_blocks: int
    matched_tokens: int
    score: float
    tier_blocks: dict[str, int]


@dataclass(frozen=True)
class RefScoreResult:
    scores: list[RefPodScore]
    total_blocks: int
    total_tokens: int


@dataclass
class RefIndex:
    """(model, key) -> {(pod, tier)}; no capacity limits, no LRU."""

    block_size: int = 16
    tier_weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_TIER_WEIGHTS))
    entries: dict[tuple[str, int], set[tuple[str, str]]] = field(default_factory=dict)

    def weight(self, tier: str) -> float:
        # A tier not named weighs like CPU (DESIGN.md / stub); CPU itself defaults to 0.8.
        if tier in self.tier_weights:
            return self.tier_weights[tier]
        return self.tier_weights.get("CPU", DEFAULT_TIER_WEIGHTS["CPU"])

    # -- writes -------------------------------------------------------------------------------
    def add_blocks(self, pod: str, model: str, keys: Iterable[int], tier: str = "GPU") -> None:
        for k in keys:
            self.entries.setdefault((model, k), set()).add((pod, tier))

    def remove_blocks(self, pod: str, model: str, keys: Iterable[int], tier: str = "GPU") -> None:
        for k in keys:
            holders = self.entries.get((model, k))
            if holders is None:
                continue
            holders.discard((pod, tier))
            if not holders:
                del self.entries[(model, k)]

    def clear_pod(self, pod: str) -> None:
        for mk in list(self.entries):
            holders = {e for e in self.entries[mk] if e[0] != pod}
            if holders:
                self.entries[mk] = holders
            else:
                del self.entries[mk]

    # -- reads --------------------------------------------------------------------------------
    def tiers_of(self, pod: str, model: str, key: int) -> set[str]:
        return {t for p, t in self.entries.get((model, key), ()) if p == pod}

    def lookup(self, model: str, keys: Sequence[int], pods: Sequence[str] | None = None) -> list[set[tuple[str, str]]]:
        allowed = None if pods is None else set(pods)
        return [{e for e in self.entries.get((model, k), ()) if allowed is None or e[0] in allowed} for k in keys]

    def pods(self) -> set[str]:
        return {p for holders in self.entries.values() for p, _ in holders}

    def blocks_by_tier(self, pod: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for holders in self.entries.values():
            for p, t in holders:
                if p == pod:
                    out[t] = out.get(t, 0) + 1
        return out

    def models_of(self, pod: str) -> set[str]:
        return {m for (m, _), holders in self.entries.items() if any(p == pod for p, _ in holders)}

    def pod_score(self, pod: str, model: str, keys: Sequence[int]) -> RefPodScore:
        matched = 0
        score = 0.0
        for k in keys:
            tiers = self.tiers_of(pod, model, k)
            if not tiers:
                break
            matched += 1
            score += max(self.weight(t) for t in tiers)
        tier_blocks: dict[str, int] = {}
        if keys:
            for tier in self.tiers_of(pod, model, keys[0]):
                run = 0
                for k in keys:
                    if tier not in self.tiers_of(pod, model, k):
                        break
                    run += 1
                tier_blocks[tier] = run
        return RefPodScore(pod, matched, matched * self.block_size, score, tier_blocks)

    def score_keys(self, model: str, keys: Sequence[int], pods: Sequence[str] | None = None) -> RefScoreResult:
        if pods is None:
            candidates = {p for p, _ in self.entries.get((model, keys[0]), ())} if keys else set()
        else:
            candidates = set(pods)
        scores = [self.pod_score(p, model, keys) for p in candidates]
        if pods is None:
            scores = [s for s in scores if s.matched_blocks > 0]
        scores.sort(key=lambda s: (-s.score, -s.matched_blocks, s.pod))
        return RefScoreResult(scores, len(keys), len(keys) * self.block_size)


def assert_same_scores(got: ScoreResult, want: RefScoreResult, *, tokens: int | None = None) -> None:
    """Native scores equal the model's, including order and per-tier runs. `tokens`: the
    prompt length when `got` came from `score()` (the model only knows block keys)."""
    assert got.total_blocks == want.total_blocks
    assert got.total_tokens == (want.total_tokens if tokens is None else tokens)
    # Best first: score desc, then matched blocks desc, then pod name. Scores are float sums,
    # so order by the model's ranking and compare scores approximately.
    assert [s.pod for s in got.scores] == [s.pod for s in want.scores]
    for g, w in zip(got.scores, want.scores, strict=True):
        assert (g.matched_blocks, g.matched_tokens) == (w.matched_blocks, w.matched_tokens)
        assert g.score == pytest.approx(w.score)
        assert {t: n for t, n in g.tier_blocks.items() if n} == w.tier_blocks
    best = got.best()
    if want.scores:
        assert best is not None and best.pod == want.scores[0].pod
    else:
        assert best is None
