"""Bounds and the approximate baseline: routers that decide with the kvindex picker's own
policy but from other knowledge, and the workload's infinite-cache reuse bound.

* ``oracle``: the picker's utility ``kv * weighted_prefix - load * (inflight - min_inflight)``
  (same weights, session affinity and round-robin tie-break: the real
  :class:`~kvindex_service.extproc.Picker` decides) fed with the pods' *true* block pools, so
  it differs from ``kvindex`` only by what it knows;
* ``oracle-greedy``: longest true prefix, ties by load (the policy of ``kvindex-direct``);
* ``approximate``: what a router-side prefix-cache scorer (GAIE's, without KV events) does:
  it remembers per pod, in an LRU of ``approx_capacity`` blocks, which chunk hashes it sent
  there, and scores pods by that remembered prefix with the picker's policy. It never
  learns about evictions.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Coroutine, Iterable, Sequence
from itertools import repeat, takewhile
from typing import TYPE_CHECKING, Any

from .keys import BlockKeys
from .pod import _consume
from .policies import FleetView, Router, _best_prefix
from .workloads import Request

if TYPE_CHECKING:
    from kvindex_service.extproc import KvScores, Lease, Picker, PromptQuery

__all__ = [
    "ApproximateRouter",
    "OracleGreedyRouter",
    "OracleRouter",
    "PickerPolicy",
    "reuse_bound",
]

SESSION_TTL_S = 1e12
"""Sessions never expire by (wall-clock) time in a simulation."""


def picker_config(endpoints: Sequence[str], load_weight: float | None) -> Any:
    """The ``ExtprocConfig`` the simulator's pickers run with (as the ``kvindex`` router's)."""
    from kvindex_service.extproc import ExtprocConfig

    config = ExtprocConfig.model_validate(
        {"endpoints": list(endpoints), "timeout_ms": 10_000.0, "session_ttl_s": SESSION_TTL_S}
    )
    if load_weight is not None:
        weights = config.weights.model_copy(update={"load": load_weight})
        config = config.model_copy(update={"weights": weights})
    return config


def _run_sync(coro: Coroutine[Any, Any, Any]) -> Any:
    """Drive a coroutine that never suspends (the picker with a scorer that returns at once)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise RuntimeError("the picker suspended; the simulator's policy must not wait")


class _FixedScorer:
    """A picker ``Scorer`` answering with the scores the router set just before the pick."""

    def __init__(self) -> None:
        self.answer: KvScores | None = None

    async def score(self, query: PromptQuery, pods: Sequence[str]) -> KvScores:
        del query, pods
        assert self.answer is not None
        return self.answer

    async def close(self) -> None:
        pass


class PickerPolicy:
    """The real picker's choice (``Picker.pick``) called with plain numbers: matched blocks
    per pod, the prompt's full blocks, and the fleet's loads mirrored as leases."""

    def __init__(self, endpoints: Sequence[str], load_weight: float | None, model: str) -> None:
        from kvindex_service.extproc import Picker, PromptQuery

        self.ids = list(endpoints)
        self._scorer = _FixedScorer()
        self.picker: Picker = Picker(picker_config(self.ids, load_weight), self._scorer, clock=lambda: 0.0)
        self._query = PromptQuery(model=model, token_ids=[])
        self._leases: list[deque[Lease]] = [deque() for _ in self.ids]

    def choose(self, matched: Sequence[int], total_blocks: int, fleet: FleetView, session: str | None) -> int:
        from kvindex_service.extproc import KvScores

        # Mirror running + waiting into the picker's in-flight counts (in the engine the load
        # only grows by our own picks, so this only releases the oldest leases, as the kvindex
        # router finishes its oldest streams).
        for i, leases in enumerate(self._leases):
            load = fleet.load(i)
            while len(leases) > load:
                leases.popleft().release()
            while len(leases) < load:
                leases.append(self.picker.acquire(self.ids[i]))
        rows = ((pod, m, float(m)) for pod, m in zip(self.ids, matched, strict=True))
        self._scorer.answer = KvScores.from_rows(total_blocks, rows)
        decision = _run_sync(self.picker.pick(self._query, session=session))
        if decision.endpoint is None or decision.lease is None:
            raise RuntimeError(f"the picker refused a simulated request: {decision.message}")
        choice = self.ids.index(decision.endpoint)
        self._leases[choice].append(decision.lease)
        return choice

    def stats(self) -> dict[str, Any]:
        return {"picker": self.picker.stats()}


class _PickerRouter(Router):
    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.policy: PickerPolicy | None = None

    def bind(self, fleet: FleetView, **kwargs: Any) -> None:
        self.policy = PickerPolicy(
            [p.pod_id for p in fleet.pods], kwargs.get("picker_load_weight"), kwargs.get("model", "sim")
        )

    def stats(self) -> dict[str, Any]:
        return self.policy.stats() if self.policy is not None else {}


class OracleRouter(_PickerRouter):
    """The picker's policy on the pods' true cached prefixes."""

    name = "oracle"

    def pick(self, req: Request, fleet: FleetView) -> int:
        assert self.policy is not None, "bind() first"
        keys = fleet.prompt_keys(req)
        matched = [p.pool.cached_prefix(keys) for p in fleet.pods]
        return self.policy.choose(matched, len(keys), fleet, req.session)


class OracleGreedyRouter(Router):
    """Longest true cached prefix over the pods' real block pools; ties by load."""

    name = "oracle-greedy"

    def pick(self, req: Request, fleet: FleetView) -> int:
        keys = fleet.prompt_keys(req)
        return _best_prefix(self, fleet, [p.pool.cached_prefix(keys) for p in fleet.pods])


class _ChunkLRU:
    """Chunk hashes a router sent to one pod, most recent last, at most ``capacity``."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._keys: OrderedDict[int, None] = OrderedDict()

    def prefix(self, keys: Iterable[int]) -> int:
        return len(list(takewhile(self._keys.__contains__, keys)))

    def add(self, keys: Sequence[int]) -> None:
        """Touch ``keys`` in order (the last one ends most recent), then evict the oldest."""
        lru = self._keys
        _consume(map(lru.__delitem__, list(filter(lru.__contains__, keys))))
        _consume(map(lru.__setitem__, keys, repeat(None)))
        for _ in range(len(lru) - self.capacity):
            lru.popitem(last=False)


class ApproximateRouter(_PickerRouter):
    """Router-side guess of the pods' caches (no KV events), scored with the picker's policy."""

    name = "approximate"

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self._lru: list[_ChunkLRU] = []

    def bind(self, fleet: FleetView, **kwargs: Any) -> None:
        super().bind(fleet, **kwargs)
        cap = kwargs.get("approx_capacity") or fleet.pods[0].pool.capacity
        self._lru = [_ChunkLRU(int(cap)) for _ in fleet.pods]

    def pick(self, req: Request, fleet: FleetView) -> int:
        assert self.policy is not None, "bind() first"
        keys = fleet.prompt_keys(req)
        # No session affinity: a prefix-cache scorer knows prefixes, not sessions.
        choice = self.policy.choose([lru.prefix(keys) for lru in self._lru], len(keys), fleet, None)
        self._lru[choice].add(keys)
        return choice


def reuse_bound(requests: Iterable[Request], keys: BlockKeys) -> dict[str, Any]:
    """The infinite-cache reuse bound: prompt tokens in full blocks seen earlier in the stream
    (in a prompt or an output; never the block holding the prompt's last token, which vLLM
    always recomputes), over all prompt tokens. No router on any fleet can hit more."""
    seen: set[int] = set()
    reusable = total = 0
    bs = keys.block_size
    for req in requests:
        max_hit = (len(req.token_ids) - 1) // bs
        n = len(list(takewhile(seen.__contains__, keys.prompt(req)[:max_hit])))
        reusable += n * bs
        total += len(req.token_ids)
        seen.update(keys.full(req))
    return {
        "reusable_tokens": reusable,
        "prompt_tokens": total,
        "hit_rate": reusable / total if total else None,
    }
