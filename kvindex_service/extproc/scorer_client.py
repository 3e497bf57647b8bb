"""Scorer adapters: the one place the picker talks to the scoring service.

The picker only needs, per candidate endpoint, how much of the prompt it already holds.
:class:`Scorer` is that contract; two adapters implement it:

* :class:`HttpScorer` -- ``POST {scorer_url}/score`` on a keep-alive ``httpx.AsyncClient``
  (the usual deployment: the picker runs next to Envoy, the index is a separate service);
* :class:`InProcessScorer` -- awaits ``kvindex_service.scoring.ScoringService.evaluate``
  directly (one process runs both; also what the fleet simulator uses).

Both return :class:`KvScores` and raise only :class:`ScorerError` subclasses, so the picker's
fail-open logic is written once.

Two shares of a prompt are about: the ``/score`` answer's ``fraction`` is matched blocks over
full blocks, tiers ignored; what the picker weighs is the *weighted prefix*, the score (the
best tier weight summed over matched blocks) over full blocks. Only the second lives here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import httpx

from kvindex_service.extproc.prompt import PromptQuery

if TYPE_CHECKING:
    from kvindex_service.scoring import ScoreRequest, ScoringService

__all__ = [
    "HttpScorer",
    "InProcessScorer",
    "KvScores",
    "Scorer",
    "ScorerError",
    "ScorerRejected",
    "ScorerTimeout",
    "ScorerUnauthorized",
    "kv_scores_from_json",
    "weighted_prefix",
]

log = logging.getLogger(__name__)


class ScorerError(Exception):
    """The scorer could not answer (down, 5xx, bad answer)."""

    outcome = "error"


class ScorerTimeout(ScorerError):
    outcome = "timeout"


class ScorerUnauthorized(ScorerError):
    """The scorer refused the picker's credentials (401/403): a configuration problem, so it
    counts against the circuit breaker like an outage."""

    outcome = "unauthorized"


class ScorerRejected(ScorerError):
    """The scorer refused this prompt (unknown model, bad messages): not a health problem."""

    outcome = "rejected"


@dataclass(frozen=True, slots=True)
class KvScores:
    """Per endpoint, its weighted prefix: the tier-weighted share of the prompt's full blocks
    it holds (0..1)."""

    total_blocks: int
    weighted_prefix: Mapping[str, float] = field(default_factory=dict)
    matched_blocks: Mapping[str, int] = field(default_factory=dict)

    def prefix_of(self, endpoint: str) -> float:
        return self.weighted_prefix.get(endpoint, 0.0)

    @classmethod
    def from_rows(cls, total_blocks: int, rows: Iterable[tuple[str, int, float]]) -> KvScores:
        """From ``(pod, matched_blocks, score)`` rows, as both scorers read them."""
        prefix: dict[str, float] = {}
        matched: dict[str, int] = {}
        for pod, blocks, score in rows:
            prefix[pod] = weighted_prefix(score, blocks, total_blocks)
            matched[pod] = blocks
        return cls(total_blocks=total_blocks, weighted_prefix=prefix, matched_blocks=matched)


@runtime_checkable
class Scorer(Protocol):
    async def score(self, query: PromptQuery, pods: Sequence[str]) -> KvScores:
        """Score ``query`` for the candidate ``pods``; raise :class:`ScorerError`."""
        ...

    async def close(self) -> None: ...


def weighted_prefix(score: float, matched: int, total: int) -> float:
    """``score / total`` clamped to 0..1, falling back to ``matched / total`` for a zero score."""
    if total <= 0:
        return 0.0
    # ``score`` sums the best tier weight per matched block, so score/total is the weighted
    # share; clamp in case a future tier weighs more than 1.
    value = score / total if score else 0.0
    if value <= 0.0 and matched > 0:
        value = matched / total
    return max(0.0, min(1.0, value))


def kv_scores_from_json(data: Any) -> KvScores:
    """Read the scoring service's JSON answer (``scores`` list plus ``total_blocks``)."""
    if not isinstance(data, dict):
        raise ScorerError("scorer answer is not a JSON object")
    total = data.get("total_blocks", 0)
    rows = data.get("scores") or []
    if not isinstance(total, int) or not isinstance(rows, list):
        raise ScorerError("scorer answer lacks total_blocks/scores")
    return KvScores.from_rows(total, _json_rows(rows))


def _json_rows(rows: list[Any]) -> Iterable[tuple[str, int, float]]:
    for row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("pod"), str):
            continue
        blocks = row.get("matched_blocks", 0)
        score = row.get("score", 0.0)
        if isinstance(blocks, int) and isinstance(score, (int, float)):
            yield row["pod"], blocks, float(score)


def _request_json(query: PromptQuery, pods: Sequence[str]) -> dict[str, Any]:
    body: dict[str, Any] = {"model": query.model, "pods": list(pods)}
    if query.messages is not None:
        body["messages"] = query.messages
        if query.chat_options:
            body.update(query.chat_options)
    elif query.token_ids is not None:
        body["token_ids"] = query.token_ids
    else:
        body["prompt"] = query.prompt or ""
    if query.cache_salt:
        body["cache_salt"] = query.cache_salt
    return body


class HttpScorer:
    """``POST {base_url}/score`` with a hard deadline of ``timeout_ms`` per call.

    One keep-alive connection pool is reused for every request, so the steady-state cost is
    one loopback/cluster round trip plus the scoring itself. The deadline is enforced with
    ``asyncio.timeout`` around the whole exchange (httpx's own timeouts are per phase).

    ``token`` is sent as ``Authorization: Bearer <token>`` (the scoring service requires it
    when ``KVINDEX_HTTP__AUTH_TOKEN`` is set); ``verify`` is the TLS context that checks an
    ``https://`` scorer (``True``: the system trust store).
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout_ms: float = 50.0,
        max_connections: int = 64,
        transport: httpx.AsyncBaseTransport | None = None,
        token: str | None = None,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self._url = base_url.rstrip("/") + "/score"
        self._ready_url = base_url.rstrip("/") + "/readyz"
        headers = {"content-type": "application/json"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        self._timeout = timeout_ms / 1000.0
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(max(self._timeout, 0.001)),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            transport=transport,
            trust_env=False,  # the scorer is cluster-internal: never via an HTTP proxy
            headers=headers,
            verify=verify,
        )

    async def score(self, query: PromptQuery, pods: Sequence[str]) -> KvScores:
        payload = json.dumps(_request_json(query, pods), separators=(",", ":"))
        try:
            async with asyncio.timeout(self._timeout):
                resp = await self._client.post(self._url, content=payload)
                content = await resp.aread()
        except TimeoutError:
            raise ScorerTimeout(f"scorer did not answer within {self._timeout * 1000:.0f} ms") from None
        except httpx.TimeoutException as exc:
            raise ScorerTimeout(f"scorer timed out: {exc!r}") from None
        except httpx.HTTPError as exc:
            raise ScorerError(f"scorer unreachable: {exc!r}") from None
        if resp.status_code in (401, 403):
            raise ScorerUnauthorized(f"scorer refused the picker's credentials ({resp.status_code}): check the token")
        if 400 <= resp.status_code < 500:
            raise ScorerRejected(f"scorer answered {resp.status_code}: {content[:200]!r}")
        if resp.status_code != 200:
            raise ScorerError(f"scorer answered {resp.status_code}")
        try:
            data = json.loads(content)
        except ValueError:
            raise ScorerError("scorer answer is not JSON") from None
        return kv_scores_from_json(data)

    async def ready(self, timeout: float = 2.0) -> bool:
        """The scoring service answers ``GET /readyz`` with 200 (the picker's readiness)."""
        try:
            async with asyncio.timeout(timeout):
                resp = await self._client.get(self._ready_url, timeout=timeout)
        except (TimeoutError, httpx.HTTPError):
            return False
        return resp.status_code == 200

    async def close(self) -> None:
        await self._client.aclose()


class InProcessScorer:
    """Adapter over an in-process ``ScoringService``: the native result is read directly,
    with no JSON or dict in between.

    The scoring module is imported on first use so importing the picker never imports the
    scoring service (and its tokenizers) when it is not used.
    """

    def __init__(self, service: ScoringService, *, timeout_ms: float | None = 50.0) -> None:
        self._service = service
        self._timeout = timeout_ms / 1000.0 if timeout_ms else None

    @staticmethod
    def _build(query: PromptQuery, pods: Sequence[str]) -> ScoreRequest:
        from kvindex_service.scoring import ScoreRequest

        return ScoreRequest.model_validate(_request_json(query, pods))

    async def score(self, query: PromptQuery, pods: Sequence[str]) -> KvScores:
        try:
            request = self._build(query, pods)
        except ValueError as exc:
            raise ScorerRejected(f"scoring request rejected: {exc}") from None
        try:
            async with asyncio.timeout(self._timeout):
                scored = await self._service.evaluate(request)
        except TimeoutError:
            raise ScorerTimeout("in-process scorer missed its deadline") from None
        except (LookupError, ValueError) as exc:
            raise ScorerRejected(str(exc)) from None
        except Exception as exc:  # the service's own failure must not fail the request
            raise ScorerError(f"in-process scorer failed: {exc!r}") from exc
        result = scored.result
        return KvScores.from_rows(result.total_blocks, ((s.pod, s.matched_blocks, s.score) for s in result.scores))

    async def close(self) -> None:
        """The service belongs to the caller; nothing to release here."""
