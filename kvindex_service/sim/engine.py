"""The discrete-event run loop: one fresh fleet per router, the same request stream for all.

Simulated time drives the service model (prefill per uncached token, decode per output
token, a cap on concurrently running requests per pod) and runs as fast as the machine
allows. The KV events are nevertheless real: pods publish on ZMQ sockets as their pools
change, and a kvindex router waits, before deciding at time t, until kvindex has applied
everything published up to t. A run is therefore deterministic for a given seed.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import zmq

from kvindex_service import TokenProcessor

from .keys import BlockKeys
from .pod import Allocation, BlockPool, EventPublisher, SimPod
from .routers import Router, make_router
from .workloads import Request

__all__ = [
    "FleetConfig",
    "RequestRecord",
    "RouterRun",
    "ServiceModel",
    "block_keys_for",
    "run_router",
    "simulate",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceModel:
    """Modeled engine speed. Defaults are in the range of an 8B model on one modern GPU."""

    prefill_s_per_token: float = 0.0002
    decode_s_per_token: float = 0.02
    max_running: int = 8
    """Requests a pod runs at once; the others wait in FIFO order (as vLLM's scheduler)."""
    serial_prefill: bool = True
    """Prefill is compute-bound: a pod's prefills run one after another (decode overlaps),
    so uncached tokens sent to one pod delay the first token of the requests behind them."""


@dataclass(frozen=True)
class FleetConfig:
    pods: int = 3
    pod_capacity: int = 1024
    """KV blocks per pod."""
    block_size: int = 16
    model: str = "sim/llama-3-8b"
    hash_seed: str | None = None
    first_port: int = 18001
    replay_buffer: int = 1000
    service: ServiceModel = field(default_factory=ServiceModel)
    picker_load_weight: float | None = None
    """The `kvindex` router's picker: cost of one extra in-flight request (None: its default)."""
    approx_capacity: int | None = None
    """The `approximate` router's LRU of chunk hashes per pod, in blocks (None: pod_capacity)."""

    def pod_ids(self) -> list[str]:
        """Names shaped like routable ``ip:port`` endpoints; nothing connects to them."""
        return [f"127.0.0.1:{self.first_port + i}" for i in range(self.pods)]


@dataclass
class RequestRecord:
    rid: int
    pod: int
    arrival: float
    prompt_tokens: int
    output_tokens: int
    session: str | None
    cached_tokens: int = 0
    admitted: float | None = None
    first_token: float | None = None
    finished: float | None = None
    rejected: bool = False

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival


@dataclass
class RouterRun:
    """Everything one router's run produced; ``report`` turns it into numbers."""

    router: str
    pod_ids: list[str]
    records: list[RequestRecord]
    evictions: list[int]
    router_stats: dict[str, Any]
    wall_seconds: float


class _Server:
    def __init__(self, pod: SimPod) -> None:
        self.pod = pod
        self.running = 0
        self.waiting: deque[Request] = deque()
        self.prefill_free_at = 0.0


class _Fleet:
    """The FleetView routers see."""

    def __init__(self, pods: list[SimPod], keys: BlockKeys) -> None:
        self._pods = pods
        self.servers = [_Server(p) for p in pods]
        self._now = 0.0
        self.keys = keys

    @property
    def pods(self) -> Sequence[SimPod]:
        return self._pods

    @property
    def now(self) -> float:
        return self._now

    def load(self, i: int) -> int:
        s = self.servers[i]
        return s.running + len(s.waiting)

    def prompt_keys(self, req: Request) -> Sequence[int]:
        return self.keys.prompt(req)


_ARRIVAL, _FINISH = 0, 1


class _Joined(Sequence[int]):
    """Prompt + output as one sequence without copying both (a pod slices a few blocks)."""

    def __init__(self, head: Sequence[int], tail: Sequence[int]) -> None:
        self._head, self._tail = head, tail

    def __len__(self) -> int:
        return len(self._head) + len(self._tail)

    @overload
    def __getitem__(self, i: int) -> int: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[int]: ...
    def __getitem__(self, i: int | slice) -> int | Sequence[int]:
        n = len(self._head)
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                return [self[j] for j in range(start, stop, step)]
            if stop <= n:
                return self._head[start:stop]
            if start >= n:
                return self._tail[start - n : stop - n]
            return [*self._head[start:], *self._tail[: stop - n]]
        if i < 0:
            i += len(self)
        return self._head[i] if i < n else self._tail[i - n]


def block_keys_for(cfg: FleetConfig) -> BlockKeys:
    """An empty key cache hashing as the fleet's pods do."""
    return BlockKeys(TokenProcessor(cfg.block_size, cfg.hash_seed, "sha256_cbor"))


def _build_pods(cfg: FleetConfig, ctx: zmq.Context[Any] | None, processor: TokenProcessor) -> list[SimPod]:
    pods: list[SimPod] = []
    try:
        for pod_id in cfg.pod_ids():
            pub = None
            if ctx is not None:
                pub = EventPublisher(
                    ctx,
                    pod_id,
                    cfg.model,
                    replay_endpoint="tcp://127.0.0.1:*",
                    buffer_steps=cfg.replay_buffer,
                )
            pods.append(SimPod(pod_id, BlockPool(cfg.pod_capacity, cfg.block_size), processor, pub))
    except BaseException:
        for p in pods:
            if p.publisher is not None:
                p.publisher.close()
        raise
    return pods


def run_router(
    router: Router,
    requests: Sequence[Request],
    cfg: FleetConfig,
    *,
    on_request: Callable[[], None] | None = None,
    keys: BlockKeys | None = None,
) -> RouterRun:
    """Serve ``requests`` on a fresh fleet routed by ``router`` (closed afterwards).
    ``keys``: the request list's key cache, shared between runs (default: a fresh one)."""
    started = time.perf_counter()
    keys = keys if keys is not None else block_keys_for(cfg)
    ctx: zmq.Context[Any] | None = zmq.Context() if router.needs_events else None
    pods: list[SimPod] = []
    try:
        pods = _build_pods(cfg, ctx, keys.processor)
        fleet = _Fleet(pods, keys)
        router.bind(
            fleet,
            zmq_context=ctx,
            model=cfg.model,
            hash_seed=cfg.hash_seed,
            picker_load_weight=cfg.picker_load_weight,
            approx_capacity=cfg.approx_capacity,
        )
        records = _serve(router, fleet, requests, cfg.service, on_request)
        stats = router.stats()
    finally:
        router.close()
        for p in pods:
            if p.publisher is not None:
                p.publisher.close()
        if ctx is not None:
            ctx.term()
    return RouterRun(
        router=router.name,
        pod_ids=[p.pod_id for p in pods],
        records=records,
        evictions=[p.pool.evictions for p in pods],
        router_stats=stats,
        wall_seconds=time.perf_counter() - started,
    )


def _serve(
    router: Router,
    fleet: _Fleet,
    requests: Sequence[Request],
    service: ServiceModel,
    on_request: Callable[[], None] | None,
) -> list[RequestRecord]:
    records: dict[int, RequestRecord] = {}
    heap: list[tuple[float, int, int, Any]] = []
    order = 0
    for r in requests:
        heap.append((r.arrival, order, _ARRIVAL, r))
        order += 1
    heapq.heapify(heap)

    def try_admit(i: int, now: float) -> None:
        nonlocal order
        server = fleet.servers[i]
        pod = server.pod
        while server.waiting and server.running < service.max_running:
            req = server.waiting[0]
            rec = records[req.rid]
            if pod.blocks_needed(req.prompt_len, req.output_len) > pod.pool.capacity:
                server.waiting.popleft()
                rec.rejected = True
                log.warning("request %d needs more blocks than pod capacity; rejected", req.rid)
                continue
            alloc = pod.admit(req.token_ids, req.output_len, now, keys=fleet.keys.prompt(req))
            if alloc is None:
                break  # FCFS: wait until a finishing request frees blocks
            server.waiting.popleft()
            server.running += 1
            cached = alloc.hit_blocks * pod.block_size
            rec.cached_tokens = cached
            rec.admitted = now
            start = max(now, server.prefill_free_at) if service.serial_prefill else now
            rec.first_token = start + (req.prompt_len - cached) * service.prefill_s_per_token
            server.prefill_free_at = rec.first_token
            rec.finished = rec.first_token + req.output_len * service.decode_s_per_token
            heapq.heappush(heap, (rec.finished, order, _FINISH, (i, req, alloc)))
            order += 1

    while heap:
        now, _, kind, item = heapq.heappop(heap)
        fleet._now = now
        if kind == _ARRIVAL:
            req: Request = item
            i = router.pick(req, fleet)
            if not 0 <= i < len(fleet.servers):
                raise RuntimeError(f"router {router.name} picked pod {i} of {len(fleet.servers)}")
            records[req.rid] = RequestRecord(
                rid=req.rid,
                pod=i,
                arrival=req.arrival,
                prompt_tokens=req.prompt_len,
                output_tokens=req.output_len,
                session=req.session,
            )
            fleet.servers[i].waiting.append(req)
            try_admit(i, now)
            if on_request is not None:
                on_request()
        else:
            i, done, alloc = item
            assert isinstance(alloc, Allocation)
            full = _Joined(done.token_ids, done.output_ids)
            fleet.servers[i].pod.finish(alloc, full, now, keys=fleet.keys.full(done))
            fleet.servers[i].running -= 1
            try_admit(i, now)
    return [records[r.rid] for r in requests]


def simulate(
    requests: Sequence[Request],
    cfg: FleetConfig,
    routers: Sequence[str],
    *,
    seed: int,
    on_request: Callable[[], None] | None = None,
    keys: BlockKeys | None = None,
) -> list[RouterRun]:
    """Run every named router on the same requests, each on its own fresh fleet, all sharing
    one key cache (``keys``, default a fresh one): each request is hashed once per run."""
    keys = keys if keys is not None else block_keys_for(cfg)
    runs: list[RouterRun] = []
    for name in routers:
        router = make_router(name, seed)
        log.info("simulating router %s on %d requests", name, len(requests))
        runs.append(run_router(router, requests, cfg, on_request=on_request, keys=keys))
    return runs
