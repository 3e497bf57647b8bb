"""``POST /score``: per-pod prefix match for token ids, a text prompt or chat messages."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from kvindex_service.api.body import json_body, parse_body
from kvindex_service.api.deps import ScoringDep
from kvindex_service.api.responses import errors
from kvindex_service.scoring import ScoreRequest, ScoreResponse

__all__ = ["router"]

router = APIRouter(tags=["scoring"])

_serialize = ScoreResponse.__pydantic_serializer__.to_json


@router.post(
    "/score",
    summary="Score pods for one prompt",
    response_model=ScoreResponse,
    openapi_extra=json_body(ScoreRequest),
    responses=errors(400, 404, 413, 422, 503, 504, s422="invalid request, including an unknown field"),
)
async def score(request: Request, scoring: ScoringDep) -> Response:
    """Longest run of leading KV blocks each pod holds for this prompt, best pod first.

    Give exactly one of ``token_ids``, ``prompt`` (a list scores its first prompt) or
    ``messages`` (rendered with the model's chat template, as vLLM does).
    """
    req = await parse_body(request, ScoreRequest)
    result = await scoring.score(req)
    return Response(_serialize(result), media_type="application/json")
