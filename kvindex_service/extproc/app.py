"""A running picker: the ext_proc gRPC server (:mod:`.server`), its :class:`Picker`, the
endpoint source (:mod:`.endpoints`), the health port (:mod:`.health`) and the metrics
exporter, started and stopped together by :func:`start_picker`."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from kvindex_service.extproc.bind import check_free, grpc_target
from kvindex_service.extproc.config import ExtprocConfig
from kvindex_service.extproc.endpoints import EndpointSet, start_endpoint_watch
from kvindex_service.extproc.health import HealthServer
from kvindex_service.extproc.interceptors import ErrorMappingInterceptor
from kvindex_service.extproc.metrics import PickerMetrics
from kvindex_service.extproc.picker import Picker
from kvindex_service.extproc.scorer_client import HttpScorer, Scorer
from kvindex_service.extproc.security import ConfigError, scorer_ssl_context, scorer_token, server_credentials
from kvindex_service.extproc.server import ExternalProcessorServicer
from kvindex_service.extproc.stats import StreamStats

if TYPE_CHECKING:
    from kvindex_service.discovery.endpoints import EndpointWatch

__all__ = ["PickerServer", "start_picker"]

log = logging.getLogger(__name__)


class PickerServer:
    """A running picker: the gRPC server, its :class:`Picker` and its metrics."""

    def __init__(
        self,
        server: grpc.aio.Server,
        port: int,
        picker: Picker,
        metrics: PickerMetrics,
        stats: StreamStats,
        owned_scorer: Scorer | None,
        watch: EndpointWatch | None = None,
        health: HealthServer | None = None,
    ) -> None:
        self.server = server
        self.port = port
        self.picker = picker
        self.metrics = metrics
        self.stats = stats
        self._owned_scorer = owned_scorer
        self.watch = watch
        """The Kubernetes endpoint watch (None: a static list)."""
        self.health = health
        self._stopped = False

    @property
    def endpoints(self) -> EndpointSet:
        return self.picker.endpoints

    @property
    def health_port(self) -> int | None:
        return self.health.port if self.health is not None else None

    @property
    def metrics_port(self) -> int | None:
        return self.metrics.port

    async def stop(self, grace: float | None = 1.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.health is not None:
            await self.health.stop()
        await self.server.stop(grace)
        if self.watch is not None:
            await asyncio.to_thread(self.watch.stop)
        self.metrics.close()
        if self._owned_scorer is not None:
            await self._owned_scorer.close()


def _add_health(server: grpc.aio.Server) -> Any:
    try:
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    except ImportError:  # grpcio-health-checking is optional
        log.info("grpcio-health-checking not installed: no grpc.health.v1 service")
        return None
    servicer = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return servicer, health_pb2


async def start_picker(
    config: ExtprocConfig,
    *,
    scorer: Scorer | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    scorer_bearer: str | None = None,
    health_port: int | None = None,
) -> PickerServer:
    """Start the ext_proc server on ``host:port`` (0 = a free port) and, if configured, the
    metrics exporter. Without ``scorer``, an :class:`HttpScorer` on ``config.scorer_url`` is
    created (and closed by :meth:`PickerServer.stop`), sending ``scorer_bearer`` (default:
    :func:`.security.scorer_token`); with neither, picks use load only. With
    ``config.tls_cert``/``tls_key`` the server speaks TLS only (mTLS with ``tls_client_ca``).
    With ``health_port`` (0 = any free port) a :class:`.health.HealthServer` listens there. A
    pool or selector in the config starts the Kubernetes endpoint watch (``ConfigError`` when
    there is no usable Kubernetes configuration).

    Raises :class:`.security.ConfigError` for unusable settings and :class:`OSError` when a
    port is taken."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: expected 0-65535")
    credentials = server_credentials(config)
    owned: Scorer | None = None
    if scorer is None and config.scorer_url:
        token = scorer_bearer if scorer_bearer is not None else scorer_token(config)
        verify = scorer_ssl_context(config)
        scorer = owned = HttpScorer(
            config.scorer_url, timeout_ms=config.timeout_ms, token=token, verify=True if verify is None else verify
        )
    endpoints = EndpointSet.for_config(config)
    try:
        watch = start_endpoint_watch(config, endpoints)
    except ValueError as exc:
        if owned is not None:
            await owned.close()
        raise ConfigError(str(exc)) from None
    picker = Picker(config, scorer, endpoints=endpoints)
    health: HealthServer | None = None
    if health_port is not None:
        probe = getattr(scorer, "ready", None)
        health = HealthServer(
            (lambda: watch.synced) if watch is not None else (lambda: True),
            None if config.ready_without_scorer else probe,
        )
    stats = StreamStats()
    metrics = PickerMetrics(picker, stats)
    picker.on_scorer_latency = metrics.scorer_seconds.observe
    limit = config.max_body_bytes + (1 << 20)
    server = grpc.aio.server(
        interceptors=[ErrorMappingInterceptor(stats)],
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            # Without this a second picker on the same port would silently share it.
            ("grpc.so_reuseport", 0),
        ],
    )
    ep_grpc.add_ExternalProcessorServicer_to_server(ExternalProcessorServicer(picker, config, metrics, stats), server)
    main_health = _add_health(server)
    try:
        check_free(host, port)
        target = grpc_target(host, port)
        try:
            if credentials is None:
                bound = server.add_insecure_port(target)
            else:
                bound = server.add_secure_port(target, credentials)
        except RuntimeError:
            bound = 0
        if bound == 0:
            raise OSError(f"cannot listen on {host}:{port}")
        await server.start()
        if health is not None:
            await health.start(host, health_port or 0)  # plaintext: kubelet gRPC probes speak no TLS
        if main_health is not None:
            servicer, health_pb2 = main_health
            for name in ("", "envoy.service.ext_proc.v3.ExternalProcessor"):
                await _maybe_await(servicer.set(name, health_pb2.HealthCheckResponse.SERVING))
        if config.metrics_port:
            try:
                metrics.serve(config.metrics_port, config.metrics_host)
            except OSError as exc:
                raise OSError(
                    exc.errno,
                    f"cannot listen on {config.metrics_host}:{config.metrics_port} (metrics): {exc.strerror or exc}",
                ) from None
    except BaseException:
        if health is not None:
            await health.stop()
        await server.stop(None)
        if watch is not None:
            await asyncio.to_thread(watch.stop)
        if owned is not None:
            await owned.close()
        raise
    log.info(
        "ext_proc picker listening",
        extra={"host": host, "port": bound, "tls": credentials is not None, "endpoints": len(config.endpoints)},
    )
    return PickerServer(server, bound, picker, metrics, stats, owned, watch, health)


async def _maybe_await(value: Any) -> None:
    if hasattr(value, "__await__"):
        await value
