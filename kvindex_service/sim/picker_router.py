"""The `kvindex` router: every decision goes through the real Envoy ext_proc picker
(`kvindex_service.extproc`, a gRPC server on loopback) scoring in-process with the real
`ScoringService` over an Indexer fed by the simulated pods' ZMQ events.

The picker counts in-flight requests itself; before each decision the router mirrors the
simulated fleet's load into it by finishing the oldest open streams of a pod until the
picker's count equals the pod's running + waiting requests. gRPC runs on an asyncio loop in
a helper thread; the simulator's loop stays synchronous and deterministic.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import deque
from collections.abc import Coroutine
from typing import Any, TypeVar

from kvindex_service.extproc import EnvoyClient, ExtprocConfig, InProcessScorer, start_picker
from kvindex_service.scoring import ScoringService
from kvindex_service.tokenization import TokenizerPool

from .policies import FleetView, KvindexDirectRouter
from .workloads import Request

__all__ = ["KvindexPickerRouter"]

T = TypeVar("T")

# The picker's deadlines are wall-clock; a simulated decision must not depend on how fast the
# machine is. The in-process scorer gets no deadline at all (a slow machine waits instead of
# picking without KV scores), sessions never expire by wall-clock time, and every pick that
# fell open anyway is counted (``picker.fail_open``, ``picker_fallbacks``) for tests to assert 0.
SCORER_TIMEOUT_MS = 10_000.0
"""The configured scorer deadline; unused by the in-process scorer, which has none."""
SESSION_TTL_S = 1e12


class KvindexPickerRouter(KvindexDirectRouter):
    name = "kvindex"

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: Any = None
        self._client: EnvoyClient | None = None
        self._tokenizers: TokenizerPool | None = None
        self._ids: list[str] = []
        self._open: list[deque[Any]] = []
        self.fallbacks = 0

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=60)

    def bind(self, fleet: FleetView, **kwargs: Any) -> None:
        super().bind(fleet, **kwargs)
        assert self.feed is not None
        self._ids = [p.pod_id for p in fleet.pods]
        self._open = [deque() for _ in self._ids]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sim-picker", daemon=True)
        self._thread.start()
        self._tokenizers = TokenizerPool()  # token-id prompts need no tokenizer
        service = ScoringService(self.feed.indexer, self._tokenizers)
        config = ExtprocConfig.model_validate(
            {"endpoints": self._ids, "timeout_ms": SCORER_TIMEOUT_MS, "session_ttl_s": SESSION_TTL_S}
        )
        if kwargs.get("picker_load_weight") is not None:
            weights = config.weights.model_copy(update={"load": kwargs["picker_load_weight"]})
            config = config.model_copy(update={"weights": weights})

        async def start() -> tuple[Any, EnvoyClient]:
            server = await start_picker(config, scorer=InProcessScorer(service, timeout_ms=None))
            return server, EnvoyClient(f"127.0.0.1:{server.port}")

        self._server, self._client = self._call(start())

    def pick(self, req: Request, fleet: FleetView) -> int:
        feed, client = self.feed, self._client
        assert feed is not None and client is not None, "bind() first"
        feed.sync()
        for i, streams in enumerate(self._open):
            while len(streams) > fleet.load(i):
                self._call(streams.popleft().finish())
        body = json.dumps({"model": feed.model, "prompt": list(req.token_ids), "max_tokens": req.output_len}).encode()
        headers = {"x-session-id": req.session} if req.session else {}
        result = self._call(client.route("/v1/completions", body, headers=headers, complete=False))
        if result.endpoint in self._ids:
            choice = self._ids.index(result.endpoint)
            self._open[choice].append(result)
        else:  # an immediate response (e.g. shedding): the simulator still has to place it
            self.fallbacks += 1
            choice = self._least_loaded(fleet, range(len(self._ids)))
        feed.check(fleet.pods[choice], fleet.prompt_keys(req))
        return choice

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        if self._server is not None:
            out["picker"] = self._server.picker.stats()
            out["picker_fallbacks"] = self.fallbacks
        return out

    def close(self) -> None:
        if self._loop is not None:
            for streams in self._open:
                while streams:
                    self._call(streams.popleft().finish())
            if self._client is not None:
                self._call(self._client.close())
            if self._server is not None:
                self._call(self._server.stop())
            self._loop.call_soon_threadsafe(self._loop.stop)
            assert self._thread is not None
            self._thread.join()
            self._loop.close()
            self._loop = None
        if self._tokenizers is not None:
            self._tokenizers.close()
            self._tokenizers = None
        super().close()
