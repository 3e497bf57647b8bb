"""``GET /metrics``: Prometheus text exposition of this app's registry."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from kvindex_service.api.deps import RuntimeDep

__all__ = ["router"]

router = APIRouter(tags=["metrics"])


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(runtime: RuntimeDep) -> Response:
    # A sync route: FastAPI runs it in a worker thread, so reading the core's counters and
    # rendering the text never blocks the event loop.
    return Response(runtime.metrics.render(), media_type=CONTENT_TYPE_LATEST)
