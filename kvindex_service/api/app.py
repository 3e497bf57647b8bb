"""The FastAPI application: ``create_app(settings)`` with one lifespan.

The lifespan builds and starts a :class:`~kvindex_service.runtime.Runtime` from the settings
and stops it on shutdown. A caller that already has a runtime (a test, an embedding
process) passes it in; the app then uses it without owning it (no start, no stop).

``/docs`` is Swagger UI served with the assets of the ``swagger-ui-bundle`` package, so it
works offline; without that package it falls back to FastAPI's CDN assets.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from kvindex_service._native import __version__
from kvindex_service.api.errors import install_exception_handlers
from kvindex_service.api.middleware import OPEN_PATHS, ServiceMiddleware
from kvindex_service.api.responses import DESCRIPTIONS, ErrorResponse
from kvindex_service.api.routes import compat, discovery, health, metrics, pods, score, snapshot
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
        # A request handler needing the GIL while the subscriber's thread holds it waits up to
        # one switch interval per acquisition; Python's 5 ms default dominated /score's p99
        # under ingest (docs/performance.md#scoring-under-ingest).
        switch = sys.getswitchinterval()
        sys.setswitchinterval(rt.settings.http.gil_switch_interval)
        if owned:
            await asyncio.to_thread(rt.start)
        try:
            yield
        finally:
            if owned:
                await asyncio.to_thread(rt.stop)
            sys.setswitchinterval(switch)

    app = FastAPI(
        title="kvindex",
        version=__version__,
        description=_DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.runtime = rt
    _install_docs(app)
    install_exception_handlers(app)
    for module in (score, pods, discovery, health, metrics, compat, snapshot):
        app.include_router(module.router)
    http = rt.settings.http
    token = http.auth_token.get_secret_value() if http.auth_token is not None else None
    app.add_middleware(
        ServiceMiddleware,
        metrics=rt.metrics,
        max_body_bytes=http.max_body_bytes,
        request_timeout=http.request_timeout,
        auth_token=token,
    )
    _merge_body_schemas(app, auth=token is not None)
    return app


def _install_docs(app: FastAPI) -> None:
    """Swagger UI at ``/docs``, with local assets when ``swagger-ui-bundle`` is installed."""
    try:
        from swagger_ui_bundle import swagger_ui_path  # type: ignore[import-untyped]
    except ImportError:  # pragma: no cover - the package is a dependency
        swagger_ui_path = None
    local = swagger_ui_path is not None
    if local:
        app.mount("/docs-assets", StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        if not local:
            return get_swagger_ui_html(openapi_url="/openapi.json", title="kvindex - Swagger UI")
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="kvindex - Swagger UI",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon-32x32.png",
        )


def _merge_body_schemas(app: FastAPI, *, auth: bool) -> None:
    """Routes parse their bodies themselves (see ``api.body``); move the nested schemas they
    declare into ``components.schemas`` so ``/docs`` resolves every reference. With a token
    configured, declare the bearer scheme and the 401 on every route that needs it."""
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
        if auth:
            _declare_auth(schema)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _declare_auth(schema: dict[str, Any]) -> None:
    schema["components"].setdefault("securitySchemes", {})["bearer"] = {"type": "http", "scheme": "bearer"}
    schemas = schema["components"].setdefault("schemas", {})
    schemas.setdefault("ErrorResponse", ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}"))
    for defs_name, defs in list(schemas["ErrorResponse"].pop("$defs", {}).items()):
        schemas.setdefault(defs_name, defs)
    for path, path_item in schema.get("paths", {}).items():
        if path in OPEN_PATHS:
            continue
        for op in path_item.values():
            if isinstance(op, dict):
                op["security"] = [{"bearer": []}]
                op.setdefault("responses", {})["401"] = {
                    "description": DESCRIPTIONS[401],
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
                }
