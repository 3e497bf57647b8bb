"""Request streams for the fleet simulator, deterministic for a given seed.

Token ids are synthetic integers (no tokenizer needed): what matters to prefix caching is
which requests share which leading tokens, and every generator below states that sharing
explicitly. Every router in one run sees the same list of requests.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy

__all__ = [
    "MOONCAKE_BLOCK_TOKENS",
    "Request",
    "TraceError",
    "chat_sessions",
    "load_mooncake_trace",
    "mooncake_requests",
    "shared_prefix",
]

log = logging.getLogger(__name__)

VOCAB = 128_000
"""Synthetic ids stay inside a Llama-3-sized vocabulary."""
MOONCAKE_BLOCK_TOKENS = 512


@dataclass(frozen=True)
class Request:
    """One request as a router sees it; ``output_ids`` are the tokens the pod will generate."""

    rid: int
    arrival: float
    """Simulated seconds since the start of the run."""
    token_ids: tuple[int, ...]
    output_ids: tuple[int, ...]
    session: str | None = None
    group: str | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.token_ids)

    @property
    def output_len(self) -> int:
        return len(self.output_ids)


class TraceError(ValueError):
    """A Mooncake trace line that cannot be used (the message names the line)."""


def _tokens(rng: random.Random, n: int) -> tuple[int, ...]:
    return tuple(rng.randrange(VOCAB) for _ in range(n))


def _poisson_times(rng: random.Random, rate: float, duration: float) -> list[float]:
    if rate <= 0:
        raise ValueError(f"arrival rate must be positive, got {rate}")
    times: list[float] = []
    t = rng.expovariate(rate)
    while t < duration:
        times.append(t)
        t += rng.expovariate(rate)
    return times


def _output_len(rng: random.Random, mean: int) -> int:
    """Output lengths vary around the mean (uniform 0.5x..1.5x), at least one token."""
    return max(1, int(rng.uniform(0.5, 1.5) * mean))


def shared_prefix(
    *,
    seed: int,
    rate: float,
    duration: float,
    groups: int = 12,
    prompts_per_group: int = 16,
    system_tokens: int = 2048,
    question_tokens: int = 128,
    output_tokens: int = 64,
) -> list[Request]:
    """Groups of prompts sharing a long system prompt; each request picks a group and one of
    its prompts uniformly. The group doubles as the session: a prefix-affine router keeps a
    group on one pod."""
    if groups <= 0 or prompts_per_group <= 0:
        raise ValueError("groups and prompts per group must be positive")
    rng = random.Random(f"shared-prefix/{seed}")
    systems = [_tokens(rng, system_tokens) for _ in range(groups)]
    questions = [[_tokens(rng, question_tokens) for _ in range(prompts_per_group)] for _ in systems]
    out: list[Request] = []
    for rid, t in enumerate(_poisson_times(rng, rate, duration)):
        g = rng.randrange(groups)
        q = rng.randrange(prompts_per_group)
        out.append(
            Request(
                rid=rid,
                arrival=t,
                token_ids=systems[g] + questions[g][q],
                output_ids=_tokens(rng, _output_len(rng, output_tokens)),
                session=f"group-{g}",
                group=f"group-{g}",
            )
        )
    return out


def chat_sessions(
    *,
    seed: int,
    rate: float,
    duration: float,
    turns: int = 5,
    system_tokens: int = 512,
    user_tokens: int = 96,
    output_tokens: int = 128,
    think_time: float = 8.0,
) -> list[Request]:
    """Multi-turn conversations. ``rate`` is new sessions per second; each turn's prompt is the
    previous turn's prompt plus its answer plus a new user message, so a pod that served the
    last turn holds the new turn's prefix. All sessions share one system prompt.

    Turn arrivals are fixed in advance (previous arrival + an exponential think time) rather
    than tied to the previous answer's completion, so every router sees the same stream.
    """
    if turns <= 0:
        raise ValueError("turns must be positive")
    rng = random.Random(f"chat/{seed}")
    system = _tokens(rng, system_tokens)
    pending: list[tuple[float, int, tuple[int, ...], tuple[int, ...], str]] = []
    for s, start in enumerate(_poisson_times(rng, rate, duration)):
        session = f"session-{s}"
        context = system
        t = start
        for _ in range(turns):
            if t >= duration:
                break
            prompt = context + _tokens(rng, max(1, int(rng.uniform(0.5, 1.5) * user_tokens)))
            answer = _tokens(rng, _output_len(rng, output_tokens))
            pending.append((t, len(pending), prompt, answer, session))
            context = prompt + answer
            t += rng.expovariate(1.0 / think_time) + 1.0
    pending.sort(key=lambda p: (p[0], p[1]))
    return [
        Request(rid=i, arrival=t, token_ids=p, output_ids=a, session=s, group=None)
        for i, (t, _, p, a, s) in enumerate(pending)
    ]


@dataclass(frozen=True)
class TraceRecord:
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def load_mooncake_trace(path: str | Path) -> list[TraceRecord]:
    """Parse a Mooncake-format JSONL trace (``timestamp`` ms, ``input_length``,
    ``output_length``, ``hash_ids`` of 512-token blocks). Blank lines are skipped; anything
    else malformed raises :class:`TraceError` naming the line, because a silently shortened
    trace would bias every number computed from it."""
    records: list[TraceRecord] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                rec = TraceRecord(
                    timestamp_ms=float(obj["timestamp"]),
                    input_length=int(obj["input_length"]),
                    output_length=int(obj["output_length"]),
                    hash_ids=tuple(int(h) for h in obj["hash_ids"]),
                )
            except (ValueError, KeyError, TypeError) as exc:
                raise TraceError(f"{path}:{lineno}: not a Mooncake trace record ({exc})") from exc
            if rec.input_length <= 0 or rec.output_length < 0 or rec.timestamp_ms < 0:
                raise TraceError(f"{path}:{lineno}: negative or empty lengths/timestamp")
            if len(rec.hash_ids) * MOONCAKE_BLOCK_TOKENS < rec.input_length:
                raise TraceError(
                    f"{path}:{lineno}: {len(rec.hash_ids)} hash ids cannot cover {rec.input_length} input tokens"
                )
            records.append(rec)
    return records


class _BlockTokens:
    """Deterministic 512 token ids per Mooncake hash id: equal ids, equal tokens."""

    def __init__(self, seed: int) -> None:
        self._seed = seed
        self._cache: dict[int, tuple[int, ...]] = {}

    def __call__(self, hash_id: int) -> tuple[int, ...]:
        got = self._cache.get(hash_id)
        if got is None:
            # 4 random bytes per token in one call (randrange per token dominated replay time).
            raw = random.Random(f"mooncake/{self._seed}/{hash_id}").randbytes(4 * MOONCAKE_BLOCK_TOKENS)
            got = tuple((numpy.frombuffer(raw, dtype="<u4") % VOCAB).tolist())
            self._cache[hash_id] = got
        return got


def mooncake_requests(
    records: Iterable[TraceRecord],
    *,
    seed: int,
    duration: float | None = None,
    time_scale: float = 1.0,
    max_requests: int | None = None,
) -> list[Request]:
    """Turn trace records into requests. ``time_scale`` multiplies trace time (0.5 replays
    twice as fast); records after ``duration`` simulated seconds are dropped."""
    blocks = _BlockTokens(seed)
    rng = random.Random(f"mooncake-out/{seed}")
    out: list[Request] = []
    for rec in sorted(records, key=lambda r: r.timestamp_ms):
        t = rec.timestamp_ms / 1000.0 * time_scale
        if duration is not None and t >= duration:
            break
        if max_requests is not None and len(out) >= max_requests:
            break
        tokens: list[int] = []
        for h in rec.hash_ids:
            tokens.extend(blocks(h))
        out.append(
            Request(
                rid=len(out),
                arrival=t,
                token_ids=tuple(tokens[: rec.input_length]),
                output_ids=_tokens(rng, max(1, rec.output_length)),
                session=None,
                group=None,
            )
        )
    return out


def summarize(requests: Sequence[Request]) -> dict[str, float | int]:
    """Workload facts for the report."""
    n = len(requests)
    return {
        "requests": n,
        "sessions": len({r.session for r in requests if r.session is not None}),
        "prompt_tokens": sum(r.prompt_len for r in requests),
        "output_tokens": sum(r.output_len for r in requests),
        "span_s": round(requests[-1].arrival - requests[0].arrival, 6) if n else 0.0,
    }
