"""Routing policies compared by the simulator (the registry of names is :mod:`.routers`).

Each router picks a pod index for a request given a view of the fleet at the request's
arrival time. Baselines (random, round-robin, session-sticky, least-loaded) know nothing
of caches; the kvindex routers only know what kvindex learnt from the pods' published
events; the bounds (``oracle``, ``oracle-greedy``) and the approximate baseline are in
:mod:`.bounds`.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from .ingest import KvindexFeed
from .pod import SimPod
from .workloads import Request

__all__ = [
    "BASELINE_ROUTERS",
    "FleetView",
    "KvindexDirectRouter",
    "LeastLoadedRouter",
    "RandomRouter",
    "RoundRobinRouter",
    "Router",
    "SessionStickyRouter",
]

log = logging.getLogger(__name__)


class FleetView(Protocol):
    """What the engine shows a router: the pods, the time, and each pod's queue."""

    @property
    def pods(self) -> Sequence[SimPod]: ...
    @property
    def now(self) -> float: ...
    def load(self, i: int) -> int:
        """Requests running or waiting on pod ``i``."""
        ...

    def prompt_keys(self, req: Request) -> Sequence[int]:
        """The block keys of ``req``'s prompt as the pods hash it (computed once per run)."""
        ...


class Router:
    """Base class: ``bind`` once to a fresh fleet, ``pick`` per request, ``close`` at the end."""

    name = "router"
    needs_events = False
    """True if the fleet must publish KV events (and run real sockets) for this router."""

    def __init__(self, seed: int) -> None:
        # One stream per seed, shared by all routers: the oracle and kvindex then break ties
        # identically, so any difference between them is what kvindex did not know.
        self.rng = random.Random(f"router/{seed}")

    def bind(self, fleet: FleetView, **kwargs: Any) -> None:
        del fleet, kwargs

    def pick(self, req: Request, fleet: FleetView) -> int:
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass

    def _least_loaded(self, fleet: FleetView, candidates: Sequence[int]) -> int:
        """Among candidates, the least loaded; remaining ties broken by the seeded rng."""
        loads = [fleet.load(i) for i in candidates]
        low = min(loads)
        best = [c for c, ld in zip(candidates, loads, strict=True) if ld == low]
        return best[0] if len(best) == 1 else self.rng.choice(best)


class RandomRouter(Router):
    name = "random"

    def pick(self, req: Request, fleet: FleetView) -> int:
        return self.rng.randrange(len(fleet.pods))


class RoundRobinRouter(Router):
    name = "round-robin"

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self._next = 0

    def pick(self, req: Request, fleet: FleetView) -> int:
        i = self._next % len(fleet.pods)
        self._next += 1
        return i


class SessionStickyRouter(Router):
    """Hash of the session id (consistent across runs: not Python's salted ``hash``)."""

    name = "session-sticky"

    def pick(self, req: Request, fleet: FleetView) -> int:
        key = req.session if req.session is not None else f"request-{req.rid}"
        digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") % len(fleet.pods)


class LeastLoadedRouter(Router):
    name = "least-loaded"

    def pick(self, req: Request, fleet: FleetView) -> int:
        return self._least_loaded(fleet, range(len(fleet.pods)))


def _best_prefix(router: Router, fleet: FleetView, matched: Sequence[int]) -> int:
    top = max(matched)
    return router._least_loaded(fleet, [i for i, m in enumerate(matched) if m == top])


class KvindexDirectRouter(Router):
    """kvindex's scores from ``Indexer.score`` in process (no HTTP/gRPC hop); same policy as
    ``oracle-greedy`` (longest prefix, ties by load) so the two differ only by what they know."""

    name = "kvindex-direct"
    needs_events = True

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.feed: KvindexFeed | None = None

    def bind(self, fleet: FleetView, **kwargs: Any) -> None:
        self.feed = KvindexFeed(
            fleet.pods,
            kwargs["zmq_context"],
            model=kwargs["model"],
            hash_seed=kwargs.get("hash_seed"),
        )

    def pick(self, req: Request, fleet: FleetView) -> int:
        feed = self.feed
        assert feed is not None, "bind() first"
        feed.sync()
        ids = [p.pod_id for p in fleet.pods]
        result = feed.indexer.score(feed.model, req.token_ids, pods=ids)
        by_pod = {s.pod: s.matched_blocks for s in result.scores}
        choice = _best_prefix(self, fleet, [by_pod.get(i, 0) for i in ids])
        feed.check(fleet.pods[choice], fleet.prompt_keys(req))
        return choice

    def stats(self) -> dict[str, Any]:
        if self.feed is None:
            return {}
        return {
            "index_accuracy": self.feed.accuracy.as_dict(),
            "subscriber": self.feed.subscriber_kind,
        }

    def close(self) -> None:
        if self.feed is not None:
            self.feed.close()
            self.feed = None


BASELINE_ROUTERS: dict[str, Callable[[int], Router]] = {
    RandomRouter.name: RandomRouter,
    RoundRobinRouter.name: RoundRobinRouter,
    SessionStickyRouter.name: SessionStickyRouter,
    LeastLoadedRouter.name: LeastLoadedRouter,
    KvindexDirectRouter.name: KvindexDirectRouter,
}
