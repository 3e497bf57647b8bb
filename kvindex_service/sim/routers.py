"""The router registry: names to router classes, for ``kvindex simulate --routers``.

The policies live in :mod:`.policies`; the ``kvindex`` router (the real ext_proc picker) in
:mod:`.picker_router`, imported only when asked for because it brings in gRPC. This module
depends on both, neither depends on it.
"""

from __future__ import annotations

from collections.abc import Callable

from .bounds import ApproximateRouter, OracleGreedyRouter, OracleRouter
from .policies import (
    BASELINE_ROUTERS,
    FleetView,
    KvindexDirectRouter,
    LeastLoadedRouter,
    RandomRouter,
    RoundRobinRouter,
    Router,
    SessionStickyRouter,
)

__all__ = [
    "BASELINE_ROUTERS",
    "ApproximateRouter",
    "FleetView",
    "KvindexDirectRouter",
    "LeastLoadedRouter",
    "OracleGreedyRouter",
    "OracleRouter",
    "RandomRouter",
    "RoundRobinRouter",
    "Router",
    "SessionStickyRouter",
    "make_router",
    "router_names",
]


def _registry() -> dict[str, Callable[[int], Router]]:
    from .picker_router import KvindexPickerRouter  # imports grpc; only when asked for

    reg = dict(BASELINE_ROUTERS)
    reg["kvindex"] = KvindexPickerRouter
    reg[OracleRouter.name] = OracleRouter
    reg[OracleGreedyRouter.name] = OracleGreedyRouter
    reg[ApproximateRouter.name] = ApproximateRouter
    return reg


def router_names() -> list[str]:
    return list(_registry())


def make_router(name: str, seed: int) -> Router:
    reg = _registry()
    if name not in reg:
        raise ValueError(f"unknown router {name!r}; choose from {', '.join(reg)}")
    router = reg[name](seed)
    router.name = name
    return router
