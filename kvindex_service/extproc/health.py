"""gRPC health (``grpc.health.v1``) on its own port, with the service names GAIE's chart probes.

=================================================  ==================================================
service                                            SERVING when
=================================================  ==================================================
``liveness``                                       the process answers
``readiness``, ``inference-extension``, ``""``,    the endpoints are known (a static list, or the
``envoy.service.ext_proc.v3.ExternalProcessor``    pool and its pods listed) and the scorer answers
                                                   ``GET /readyz`` (or there is no scorer, or
                                                   ``ready_without_scorer`` is set)
=================================================  ==================================================

Anything else is NOT_FOUND (grpc's health servicer). The state is re-checked every
``interval`` seconds (``slow_interval`` once ready) by one task on the picker's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kvindex_service.extproc.bind import check_free, grpc_target

__all__ = ["LIVENESS", "READINESS_NAMES", "HealthServer"]

log = logging.getLogger(__name__)

LIVENESS = "liveness"
READINESS_NAMES = ("readiness", "inference-extension", "", "envoy.service.ext_proc.v3.ExternalProcessor")
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthServer:
    """The health port. ``endpoints_known`` and ``scorer_ready`` (None: no scorer to wait
    for) say whether the picker is ready."""

    def __init__(
        self,
        endpoints_known: Callable[[], bool],
        scorer_ready: Callable[[], Awaitable[bool]] | None,
        *,
        interval: float = 1.0,
        slow_interval: float = 5.0,
    ) -> None:
        self._known = endpoints_known
        self._scorer_ready = scorer_ready
        self._interval = interval
        self._slow = slow_interval
        self._servicer = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.port: int | None = None
        self.ready = False
        self.reason = "starting"

    async def start(self, host: str, port: int, credentials: grpc.ServerCredentials | None = None) -> int:
        """Listen on ``host:port`` (0: any free port); returns the bound port. OSError when
        the port is taken."""
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, server)
        check_free(host, port)
        target = grpc_target(host, port)
        try:
            bound = (
                server.add_insecure_port(target) if credentials is None else server.add_secure_port(target, credentials)
            )
        except RuntimeError:
            bound = 0
        if bound == 0:
            raise OSError(f"cannot listen on {host}:{port} (health)")
        await self._servicer.set(LIVENESS, _SERVING)
        await self.check()
        await server.start()
        self._server, self.port = server, bound
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="kvindex-extproc-health")
        return bound

    async def check(self) -> bool:
        """Compute readiness now and publish it to every readiness name."""
        if not self._known():
            ready, reason = False, "endpoints not known yet"
        elif self._scorer_ready is not None and not await self._scorer_ready():
            ready, reason = False, "the scorer does not answer"
        else:
            ready, reason = True, "ready"
        if (ready, reason) != (self.ready, self.reason):
            log.info("picker readiness: %s", reason)
        self.ready, self.reason = ready, reason
        for name in READINESS_NAMES:
            await self._servicer.set(name, _SERVING if ready else _NOT_SERVING)
        return ready

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._slow if self.ready else self._interval)
            try:
                await self.check()
            except Exception:  # a failing check must not end the loop
                log.exception("health check failed")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._servicer.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(None)
