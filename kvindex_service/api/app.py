"""The FastAPI application: ``create_app(settings)`` with one lifespan.

The lifespan builds and starts a :class:`~kvindex_service.runtime.Runtime` from the settings
and stops it on shutdown. A caller that already has a runtime (a test, an embedding
process) passes it in; the app then uses it without owning it (no start, no stop).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from kvindex_service._native import __version__
from kvindex_service.api.errors import install_exception_handlers
from kvindex_service.api.middleware import ServiceMiddleware
from kvindex_service.api.routes import compat, health, metrics, pods, score
from kvindex_service.config import Settings
from kvindex_service.runtime import Runtime

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

_DESCRIPTION = """KV-cache-aware routing index for vLLM fleets.

vLLM pods publish KV-cache events over ZMQ; kvindex keeps a near-real-time map of which pod
holds which KV block and answers, per prompt, how many leading blocks each pod already
holds. Errors always have the shape `{"error": {"type": ..., "message": ...}}`.
"""


def create_app(settings: Settings | None = None, *, runtime: Runtime | None = None) -> FastAPI:
    """Build the app. With ``runtime`` the app borrows it; otherwise the lifespan creates one
    from ``settings`` (defaults when None), starts it, and stops it at shutdown."""
    if runtime is not None and settings is not None and runtime.settings is not settings:
        raise ValueError("pass either settings or a runtime built from them, not both")
    owned = runtime is None
    rt = runtime if runtime is not None else Runtime(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if owned:
            await asyncio.to_thread(rt.start)
        try:
            yield
        finally:
            if owned:
                await asyncio.to_thread(rt.stop)

    app = FastAPI(
        title="kvindex",
        version=__version__,
        description=_DESCRIPTION,
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.runtime = rt
    install_exception_handlers(app)
    for module in (score, pods, health, metrics, compat):
        app.include_router(module.router)
    app.add_middleware(
        ServiceMiddleware,
        metrics=rt.metrics,
        max_body_bytes=rt.settings.http.max_body_bytes,
        request_timeout=rt.settings.http.request_timeout,
    )
    _merge_body_schemas(app)
    return app


def _merge_body_schemas(app: FastAPI) -> None:
    """Routes parse their bodies themselves (see ``api.body``); move the nested schemas they
    declare into ``components.schemas`` so ``/docs`` resolves every reference."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = original()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for path_item in schema.get("paths", {}).values():
            for op in path_item.values():
                if isinstance(op, dict):
                    components.update(op.pop("x-kvindex-schemas", {}) or {})
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
