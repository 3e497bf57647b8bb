"""``GET /discovery``: Kubernetes pod discovery's state (namespace, selector, resourceVersion,
resyncs, watch errors, and every pod the selector finds with its state)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from kvindex_service.api.deps import RuntimeDep

__all__ = ["router"]

router = APIRouter(tags=["pods"])


@router.get("/discovery", summary="Kubernetes pod discovery: state and discovered pods")
def discovery(runtime: RuntimeDep) -> dict[str, Any]:
    disc = runtime.discovery
    if disc is None:
        return {"enabled": False, "pods": [], "counts": {}}
    return disc.status()
