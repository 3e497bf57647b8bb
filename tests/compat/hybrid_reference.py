"""A pure-Python reference of vLLM's cache-hit rule for hybrid-attention models (the oracle of
tests/compat/test_hybrid.py), written from vLLM 0.33.0's ``vllm/v1/core/`` for block sizes
equal across groups (no fine-grained / partial hash hits, no EAGLE):

* ``kv_cache_coordinator.py`` ``HybridKVCacheCoordinator.verify_and_split_kv_cache_groups``
  (line 718): groups with one spec are looked up together — a block counts only when every
  group of the spec holds it (``block_pool.py`` ``BlockPool.get_cached_block``, line 202) — and
  full-attention specs go first (the stable sort at line 758).
* ``HybridKVCacheCoordinator.find_longest_cache_hit`` (line 806): each spec accepts or shortens
  the candidate length; repeat until none shortens it; one pass when there are exactly two
  specs and the first is full attention (``is_simple_hybrid``, line 838). One group:
  ``UnitaryKVCacheCoordinator.find_longest_cache_hit`` (line 582), the manager alone.
* ``single_type_kv_cache_manager.py`` ``FullAttentionManager.find_longest_cache_hit`` (line 743,
  "Phase 1" at line 792): the run of held blocks from block 0.
* ``SlidingWindowManager.find_longest_cache_hit`` (line 969): ``_contiguous_blocks_for_hit``
  (line 956) = ``cdiv(sliding_window - 1, block_size)``; from the last block down (line 1015),
  the first run of that many held blocks ends the hit; with none, the run of held blocks from
  block 0 is the hit (line 1040).
* ``MambaManager.find_longest_cache_hit`` (line 1470, loop at line 1523): the last held block
  ends the hit.

The bound is every full block of the prompt (kvindex's scores; vLLM itself also stops one token
short of the prompt, ``kv_cache_manager.py`` line 302). Kinds other than sliding window and
Mamba are scored as full attention.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Group:
    kind: str  # "full_attention", "sliding_window" or "mamba"
    window: int | None = None  # tokens, sliding window only


def _spec_key(g: Group) -> tuple[str, int | None]:
    if g.kind == "sliding_window" and g.window:
        return ("sliding_window", g.window)
    if g.kind == "mamba":
        return ("mamba", None)
    return ("full_attention", None)


def hit(groups: Sequence[Group], held: Callable[[int, int], bool], num_blocks: int, block_size: int) -> int:
    """The hit in blocks; ``held(group, block)`` says whether the group holds the block."""
    specs: dict[tuple[str, int | None], list[int]] = {}
    for gid, g in enumerate(groups):
        specs.setdefault(_spec_key(g), []).append(gid)
    order = sorted(specs.items(), key=lambda kv: kv[0][0] != "full_attention")

    def cached(members: list[int], block: int) -> bool:
        return all(held(g, block) for g in members)

    def find(spec: tuple[str, int | None], members: list[int], max_blocks: int) -> int:
        kind, window = spec
        if kind == "full_attention":
            n = 0
            while n < max_blocks and cached(members, n):
                n += 1
            return n
        if kind == "mamba":
            return next((i + 1 for i in range(max_blocks - 1, -1, -1) if cached(members, i)), 0)
        assert window is not None
        need = -(-(window - 1) // block_size)
        run = 0
        for i in range(max_blocks - 1, -1, -1):
            if cached(members, i):
                run += 1
                if run >= need:
                    return i + run
            else:
                run = 0
        return run

    if len(groups) == 1:
        (spec, members), *_ = order
        return find(spec, members, num_blocks)
    simple = len(order) == 2 and order[0][0][0] == "full_attention"
    hit_len = num_blocks
    seen: dict[int, int] = {}
    while True:
        curr = hit_len
        for i, (spec, members) in enumerate(order):
            if spec[0] == "full_attention" and i in seen:
                curr = min(curr, seen[i])
                continue
            curr = find(spec, members, curr)
            seen[i] = curr
        if curr >= hit_len:
            return hit_len
        hit_len = curr
        if simple:
            return hit_len
