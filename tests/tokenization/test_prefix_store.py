"""Prefix store: look-up by chunk prefixes, LRU bound, and -- through the pool -- token ids
that are always exactly a full tokenization, wherever the cached text was cut."""

from __future__ import annotations

from array import array
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvindex_service.tokenization import TokenizerPool
from kvindex_service.tokenization.prefix_store import PrefixStore
from tests.tokenization.conftest import MODEL
from tests.tokenization.texts import ALL, CHAT_LIKE, CODE, ENGLISH, MIXED

# -- the store on its own ------------------------------------------------------------------


def _put(store: PrefixStore, text: str, ns: str = "ns") -> None:
    ids = array("i", range(len(text)))
    store.insert(store.lookup(ns, text), ids, array("i", range(len(text))))


def test_lookup_finds_the_longest_chunk_prefix() -> None:
    store = PrefixStore(max_chars=10_000, chunk_chars=4)
    _put(store, "aaaabbbbcccc")
    _put(store, "aaaabbbbdddd")
    _put(store, "aaaaxxxx")
    hit = store.lookup("ns", "aaaabbbbcccczz")
    assert hit.entry is not None and hit.entry.text == "aaaabbbbcccc"
    assert hit.common == 12 and not hit.exact
    # Within the last, partial chunk the most recently used entry with the chunk-aligned
    # prefix wins: reuse is exact but may fall short of the best by less than one chunk.
    hit = store.lookup("ns", "aaaabbbbdd")
    assert hit.entry is not None and hit.entry.text == "aaaabbbbcccc" and hit.common == 8
    hit = store.lookup("ns", "aaaabbbbddddd")
    assert hit.entry is not None and hit.entry.text == "aaaabbbbdddd" and hit.common == 12
    assert store.lookup("ns", "aaaabbbbcccc").exact
    assert store.lookup("ns", "zzzzaaaa").entry is None
    assert store.lookup("other-namespace", "aaaabbbbcccc").entry is None


def test_common_prefix_extends_past_the_last_full_chunk() -> None:
    store = PrefixStore(max_chars=10_000, chunk_chars=4)
    _put(store, "aaaabbbbcc")  # 2 full chunks + 2 chars
    hit = store.lookup("ns", "aaaabbbbccdd")
    assert hit.entry is not None and hit.common == 10
    hit = store.lookup("ns", "aaaabbbbcX")
    assert hit.common == 9


def test_lru_is_bounded_by_characters() -> None:
    store = PrefixStore(max_chars=100, chunk_chars=8)
    for i in range(10):
        _put(store, f"{i:02d}" + "x" * 28)  # 30 chars each
    assert store.chars <= 100 and len(store) == 3
    assert store.evictions == 7
    assert store.lookup("ns", "09" + "x" * 28).exact
    assert store.lookup("ns", "00" + "x" * 28).entry is None
    # A hit refreshes an entry: 07 survives the next insertion, 08 goes.
    assert store.lookup("ns", "07" + "x" * 28).exact
    _put(store, "10" + "x" * 28)
    assert store.lookup("ns", "07" + "x" * 28).exact
    assert store.lookup("ns", "08" + "x" * 28).entry is None
    # Evicted entries leave no dangling index keys behind.
    live = {id(e) for e in store._entries.values()}
    assert all(id(e) in live for e in store._index.values())


def test_texts_larger_than_the_store_are_not_kept() -> None:
    store = PrefixStore(max_chars=10, chunk_chars=4)
    _put(store, "x" * 11)
    assert len(store) == 0 and store.chars == 0


def test_zero_capacity_disables_the_store() -> None:
    store = PrefixStore(max_chars=0)
    _put(store, "abc")
    assert not store.enabled and len(store) == 0
    assert store.lookup("ns", "abc").entry is None


def test_hash_collisions_are_verified(monkeypatch: pytest.MonkeyPatch) -> None:
    store = PrefixStore(max_chars=10_000, chunk_chars=4)
    # Every chunk prefix hashes alike: look-ups must still compare the text itself.
    monkeypatch.setattr(store, "chunk_keys", lambda ns, text: tuple(range(len(text) // 4)))
    _put(store, "aaaabbbb")
    hit = store.lookup("ns", "ccccdddd")
    assert hit.entry is None


# -- exactness through the pool ------------------------------------------------------------


def test_repeat_is_an_exact_hit(pool: TokenizerPool, reference) -> None:
    first = pool.tokenize(MODEL, ENGLISH)
    again = pool.tokenize(MODEL, ENGLISH)
    assert first.token_ids == again.token_ids == reference(ENGLISH)
    assert not first.from_prefix_store and first.cached_tokens == 0
    assert again.from_prefix_store and again.cached_tokens == len(again.token_ids) - 1  # BOS
    assert again.exact


def test_extension_reuses_the_prefix(pool: TokenizerPool, reference) -> None:
    base = ENGLISH[:4000]
    pool.tokenize(MODEL, base)
    extended = base + " and then the text goes on with a tail that was never seen before."
    got = pool.tokenize(MODEL, extended)
    assert got.token_ids == reference(extended)
    assert got.from_prefix_store and got.cached_tokens > 0.95 * len(reference(base))
    stats = pool.stats()
    assert stats["prefix_store_hits"] >= 1 and stats["prefix_store_realign_failures"] == 0


def test_chat_and_completion_share_content_tokens(pool: TokenizerPool, reference) -> None:
    with_bos = pool.tokenize(MODEL, CODE, add_special_tokens=True)
    without = pool.tokenize(MODEL, CODE, add_special_tokens=False)
    assert with_bos.token_ids == reference(CODE, True)
    assert without.token_ids == reference(CODE, False)
    assert without.from_prefix_store


@pytest.mark.parametrize("name", ["mixed", "chat", "code"])
def test_every_cached_cut_point_gives_exact_tokens(pool: TokenizerPool, reference, name) -> None:
    """Cache text[:a] for every a (mid-word, mid-whitespace, mid-token), then ask for text."""
    text = ALL[name]
    expected = reference(text, False)
    step = 1 if len(text) <= 1600 else 3
    for a in range(0, len(text), step):
        pool.clear_prefix_store()
        pool.tokenize(MODEL, text[:a], add_special_tokens=False)
        got = pool.tokenize(MODEL, text, add_special_tokens=False)
        assert got.token_ids == expected, (name, a, text[max(0, a - 10) : a + 10])
    assert pool.stats()["prefix_store_realign_failures"] == 0


@pytest.mark.parametrize("name", ["mixed", "whitespace", "chat"])
def test_cached_text_that_forks_anywhere_gives_exact_tokens(pool: TokenizerPool, reference, name) -> None:
    """Cache text[:a] + another continuation, then ask for text: the two texts fork at a."""
    text = ALL[name]
    expected = reference(text, False)
    for a in range(0, len(text), 5):
        for fork in (" other words", "\n\n  x", "Q"):
            pool.clear_prefix_store()
            pool.tokenize(MODEL, text[:a] + fork, add_special_tokens=False)
            got = pool.tokenize(MODEL, text, add_special_tokens=False)
            assert got.token_ids == expected, (name, a, fork, text[max(0, a - 10) : a + 10])
    assert pool.stats()["prefix_store_realign_failures"] == 0


@pytest.mark.parametrize("name", ["mixed", "chat"])
def test_prefix_of_a_cached_text_is_exact(pool: TokenizerPool, reference, name) -> None:
    text = ALL[name]
    for b in range(0, len(text), 7):
        pool.clear_prefix_store()
        pool.tokenize(MODEL, text, add_special_tokens=False)
        assert pool.tokenize(MODEL, text[:b], add_special_tokens=False).token_ids == reference(text[:b], False)


def test_conversation_growing_turn_by_turn(pool: TokenizerPool, reference) -> None:
    turns = CHAT_LIKE.split("<|eot_id|>")
    text = ""
    for turn in turns:
        text += turn + "<|eot_id|>"
        got = pool.tokenize(MODEL, text, add_special_tokens=False)
        assert got.token_ids == reference(text, False)
    assert got.from_prefix_store


# Fragments that stress the seam: special tokens, contractions, digit runs, whitespace kinds.
_FRAGMENTS = [
    "<|eot_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|begin_of_text|>",
    "|>",
    "<|",
    "'s",
    "'ll",
    "'T",
    "don't",
    "123456",
    "3.14",
    "\r\n",
    "\n\n",
    "   ",
    "\t",
    "\u00a0",
    "\u3000",
    "\u200b",
    "\u180e",
    "\u2028",
    "\x1c",
    "😀",
    "e\u0301",
    "東京",
    "Straße",
    "مرحبا",
    "def f(x):\n    return x\n",
    "\t  ",
    "\n \n",
    "\r \n",
    "\u3000  ",
    "  \t",
    "!!!",
    "...",
    " ",
]
_ALPHABET = st.sampled_from(list("ab Z9 .,'\n\t!?-_é中😀\u0301") + ["\u00a0", "\r"])
_PIECES = st.one_of(
    st.sampled_from(_FRAGMENTS),
    st.text(_ALPHABET, min_size=1, max_size=12),
    st.sampled_from([ENGLISH[i : i + 80] for i in range(0, 4000, 80)]),
)
_TEXTS = st.lists(_PIECES, min_size=1, max_size=40).map("".join)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(prefix=_TEXTS, first=_TEXTS, second=_TEXTS, special=st.booleans())
def test_shared_prefix_with_different_continuations(
    pool: TokenizerPool, reference, prefix, first, second, special
) -> None:
    pool.clear_prefix_store()
    pool.tokenize(MODEL, prefix + first, add_special_tokens=special)
    request = prefix + second
    got = pool.tokenize(MODEL, request, add_special_tokens=special)
    assert got.token_ids == reference(request, special)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(text=_TEXTS, tail=_TEXTS, data=st.data())
def test_random_texts_and_cuts_are_exact(pool: TokenizerPool, reference, text, tail, data) -> None:
    pool.clear_prefix_store()
    cut = data.draw(st.integers(0, len(text)), label="cut")
    special = data.draw(st.booleans(), label="add_special_tokens")
    pool.tokenize(MODEL, text[:cut], add_special_tokens=special)
    for request in (text, text + tail, text[: cut // 2]):
        got = pool.tokenize(MODEL, request, add_special_tokens=special)
        assert got.token_ids == reference(request, special)
        assert got.exact


def test_small_chunks_and_many_entries(llama3_dir: Path, reference) -> None:
    with TokenizerPool({MODEL: str(llama3_dir)}, chunk_chars=16, prefix_store_chars=20_000) as pool:
        for i in range(0, len(MIXED), 37):
            assert pool.tokenize(MODEL, MIXED[:i]).token_ids == reference(MIXED[:i])
        stats = pool.stats()
        assert stats["prefix_store_chars"] <= 20_000
        assert stats["prefix_store_hits"] > 0 and stats["prefix_store_hit_ratio"] > 0.5


def test_reuse_switches_off_for_unproven_tokenizers(variant_dirs, reference) -> None:
    """An NFC normalizer is outside the proven rules: no splicing, exact hits still work."""
    src = str(variant_dirs["nfc-normalizer"])
    with TokenizerPool({"nfc": src}) as pool:
        assert pool.tokenizer_info("nfc")["prefix_store_reuse"] is False
        base = pool.tokenize("nfc", ENGLISH)
        longer = pool.tokenize("nfc", ENGLISH + " more words")
        assert not longer.from_prefix_store
        assert longer.token_ids[: len(base.token_ids) - 5] == base.token_ids[:-5]
        assert pool.tokenize("nfc", ENGLISH).from_prefix_store
