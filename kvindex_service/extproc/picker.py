"""The endpoint choice policy, free of any transport.

Per request: take the eligible endpoints (Envoy's subset hint intersected with the known
endpoints, else every known endpoint: see :mod:`.endpoints`),
drop those at their in-flight cap (all at the cap: shed with 429), ask the scorer how much
of the prompt each one already holds, then choose:

1. **Session affinity** -- a session (``x-session-id`` by default) stays on the endpoint it
   used last unless another endpoint holds clearly more of the prompt (``affinity_margin``)
   or its own endpoint is overloaded (``affinity_max_load_gap`` requests above the least
   loaded). Stickiness covers the window in which the previous turn's KV events have not
   reached the index yet, and keeps conversations together when the scorer is down.
2. **Utility** -- ``kv * weighted_prefix - load * (inflight - min_inflight)``: the longest
   cached prefix wins, but each request it already runs beyond the least loaded endpoint
   costs ``load``; so a popular prefix cannot pin all traffic to one pod.
3. **Round-robin** among endpoints whose utility ties (same prefix, same load).

In-flight counts are held by :class:`Lease` objects: acquired at the pick, released once
(idempotently) at the end of the response or when the stream closes, whichever is first.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvindex_service.extproc.config import ExtprocConfig
from kvindex_service.extproc.endpoints import EndpointSet
from kvindex_service.extproc.prompt import PromptQuery
from kvindex_service.extproc.scorer_client import KvScores, Scorer, ScorerError

__all__ = ["REASONS", "Decision", "Lease", "Picker"]

log = logging.getLogger(__name__)

#: Why an endpoint was chosen (the ``reason`` label of the decisions metric).
REASONS = ("kv", "load", "affinity", "round_robin", "only")
_EPS = 1e-9
_MAX_SESSION_KEY = 256
#: Distinct endpoints the per-endpoint picks metric keeps (subset hints may name new pods forever).
_MAX_PICK_SERIES = 1024


class Lease:
    """One in-flight request on one endpoint; :meth:`release` is idempotent."""

    __slots__ = ("_picker", "_released", "endpoint")

    def __init__(self, picker: Picker, endpoint: str) -> None:
        self.endpoint = endpoint
        self._picker = picker
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._picker._release(self.endpoint)


@dataclass(slots=True)
class Decision:
    """The outcome of one pick: an endpoint (with its lease) or an HTTP status to answer."""

    endpoint: str | None
    reason: str
    status: int | None = None
    message: str = ""
    scorer_outcome: str = "unscored"
    #: Per candidate, its weighted prefix (see :class:`KvScores`); 0 when unscored.
    weighted_prefix: dict[str, float] = field(default_factory=dict)
    total_blocks: int = 0
    lease: Lease | None = None


class _Breaker:
    """Consecutive-failure circuit breaker with a single half-open probe."""

    def __init__(self, failures: int, cooldown_s: float, clock: Callable[[], float]) -> None:
        self._limit = failures
        self._cooldown = cooldown_s
        self._clock = clock
        self._failures = 0
        self._open_until = 0.0
        self._probing = False

    @property
    def is_open(self) -> bool:
        return self._failures >= self._limit

    def allow(self) -> bool:
        if self._failures < self._limit:
            return True
        if self._probing or self._clock() < self._open_until:
            return False
        self._probing = True
        return True

    def record(self, ok: bool) -> None:
        self._probing = False
        if ok:
            self._failures = 0
            return
        self._failures += 1
        if self._failures >= self._limit:
            self._open_until = self._clock() + self._cooldown


class Picker:
    """Chooses endpoints and keeps the in-flight and session tables. Not thread-safe: use it
    from one event loop (the gRPC server's)."""

    def __init__(
        self,
        config: ExtprocConfig,
        scorer: Scorer | None = None,
        *,
        endpoints: EndpointSet | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.scorer = scorer
        self.endpoints = EndpointSet(config.endpoints) if endpoints is None else endpoints
        #: Hint entries that name no known endpoint (the server shares its stats counter).
        self.hint_dropped: Counter[str] = Counter()
        self._clock = clock
        self._inflight: dict[str, int] = {}
        self._sessions: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._rr = 0
        self._breaker = _Breaker(config.breaker_failures, config.breaker_cooldown_s, clock)
        #: Called with the duration (s) of every successful scorer call (the server's histogram).
        self.on_scorer_latency: Callable[[float], None] | None = None
        #: Monotonic counters, read by the metrics collector at scrape time.
        self.decisions: Counter[str] = Counter()
        #: Picks per endpoint; endpoints past ``_MAX_PICK_SERIES`` distinct ones count as "other".
        self.picks: Counter[str] = Counter()
        self.scorer_outcomes: Counter[str] = Counter()
        self.rejections: Counter[int] = Counter()
        self.fail_open = 0

    # -- in-flight ---------------------------------------------------------------------------
    def inflight(self) -> dict[str, int]:
        """Current in-flight requests per endpoint (endpoints at zero are left out)."""
        return dict(self._inflight)

    def total_inflight(self) -> int:
        return sum(self._inflight.values())

    def acquire(self, endpoint: str) -> Lease:
        self._inflight[endpoint] = self._inflight.get(endpoint, 0) + 1
        return Lease(self, endpoint)

    def _release(self, endpoint: str) -> None:
        left = self._inflight.get(endpoint, 0) - 1
        if left > 0:
            self._inflight[endpoint] = left
        else:
            # Dropping zeros keeps the table bounded by what is really in flight, even when
            # subset hints name endpoints the configuration never listed.
            self._inflight.pop(endpoint, None)

    # -- sessions ----------------------------------------------------------------------------
    def session_count(self) -> int:
        return len(self._sessions)

    def session_endpoint(self, session: str) -> str | None:
        entry = self._sessions.get(session)
        if entry is None:
            return None
        endpoint, seen = entry
        if self._clock() - seen > self.config.session_ttl_s:
            del self._sessions[session]
            return None
        return endpoint

    def _remember(self, session: str, endpoint: str) -> None:
        if self.config.max_sessions <= 0:
            return
        self._sessions[session] = (endpoint, self._clock())
        self._sessions.move_to_end(session)
        while len(self._sessions) > self.config.max_sessions:
            self._sessions.popitem(last=False)

    # -- the pick ----------------------------------------------------------------------------
    def eligible(self, subset: Sequence[str] | None) -> list[str]:
        """Envoy's subset hint when present (even empty: then nothing is eligible), keeping
        only known endpoints; else every known endpoint."""
        if subset is None:
            return list(self.endpoints.current())
        out, missing = self.endpoints.intersect(subset)
        if missing:
            self.hint_dropped["not_configured"] += missing
        return out

    def _reject(self, status: int, message: str, outcome: str = "unscored") -> Decision:
        self.rejections[status] += 1
        return Decision(endpoint=None, reason="rejected", status=status, message=message, scorer_outcome=outcome)

    def _open(self, candidates: list[str]) -> list[str]:
        cap = self.config.max_inflight
        if cap is None:
            return candidates
        return [c for c in candidates if self._inflight.get(c, 0) < cap]

    async def _scores(self, query: PromptQuery | None, candidates: list[str]) -> tuple[KvScores | None, str]:
        if query is None:
            return None, "unscored"
        if self.scorer is None:
            return None, "no_scorer"
        if not self._breaker.allow():
            return None, "breaker_open"
        t0 = time.perf_counter()
        try:
            scores = await self.scorer.score(query, candidates)
        except ScorerError as exc:
            # A rejected prompt says nothing about the scorer's health.
            self._breaker.record(ok=exc.outcome == "rejected")
            log.warning("scorer failed, picking without KV scores", extra={"outcome": exc.outcome, "error": str(exc)})
            return None, exc.outcome
        self._breaker.record(ok=True)
        if self.on_scorer_latency is not None:
            self.on_scorer_latency(time.perf_counter() - t0)
        return scores, "ok"

    async def pick(
        self,
        query: PromptQuery | None,
        *,
        subset: Sequence[str] | None = None,
        session: str | None = None,
    ) -> Decision:
        """Choose an endpoint for one request and take a lease on it."""
        candidates = self.eligible(subset)
        if not candidates:
            return self._reject(503, "no eligible endpoint")
        if not self._open(candidates):
            return self._reject(429, "every eligible endpoint is at its in-flight cap")

        scores, outcome = await self._scores(query, candidates)
        self.scorer_outcomes[outcome] += 1
        if outcome not in ("ok", "unscored", "no_scorer"):
            self.fail_open += 1

        # Loads (and the known endpoints) may have moved while the scorer was awaited: decide
        # on the current ones.
        if not self.endpoints.hint_only:
            candidates = [c for c in candidates if self.endpoints.known(c)]
            if not candidates:
                return self._reject(503, "no eligible endpoint", outcome)
        candidates = self._open(candidates)
        if not candidates:
            return self._reject(429, "every eligible endpoint is at its in-flight cap", outcome)

        prefix = {c: (scores.prefix_of(c) if scores else 0.0) for c in candidates}
        loads = {c: self._inflight.get(c, 0) for c in candidates}
        min_load = min(loads.values())
        if session is not None and (not session or len(session) > _MAX_SESSION_KEY):
            session = None

        chosen, reason = self._choose(candidates, prefix, loads, min_load, session)
        if session is not None:
            self._remember(session, chosen)
        self.decisions[reason] += 1
        self.picks[chosen if chosen in self.picks or len(self.picks) < _MAX_PICK_SERIES else "other"] += 1
        return Decision(
            endpoint=chosen,
            reason=reason,
            scorer_outcome=outcome,
            weighted_prefix=prefix,
            total_blocks=scores.total_blocks if scores else 0,
            lease=self.acquire(chosen),
        )

    def _choose(
        self,
        candidates: list[str],
        prefix: dict[str, float],
        loads: dict[str, int],
        min_load: int,
        session: str | None,
    ) -> tuple[str, str]:
        if len(candidates) == 1:
            return candidates[0], "only"
        cfg = self.config
        if session is not None:
            home = self.session_endpoint(session)
            if home is not None and home in prefix:
                best_other = max(f for c, f in prefix.items() if c != home)
                if (
                    best_other - prefix[home] <= cfg.affinity_margin + _EPS
                    and loads[home] - min_load < cfg.affinity_max_load_gap
                ):
                    return home, "affinity"
        w = cfg.weights
        utility = {c: w.kv * prefix[c] - w.load * (loads[c] - min_load) for c in candidates}
        best = max(utility.values())
        tied = [c for c in candidates if utility[c] >= best - _EPS]
        if len(tied) > 1:
            chosen = tied[self._rr % len(tied)]
            self._rr += 1
            return chosen, "round_robin"
        chosen = tied[0]
        top = max(prefix.values())
        if prefix[chosen] > 0.0 and prefix[chosen] >= top - _EPS:
            return chosen, "kv"
        return chosen, "load"

    def stats(self) -> dict[str, object]:
        """A snapshot for tests, the simulator and logs."""
        return {
            "decisions": dict(self.decisions),
            "scorer_outcomes": dict(self.scorer_outcomes),
            "rejections": dict(self.rejections),
            "fail_open": self.fail_open,
            "inflight": self.inflight(),
            "sessions": len(self._sessions),
            "breaker_open": self._breaker.is_open,
        }
