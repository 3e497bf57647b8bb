"""``GET /snapshot``: the whole index as a binary stream, for a peer's ``--warm-from``."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from kvindex_service.api.deps import RuntimeDep
from kvindex_service.api.responses import errors
from kvindex_service.errors import NotReadyError

__all__ = ["router"]

router = APIRouter(tags=["operations"])


@router.get(
    "/snapshot",
    summary="Stream a snapshot of the index",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "the snapshot (kvindex format v1)"},
        **errors(503, s503="not started, or still loading its own snapshot"),
    },
)
async def snapshot(runtime: RuntimeDep) -> StreamingResponse:
    """The index in kvindex's versioned snapshot format (block size, hash algorithm and seed in
    its header; per pod its models, last sequence number and tiers; the keys in LRU order;
    xxh3-checksummed). Written shard by shard while ingestion and scoring go on; a replica
    started with ``--warm-from`` this service's URL loads it before subscribing."""
    indexer = runtime.require_indexer()
    if runtime.snapshot_state == "loading":
        raise NotReadyError("loading snapshot")
    return StreamingResponse(
        indexer.snapshot(),
        media_type="application/octet-stream",
        headers={"content-disposition": 'attachment; filename="kvindex.snapshot"'},
    )
