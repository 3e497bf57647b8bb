"""Type stubs for the Rust core (crate `kvindex`, built with the `python` feature).

Every call does one whole request's work (one prompt, one event batch) and releases
the GIL while the core computes.
"""

import os
from collections.abc import Mapping, Sequence
from typing import Self, TypedDict, final

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
    "RecordDecoder",
    "ScoreResult",
    "SnapshotError",
    "SnapshotMismatchError",
    "SnapshotStream",
    "ThreadStartError",
    "TokenProcessor",
    "__version__",
    "index_defaults",
    "score_entries",
    "score_packed",
]

__version__: str
ALGORITHMS: tuple[str, ...]
"""Block-key algorithms: "sha256_cbor" (vLLM's default CBOR rule), "sha256_cbor_64bit"
(vLLM 0.10.0-0.10.1), "xxh3" (fast, not equal to any vLLM hash)."""

class KvIndexError(Exception):
    """Base class of every error raised by the core."""

class InvalidInputError(KvIndexError, ValueError):
    """Bad argument: token id out of range, block size 0, unknown algorithm, bad tier..."""

class ClosedError(KvIndexError, RuntimeError):
    """The indexer was closed; no more batches are accepted."""

class ThreadStartError(KvIndexError, RuntimeError):
    """The OS refused a worker thread (the indexer could not start)."""

class SnapshotError(KvIndexError, ValueError):
    """A snapshot that cannot be loaded: not a snapshot, another format version, truncated,
    corrupt (checksum), or the index already holds pods. Nothing of it was applied."""

class SnapshotMismatchError(SnapshotError):
    """A snapshot written by an index with another block size, hash algorithm or seed."""

@final
class SnapshotStream:
    """The snapshot's byte chunks (about 1 MiB each), copied from the index one shard at a
    time when asked for (GIL released)."""

    def __iter__(self) -> Self: ...
    def __next__(self) -> bytes: ...
    @property
    def max_lock_hold(self) -> float:
        """Longest time one index shard was locked by this stream so far (seconds)."""
    @property
    def keys(self) -> int:
        """Keys written so far."""

class _SnapshotLoaded(TypedDict):
    keys: int
    entries: int
    pods: int
    models: int
    bridge_entries: int
    dropped_entries: int

class _IndexDefaults(TypedDict):
    block_size: int
    hash_seed: str | None
    algorithm: str
    max_keys: int
    max_pods_per_key: int
    shards: int
    queue_capacity: int
    tier_weights: dict[str, float]
    key_memo: int
    max_tiers_per_pod: int

def index_defaults() -> _IndexDefaults:
    """The core's index defaults (the one place they are declared), named as `Indexer`'s
    keyword arguments: `Indexer(**index_defaults())` is `Indexer()`."""

@final
class TokenProcessor:
    """Token ids -> chained 64-bit block keys (full blocks only)."""

    def __new__(cls, block_size: int = 16, hash_seed: str | None = None, algorithm: str = "sha256_cbor") -> Self: ...
    @property
    def block_size(self) -> int: ...
    @property
    def algorithm(self) -> str: ...
    @property
    def hash_seed(self) -> str | None: ...
    def none_hash(self) -> bytes:
        """The chain root: the 32-byte NONE_HASH digest (8 bytes for 64-bit algorithms)."""
    def block_keys(
        self,
        token_ids: Sequence[int],
        *,
        lora_name: str | None = None,
        cache_salt: str | None = None,
    ) -> list[int]:
        """Keys of every full block. With no extras and the default algorithm they equal the
        u64 hashes vLLM puts in its KV events."""

@final
class PodScore:
    pod: str
    matched_blocks: int
    """Longest run of leading blocks the pod holds, in any tier."""
    matched_tokens: int
    score: float
    """Tier-weighted: sum over matched blocks of the best tier weight the pod holds it in."""
    tier_blocks: dict[str, int]
    """Per tier: longest run of leading blocks held in that tier alone."""

@final
class ScoreResult:
    scores: list[PodScore]
    """Best first (score desc, then matched blocks desc, then pod name). Pods with no match
    are left out unless they were named in `pods`, in which case every candidate is listed
    (once, with zeros if the index never saw it). The core orders and fills; nothing else does."""
    total_blocks: int
    """Full blocks in the prompt (the trailing partial block never counts)."""
    total_tokens: int
    keys_computed: int
    """Block keys actually hashed (hashing stops once no pod can extend its prefix)."""
    def best(self) -> PodScore | None: ...

@final
class ApplyResult:
    events: int
    stored_blocks: int
    removed_blocks: int
    cleared: int
    decode_errors: int
    unknown_event_types: int
    unknown_parents: int
    dp_rank: int | None

@final
class PodState:
    pod: str
    models: list[str]
    blocks_by_tier: dict[str, int]
    last_seq: int | None
    last_event_ts: float | None
    """Timestamp vLLM put in the last applied batch (seconds since the epoch)."""
    dp_rank: int | None
    batches_applied: int
    events_applied: int
    decode_errors: int
    unknown_event_types: int
    unknown_parents: int
    hash_matches: int
    """Stored blocks whose engine hash equalled kvindex's key."""
    hash_mismatches: int
    hashes_match: bool | None
    """None until the pod has stored a block; then whether every engine hash equalled ours."""
    tiers_refused: int
    """Stores refused because the pod already uses `max_tiers_per_pod` custom tier names
    (or no tier slot was free)."""
    bridge_entries: int
    """Engine-hash -> key entries kept for this pod (0 when the hashes match)."""
    kv_cache_groups: list[tuple[int, str, int | None, int]]
    """KV-cache groups the pod published (vLLM >= 0.20): (group_idx, kind as scored:
    full_attention / sliding_window / mamba, sliding window in tokens, engine block size)."""

@final
class IndexStats:
    keys: int
    entries: int
    key_evictions: int
    entry_evictions: int
    bytes_used: int
    pods: int
    models: int
    max_keys: int
    max_pods_per_key: int

@final
class Indexer:
    """The block index, its event shards and its scorer, in one object shared by all threads."""

    def __new__(
        cls,
        *,
        block_size: int = 16,
        hash_seed: str | None = None,
        algorithm: str = "sha256_cbor",
        max_keys: int = 10_000_000,
        max_pods_per_key: int = 64,
        shards: int = 0,
        queue_capacity: int = 1024,
        tier_weights: Mapping[str, float] | None = None,
        key_memo: int = 262_144,
        max_tiers_per_pod: int = 4,
    ) -> Self:
        """shards=0 means one per CPU core. tier_weights default {"GPU": 1.0, "CPU": 0.8};
        a tier not named weighs like CPU. key_memo: blocks whose SHA-256 chain value the read
        path remembers (keyed by a 128-bit xxh3 chain over the same input), so a prefix scored
        before costs no SHA-256 again; 0 turns it off (unused with "xxh3").
        max_tiers_per_pod: tier names other than the built-in ones (GPU, CPU, DISK, FS, OBJ,
        STORAGE, CXL) and those in tier_weights that one pod may hold blocks in at once; a
        store naming one more is refused for that pod only (counted in `tiers_refused`).
        Names no entry uses any more are reclaimed."""
    @property
    def block_size(self) -> int: ...
    @property
    def algorithm(self) -> str: ...
    @property
    def hash_seed(self) -> str | None: ...
    @property
    def shards(self) -> int: ...
    def token_processor(self) -> TokenProcessor: ...
    def block_keys(
        self, token_ids: Sequence[int], *, lora_name: str | None = None, cache_salt: str | None = None
    ) -> list[int]: ...
    # -- write path: queued on the pod's shard, applied in per-pod order off the GIL ---------
    def submit(self, pod: str, model: str, seq: int, payload: bytes) -> bool:
        """Queue one msgpack event batch. Blocks (GIL released) while the shard queue is full;
        returns False if it had to wait (push-back, also counted)."""
    def clear_pod(self, pod: str) -> None:
        """Queue: drop every block of the pod (all tiers, all models), ordered after its
        earlier batches."""
    def remove_pod(self, pod: str) -> None:
        """Queue: clear the pod and forget its state."""
    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every batch queued so far is applied. False on timeout."""
    # -- synchronous write path (caller's thread, GIL released) -------------------------------
    def apply(self, pod: str, model: str, payload: bytes, seq: int | None = None) -> ApplyResult:
        """Decode and apply one batch now. Never raises for bad payloads: they are counted."""
    def add_blocks(self, pod: str, model: str, keys: Sequence[int], tier: str = "GPU") -> None: ...
    def remove_blocks(self, pod: str, model: str, keys: Sequence[int], tier: str = "GPU") -> None: ...
    # -- read path ------------------------------------------------------------------------------
    def score(
        self,
        model: str,
        token_ids: Sequence[int],
        *,
        lora_name: str | None = None,
        cache_salt: str | None = None,
        pods: Sequence[str] | None = None,
    ) -> ScoreResult: ...
    def score_keys(self, model: str, keys: Sequence[int], *, pods: Sequence[str] | None = None) -> ScoreResult:
        """Score precomputed block keys (each block counts block_size tokens)."""
    def lookup(
        self, model: str, keys: Sequence[int], *, pods: Sequence[str] | None = None
    ) -> list[list[tuple[str, str]]]:
        """Per key, the (pod, tier) entries holding it."""
    def pod_state(self, pod: str) -> PodState | None: ...
    def pod_states(self) -> list[PodState]: ...
    def stats(self) -> IndexStats: ...
    def counters(self) -> dict[str, int]:
        """Monotonic counters: batches, events by type and outcome, decode errors,
        unknown parents, push-backs, evictions..."""
    def close(self) -> None:
        """Apply what is queued, then stop the shard workers."""
    # -- snapshots (warm restart) ----------------------------------------------------------------
    def snapshot(self) -> SnapshotStream:
        """Stream the whole index (versioned binary format, xxh3-checksummed) without stopping
        ingestion or scoring: each chunk copies one shard under that shard's lock only."""
    def load_snapshot(self, data: bytes) -> _SnapshotLoaded:
        """Load a snapshot into this fresh indexer (no pod or model yet), keys in their LRU
        order; each pod's last_seq is its last batch fully applied when the snapshot began.
        Raises SnapshotMismatchError / SnapshotError; on error nothing is applied."""
    def load_snapshot_file(self, path: str | os.PathLike[str]) -> _SnapshotLoaded:
        """`load_snapshot` of a file's contents (read without the GIL); OSError if unreadable."""
    def check_snapshot_header(self, data: bytes) -> None:
        """Check only the header (``data`` may end right after it): SnapshotMismatchError when
        it was written with another block size, algorithm or seed."""

# -- the core's share of a shared (Redis / Valkey) index: no storage, no network -------------
@final
class RecordDecoder:
    """Msgpack event batches -> index records keyed by kvindex's block keys (computed from the
    tokens). Remembers up to ``max_known`` engine hashes (two generations) to resolve parents,
    removals and token-less stores."""

    def __new__(
        cls,
        *,
        block_size: int = 16,
        hash_seed: str | None = None,
        algorithm: str = "sha256_cbor",
        max_known: int = 1_000_000,
    ) -> Self: ...
    @property
    def known(self) -> int: ...
    def decode(self, model: str, payload: bytes) -> tuple[list[tuple[str, str, list[int]]], dict[str, int]]:
        """(records, counts): records are ("store" | "remove", tier, keys) or ("clear", "", []);
        counts: events, unknown_parents, decode_errors, unknown_event_types. Never raises."""

def score_entries(
    entries: Sequence[Sequence[tuple[str, str]]],
    *,
    block_size: int,
    total_blocks: int,
    total_tokens: int,
    tier_weights: Mapping[str, float] | None = None,
    pods: Sequence[str] | None = None,
) -> ScoreResult:
    """Score per-key (pod, tier) entries (block order) with the rules of ``Indexer.score``."""

def score_packed(
    packed: Sequence[bytes],
    *,
    block_size: int,
    total_blocks: int,
    total_tokens: int,
    tier_weights: Mapping[str, float] | None = None,
    pods: Sequence[str] | None = None,
) -> ScoreResult:
    """``score_entries`` over one byte string per key: ``pod 0x1f tier`` items joined by 0x1e."""
