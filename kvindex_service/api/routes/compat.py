"""Compatibility surfaces, so existing clients can point at kvindex unchanged.

llm-d's example scoring server (``llm-d-kv-cache`` ``examples/kv_events/online``):

* ``POST /score_completions`` ``{"prompt", "model"}``
* ``POST /score_chat_completions`` ``{"model", "messages" (or llm-d's older "conversation"),
  "tools", "chat_template_kwargs", "add_generation_prompt"}``

Both answer llm-d's bare ``{pod: score}`` map, where score is the tier-weighted count of
leading blocks the pod holds (GPU 1.0, CPU 0.8 by default) - the same number llm-d's
longest-prefix scorer reports. Pods without block 0 are left out, as llm-d does.

Mooncake KV-indexer RFC (kvcache-ai/Mooncake#1403, the shape of Mooncake's Conductor API
document and of the per-instance part of Dynamo's standalone indexer):

* ``POST /query`` ``{"model", "lora_name"?, "token_ids", "tenant_id"?, "instance_id"?,
  "block_size"?, "cache_salt"?, "medium"?}``
* ``POST /query_by_hash`` the same with ``seq_hashes`` (or ``block_hash``/``block_hashes``)
  instead of ``token_ids``: kvindex block keys, which equal vLLM's 64-bit block hashes under
  ``sha256_cbor`` with the same seed and block size (not Mooncake's XXH3 rolling hashes).

answered as ``{tenant_id: {instance: {"longest_matched": tokens, "GPU": tokens,
"CPU": tokens, "DISK": tokens, "DP": {rank: tokens}}}}``. An instance is a pod; per tier the
value is the leading tokens held in that tier alone; ``DP`` maps the pod's data-parallel
rank (from its events, 0 when unknown) to ``longest_matched``. Without ``instance_id``
every pod that serves the model is listed, with zeros when it holds nothing.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from kvindex_service._native import ScoreResult
from kvindex_service.api.body import json_body, parse_body
from kvindex_service.api.deps import RuntimeDep, ScoringDep
from kvindex_service.api.responses import errors
from kvindex_service.errors import InvalidRequestError
from kvindex_service.runtime import Runtime
from kvindex_service.scoring import ChatMessage, ScoreRequest, TokenId

__all__ = ["router"]

router = APIRouter(tags=["compatibility"])

_MEDIUM_ALIASES = {"L1": "GPU", "L2": "CPU", "L3": "DISK", "G1": "GPU", "G2": "CPU", "G3": "DISK"}
_DEFAULT_TIERS = ("GPU", "CPU", "DISK")


# -- llm-d ------------------------------------------------------------------------------------
class LlmdCompletionsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    prompt: str = Field(min_length=1)


class LlmdChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    messages: list[ChatMessage] | None = None
    conversation: list[ChatMessage] | None = Field(default=None, description="llm-d's older name for messages")
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_list(self) -> LlmdChatRequest:
        if (self.messages is None) == (self.conversation is None):
            raise ValueError("exactly one of messages, conversation is required")
        return self


def _pod_map(result: ScoreResult) -> dict[str, float]:
    return {s.pod: s.score for s in result.scores if s.score > 0}


_PodMap = dict[str, float]
_SCORE_ERRORS = errors(400, 404, 413, 422, 503, 504)
_QUERY_ERRORS = errors(400, 413, 422, 503, 504)


@router.post("/score_completions", summary="llm-d: score a completion prompt", response_model=_PodMap,
             openapi_extra=json_body(LlmdCompletionsRequest), responses=_SCORE_ERRORS)  # fmt: skip
async def score_completions(request: Request, scoring: ScoringDep) -> JSONResponse:
    req = await parse_body(request, LlmdCompletionsRequest)
    scored = await scoring.evaluate(ScoreRequest(model=req.model, prompt=req.prompt))
    return JSONResponse(_pod_map(scored.result))


@router.post("/score_chat_completions", summary="llm-d: score a chat request", response_model=_PodMap,
             openapi_extra=json_body(LlmdChatRequest), responses=_SCORE_ERRORS)  # fmt: skip
async def score_chat_completions(request: Request, scoring: ScoringDep) -> JSONResponse:
    req = await parse_body(request, LlmdChatRequest)
    messages = req.messages if req.messages is not None else req.conversation
    sreq = ScoreRequest(
        model=req.model,
        messages=messages,
        tools=req.tools,
        chat_template_kwargs=req.chat_template_kwargs,
        add_generation_prompt=req.add_generation_prompt,
    )
    scored = await scoring.evaluate(sreq)
    return JSONResponse(_pod_map(scored.result))


# -- Mooncake RFC 1403 ------------------------------------------------------------------------
def _hash_value(value: Any) -> Any:
    """Hashes may come as JSON numbers or as decimal / 0x-hex strings."""
    if isinstance(value, str):
        text = value.strip().lower()
        try:
            return int(text, 16) if text.startswith("0x") else int(text, 10)
        except ValueError:
            raise ValueError(f"not a block hash: {value!r}") from None
    return value


BlockHash = Annotated[int, BeforeValidator(_hash_value), Field(ge=0, lt=2**64)]


class _QueryBase(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    lora_name: str | None = Field(default=None, description="empty or null: the base model")
    lora_id: int | None = Field(default=None, description="deprecated; ignored")
    tenant_id: str = "default"
    instance_id: str | None = None
    block_size: int | None = Field(default=None, ge=1)
    cache_salt: str | None = None
    medium: list[str] | None = Field(default=None, description="tiers to report (GPU/CPU/DISK or L1/L2/L3)")


class QueryRequest(_QueryBase):
    token_ids: list[TokenId]


class QueryByHashRequest(_QueryBase):
    seq_hashes: list[BlockHash] | None = None
    block_hash: list[BlockHash] | None = Field(default=None, description="earlier draft name")
    block_hashes: list[BlockHash] | None = Field(default=None, description="Dynamo's name")

    @model_validator(mode="after")
    def _one_list(self) -> QueryByHashRequest:
        given = [n for n in ("seq_hashes", "block_hash", "block_hashes") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("exactly one of seq_hashes, block_hash, block_hashes is required")
        return self

    def hashes(self) -> list[int]:
        return self.seq_hashes or self.block_hash or self.block_hashes or []


def _candidates(runtime: Runtime, q: _QueryBase) -> list[str]:
    if q.instance_id:
        return [q.instance_id]
    indexer = runtime.require_indexer()
    return sorted(s.pod for s in indexer.pod_states() if not s.models or q.model in s.models)


def _check_block_size(runtime: Runtime, q: _QueryBase) -> int:
    block_size = runtime.require_indexer().block_size
    if q.block_size is not None and q.block_size != block_size:
        raise InvalidRequestError(f"block_size {q.block_size} does not match the index's block size {block_size}")
    return block_size


def _media(q: _QueryBase) -> set[str] | None:
    if q.medium is None:
        return None
    return {_MEDIUM_ALIASES.get(m.upper(), m.upper()) for m in q.medium}


def _mooncake(runtime: Runtime, q: _QueryBase, result: ScoreResult, block_size: int) -> dict[str, Any]:
    indexer = runtime.require_indexer()
    media = _media(q)
    instances: dict[str, Any] = {}
    for s in result.scores:
        tiers = dict.fromkeys(_DEFAULT_TIERS, 0)
        for tier, blocks in s.tier_blocks.items():
            tiers[tier.upper()] = blocks * block_size
        if media is not None:
            tiers = {t: v for t, v in tiers.items() if t in media}
        state = indexer.pod_state(s.pod)
        rank = state.dp_rank if state is not None and state.dp_rank is not None else 0
        instances[s.pod] = {"longest_matched": s.matched_tokens, **tiers, "DP": {str(rank): s.matched_tokens}}
    return {q.tenant_id: instances}


@router.post("/query", summary="Mooncake RFC 1403: matched tokens per instance, tier, DP rank",
             openapi_extra=json_body(QueryRequest), responses=_QUERY_ERRORS)  # fmt: skip
async def query(request: Request, runtime: RuntimeDep, scoring: ScoringDep) -> JSONResponse:
    q = await parse_body(request, QueryRequest)
    block_size = _check_block_size(runtime, q)
    pods = _candidates(runtime, q)
    result = scoring.score_tokens(
        q.model, q.token_ids, lora_name=q.lora_name or None, cache_salt=q.cache_salt or None, pods=pods
    )
    return JSONResponse(_mooncake(runtime, q, result, block_size))


@router.post("/query_by_hash", summary="Mooncake RFC 1403: the same for precomputed block keys",
             openapi_extra=json_body(QueryByHashRequest), responses=_QUERY_ERRORS)  # fmt: skip
async def query_by_hash(request: Request, runtime: RuntimeDep) -> Response:
    q = await parse_body(request, QueryByHashRequest)
    block_size = _check_block_size(runtime, q)
    pods = _candidates(runtime, q)
    result = runtime.require_indexer().score_keys(q.model, q.hashes(), pods=pods)
    return JSONResponse(_mooncake(runtime, q, result, block_size))
