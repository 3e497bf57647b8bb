"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from kvindex_service.api.deps import RuntimeDep

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    """200 while the process serves HTTP at all."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness",
    responses={503: {"description": "not ready yet (or shutting down)"}},
)
async def readyz(runtime: RuntimeDep) -> JSONResponse:
    """200 once the subscriber runs and every configured tokenizer is loaded; 503 before.
    While a snapshot loads (``--warm-from`` / ``--snapshot-file``) ``reasons`` says
    "loading snapshot"; other readiness conditions add their own reason."""
    checks = runtime.readiness()
    return JSONResponse(checks, status_code=200 if checks["ready"] else 503)
