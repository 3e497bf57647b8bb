"""One hashing per request: the shared key cache equals hashing the prompt (and prompt +
output) directly, and the engine's prompt + output view slices like the concatenation."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvindex_service import TokenProcessor
from kvindex_service.sim import Request
from kvindex_service.sim.engine import _Joined
from kvindex_service.sim.keys import BlockKeys

tokens = st.lists(st.integers(0, 127_999), max_size=80)


@settings(max_examples=60, deadline=None)
@given(prompt=tokens, output=tokens, block_size=st.sampled_from([1, 4, 16]))
def test_block_keys_equal_direct_hashing(prompt: list[int], output: list[int], block_size: int) -> None:
    tp = TokenProcessor(block_size, "7", "sha256_cbor")
    keys = BlockKeys(tp)
    req = Request(rid=3, arrival=0.0, token_ids=tuple(prompt), output_ids=tuple(output))
    assert keys.prompt(req) == tp.block_keys(prompt)
    assert keys.full(req) == tp.block_keys(prompt + output)
    assert keys.full(req) is keys.full(req)  # hashed once


@settings(max_examples=100, deadline=None)
@given(head=tokens, tail=tokens, data=st.data())
def test_joined_slices_like_the_concatenation(head: list[int], tail: list[int], data: st.DataObject) -> None:
    whole = head + tail
    joined = _Joined(tuple(head), tuple(tail))
    assert len(joined) == len(whole)
    start = data.draw(st.integers(-len(whole) - 2, len(whole) + 2))
    stop = data.draw(st.integers(-len(whole) - 2, len(whole) + 2))
    assert list(joined[start:stop]) == whole[start:stop]
    if whole:
        i = data.draw(st.integers(-len(whole), len(whole) - 1))
        assert joined[i] == whole[i]
