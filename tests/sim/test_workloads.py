"""Workloads are deterministic per seed; the Mooncake trace parses and shares blocks."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvindex_service.sim import (
    TraceError,
    chat_sessions,
    load_mooncake_trace,
    mooncake_requests,
    shared_prefix,
)
from tests.conftest import MOONCAKE_TRACE


def test_shared_prefix_is_deterministic_and_shares_system_prompts() -> None:
    a = shared_prefix(seed=3, rate=5, duration=10, groups=2, system_tokens=64, question_tokens=8)
    b = shared_prefix(seed=3, rate=5, duration=10, groups=2, system_tokens=64, question_tokens=8)
    c = shared_prefix(seed=4, rate=5, duration=10, groups=2, system_tokens=64, question_tokens=8)
    assert a == b and a != c
    assert all(x.arrival <= y.arrival for x, y in zip(a, a[1:]))
    by_group: dict[str | None, set[tuple[int, ...]]] = {}
    for r in a:
        assert r.prompt_len == 72
        by_group.setdefault(r.group, set()).add(r.token_ids[:64])
    assert len(by_group) == 2 and all(len(v) == 1 for v in by_group.values())


def test_chat_turns_extend_the_conversation() -> None:
    reqs = chat_sessions(seed=1, rate=1, duration=20, turns=3)
    assert reqs == chat_sessions(seed=1, rate=1, duration=20, turns=3)
    sessions: dict[str | None, list[tuple[int, ...]]] = {}
    for r in sorted(reqs, key=lambda r: r.arrival):
        sessions.setdefault(r.session, []).append(r.token_ids)
    multi = [turns for turns in sessions.values() if len(turns) > 1]
    assert multi
    for turns in multi:
        for prev, nxt in zip(turns, turns[1:]):
            assert nxt[: len(prev)] == prev and len(nxt) > len(prev)


def test_mooncake_trace_equal_hash_ids_give_equal_tokens() -> None:
    records = load_mooncake_trace(MOONCAKE_TRACE)
    assert len(records) == 3993
    reqs = mooncake_requests(records[:200], seed=1)
    assert [r.prompt_len for r in reqs] == [
        rec.input_length for rec in sorted(records[:200], key=lambda r: r.timestamp_ms)
    ]
    first = sorted(records[:200], key=lambda r: r.timestamp_ms)
    # two requests whose first hash id agree share their first 512 tokens, and vice versa
    for i in range(len(first) - 1):
        same = first[i].hash_ids[0] == first[i + 1].hash_ids[0]
        assert (reqs[i].token_ids[:512] == reqs[i + 1].token_ids[:512]) == same
    assert mooncake_requests(records[:50], seed=1) == mooncake_requests(records[:50], seed=1)


def test_malformed_trace_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [1]}\n{"timestamp": 1}\n')
    with pytest.raises(TraceError, match=":2:"):
        load_mooncake_trace(bad)
