"""Scoring, independent of any transport.

The HTTP API (``kvindex_service.api``) and the Envoy endpoint picker
(``kvindex_service.extproc``) both score through :class:`ScoringService`, so a request gets
the same answer whichever way it comes in. This module must not import either of them.

Request semantics worth knowing:

* exactly one of ``token_ids``, ``prompt`` and ``messages`` is given;
* ``prompt`` may be a list of strings (the OpenAI completions batch form); only the first
  prompt is scored, because a router sends the whole request to a single pod and the first
  prompt's prefix is what that pod will compute first;
* ``messages`` are rendered with the model's chat template exactly as vLLM would
  (``add_generation_prompt`` defaults to True as in vLLM's chat endpoint), then tokenized
  without adding special tokens (the template already starts with BOS);
* ``pods`` restricts the answer to those candidates and lists every one of them, with zeros
  when it holds nothing; without it only pods holding block 0 are listed;
* ``best_pod`` is the first listed pod with a positive score, else null;
* with a shared index (``index.backend`` set to a Redis / Valkey URL) the scores come from it;
  if it cannot answer within ``index.backend_timeout`` the answer is ``degraded: true`` and
  comes from this replica's own copy of the index (when it ingests) or is empty.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from kvindex_service._native import Indexer, ScoreResult

if TYPE_CHECKING:
    from kvindex_service.backends.shared import SharedIndex
    from kvindex_service.metrics import ServiceMetrics
    from kvindex_service.tokenization import Tokenized, TokenizerPool

__all__ = [
    "ChatMessage",
    "PodScoreOut",
    "ScoreRequest",
    "ScoreResponse",
    "Scored",
    "ScoringService",
]

#: Token lists up to this length are scored on the event loop thread (a few µs; hashing
#: stops as soon as no pod can extend its prefix). Longer ones go to a worker thread so a
#: 100k-token prompt cannot hold the loop for milliseconds.
INLINE_SCORE_MAX_TOKENS = 16_384

# Any JSON integer (strict: no strings, floats or bools). The core range-checks them
# (0..2^32-1, any width) and answers InvalidInputError, which transports map to 400.
TokenId = StrictInt


class ChatMessage(BaseModel):
    """One OpenAI-style chat message. Unknown keys (``tool_calls``, ``name``...) are kept and
    passed to the chat template untouched."""

    model_config = ConfigDict(extra="allow")

    role: str = Field(min_length=1)
    content: str | list[Any] | None = None


def _not_null(name: str) -> dict[str, Any]:
    return {"required": [name], "properties": {name: {"not": {"type": "null"}}}}


class ScoreRequest(BaseModel):
    """Unknown fields are refused (422): a typo such as ``pod`` for ``pods`` must not
    silently drop a filter. The JSON schema states the one-input rule as ``oneOf``."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"oneOf": [_not_null("token_ids"), _not_null("prompt"), _not_null("messages")]},
    )

    model: str = Field(min_length=1, description="model name, as in the pods' KV-event topics")
    token_ids: list[TokenId] | None = Field(default=None, description="prompt token ids")
    prompt: str | list[str] | None = Field(
        default=None, description="completion prompt; for a list, the first prompt is scored"
    )
    messages: list[ChatMessage] | None = Field(default=None, description="chat messages")
    add_generation_prompt: bool = True
    add_special_tokens: bool = Field(default=True, description="prompt only: add BOS like vLLM")
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    pods: list[str] | None = Field(default=None, description="candidates; all of them are listed")
    lora_name: str | None = None
    cache_salt: str | None = None

    @field_validator("prompt")
    @classmethod
    def _non_empty_prompt_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and not value:
            raise ValueError("prompt list is empty")
        return value

    @model_validator(mode="after")
    def _exactly_one_input(self) -> ScoreRequest:
        given = [n for n in ("token_ids", "prompt", "messages") if getattr(self, n) is not None]
        if len(given) != 1:
            found = ", ".join(given) if given else "none"
            raise ValueError(f"exactly one of token_ids, prompt, messages is required (got: {found})")
        return self

    @property
    def input_kind(self) -> str:
        if self.token_ids is not None:
            return "token_ids"
        return "prompt" if self.prompt is not None else "messages"

    def prompt_text(self) -> str:
        assert self.prompt is not None
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def message_dicts(self) -> list[dict[str, Any]]:
        assert self.messages is not None
        return [m.model_dump(exclude_unset=True) for m in self.messages]


class PodScoreOut(BaseModel):
    pod: str
    matched_blocks: int
    matched_tokens: int
    score: float
    fraction: float = Field(description="matched_blocks / total_blocks (0 when no full block)")
    tiers: dict[str, int] = Field(description="per tier: leading blocks held in that tier alone")


class ScoreResponse(BaseModel):
    model: str
    best_pod: str | None
    block_size: int
    total_tokens: int
    total_blocks: int
    from_prefix_store: bool = False
    cached_tokens: int = 0
    exact: bool = True
    degraded: bool = Field(
        default=False, description="the shared index did not answer in time: scores from this replica's copy or none"
    )
    scores: list[PodScoreOut]


@dataclass(frozen=True, slots=True)
class Scored:
    """A native result with what the transports need to present it their own way."""

    request: ScoreRequest
    result: ScoreResult
    tokenized: Tokenized | None  # None when the request carried token ids
    degraded: bool = False  # the shared index did not answer (see the module docstring)


class ScoringService:
    """Tokenize (off the event loop) and score against the index.

    ``tokenizers`` may be None when only token ids will be scored. ``metrics`` records score
    and tokenization latency when given. The block size is the indexer's; ``block_size``, if
    given, must agree with it. ``shared``: score from the shared index, with ``indexer``
    (this replica's own copy) as the degraded fallback when ``local_fallback``.
    """

    def __init__(
        self,
        indexer: Indexer,
        tokenizers: TokenizerPool | None,
        *,
        block_size: int | None = None,
        metrics: ServiceMetrics | None = None,
        shared: SharedIndex | None = None,
        local_fallback: bool = True,
    ) -> None:
        if block_size is not None and block_size != indexer.block_size:
            raise ValueError(f"block_size {block_size} does not match the indexer's {indexer.block_size}")
        self.indexer = indexer
        self.tokenizers = tokenizers
        self.shared = shared
        self.local_fallback = local_fallback
        self._score_hist = None if metrics is None else metrics.score_seconds
        self._tok_hist = None if metrics is None else metrics.tokenize_seconds
        self._metrics = metrics

    @property
    def block_size(self) -> int:
        """Tokens per block: the indexer owns it."""
        return self.indexer.block_size

    # -- tokenization ---------------------------------------------------------------------
    def _pool(self, model: str) -> TokenizerPool:
        if self.tokenizers is None:
            from kvindex_service.tokenization import UnknownModelError

            raise UnknownModelError(model, "no tokenizer pool configured")
        return self.tokenizers

    async def atokenize(self, req: ScoreRequest) -> Tokenized | None:
        """Token ids for a text or chat request, computed in the pool's worker threads."""
        if req.token_ids is not None:
            return None
        pool = self._pool(req.model)
        t0 = time.perf_counter()
        if req.prompt is not None:
            kind = "text"
            tok = await pool.atokenize(req.model, req.prompt_text(), add_special_tokens=req.add_special_tokens)
        else:
            kind = "chat"
            assert req.messages is not None
            pool.limits.check_messages(len(req.messages))
            # The dicts are built in the worker too: for thousands of messages that is real work.
            tok = await pool.atokenize_chat(req.model, req.message_dicts, **_render_kwargs(req))
        if self._tok_hist is not None:
            self._tok_hist.labels(kind).observe(time.perf_counter() - t0)
        return tok

    # -- scoring --------------------------------------------------------------------------
    def score_tokens(
        self,
        model: str,
        token_ids: list[int],
        *,
        lora_name: str | None = None,
        cache_salt: str | None = None,
        pods: list[str] | None = None,
        input_kind: str = "token_ids",
    ) -> ScoreResult:
        """Score token ids now, on this thread (the core releases the GIL)."""
        return self.score_tokens_degraded(
            model, token_ids, lora_name=lora_name, cache_salt=cache_salt, pods=pods, input_kind=input_kind
        )[0]

    def score_tokens_degraded(
        self,
        model: str,
        token_ids: list[int],
        *,
        lora_name: str | None = None,
        cache_salt: str | None = None,
        pods: list[str] | None = None,
        input_kind: str = "token_ids",
    ) -> tuple[ScoreResult, bool]:
        """``score_tokens`` and whether the answer is degraded (shared index unreachable)."""
        t0 = time.perf_counter()
        degraded = False
        if self.shared is not None:
            fallback = self.indexer if self.local_fallback else None
            result, degraded = self.shared.score(
                model, token_ids, fallback=fallback, lora_name=lora_name, cache_salt=cache_salt, pods=pods
            )
        else:
            result = self.indexer.score(model, token_ids, lora_name=lora_name, cache_salt=cache_salt, pods=pods)
        if self._score_hist is not None:
            self._score_hist.labels(input_kind).observe(time.perf_counter() - t0)
        if self._metrics is not None:  # the estimated prefix hit rate's two halves
            self._metrics.score_prompt_blocks.inc(result.total_blocks)
            self._metrics.score_matched_blocks.inc(max((s.matched_blocks for s in result.scores), default=0))
        return result, degraded

    async def evaluate(self, req: ScoreRequest) -> Scored:
        """Tokenize if needed, then score; the raw native result for custom presentations."""
        tok = await self.atokenize(req)
        ids = req.token_ids if tok is None else tok.token_ids
        assert ids is not None
        kwargs: dict[str, Any] = {
            "lora_name": req.lora_name,
            "cache_salt": req.cache_salt,
            "pods": req.pods,
            "input_kind": req.input_kind,
        }
        if len(ids) <= INLINE_SCORE_MAX_TOKENS and self.shared is None:
            result, degraded = self.score_tokens_degraded(req.model, ids, **kwargs)
        else:  # long prompts, and every network round trip, leave the event loop free
            result, degraded = await asyncio.to_thread(self.score_tokens_degraded, req.model, ids, **kwargs)
        return Scored(req, result, tok, degraded)

    async def score(self, req: ScoreRequest) -> ScoreResponse:
        return self.present(await self.evaluate(req))

    def present(self, scored: Scored) -> ScoreResponse:
        """The documented ``/score`` answer for a native result."""
        result, tok = scored.result, scored.tokenized
        total = result.total_blocks
        scores = [
            PodScoreOut(
                pod=s.pod,
                matched_blocks=s.matched_blocks,
                matched_tokens=s.matched_tokens,
                score=s.score,
                fraction=_block_share(s.matched_blocks, total),
                tiers=dict(s.tier_blocks),
            )
            for s in result.scores
        ]
        best = next((s.pod for s in scores if s.score > 0), None)
        return ScoreResponse(
            model=scored.request.model,
            best_pod=best,
            block_size=self.block_size,
            total_tokens=result.total_tokens,
            total_blocks=total,
            from_prefix_store=bool(tok and tok.from_prefix_store),
            cached_tokens=tok.cached_tokens if tok else 0,
            exact=tok.exact if tok else True,
            degraded=scored.degraded,
            scores=scores,
        )


def _block_share(matched_blocks: int, total_blocks: int) -> float:
    """The ``fraction`` of ``/score``: share of the prompt's full blocks held, tiers ignored
    (the picker's tier-weighted share is ``extproc.scorer_client.weighted_prefix``)."""
    return matched_blocks / total_blocks if total_blocks else 0.0


def _render_kwargs(req: ScoreRequest) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"add_generation_prompt": req.add_generation_prompt}
    if req.chat_template_kwargs is not None:
        kwargs["chat_template_kwargs"] = req.chat_template_kwargs
    if req.tools is not None:
        kwargs["tools"] = req.tools
    return kwargs
