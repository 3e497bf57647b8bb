"""The cut rules are exact: at every cut they allow, cached tokens + tokens of the rest ==
tokens of the whole text, for the real Llama 3.2 tokenizer and the other pre-tokenizers the
rules claim (the Llama 3.2 vocabulary behind Qwen2's and GPT-2's split rules)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from kvindex_service.tokenization.loader import LoadedTokenizer, load_tokenizer, resolve_source
from kvindex_service.tokenization.prefix_store import Entry
from kvindex_service.tokenization.splice import Cut
from tests.tokenization.texts import ALL, ENGLISH

CUT_VARIANTS = ["llama3", "qwen2-regex", "gpt2-bytelevel"]


@pytest.fixture(scope="module")
def tokenizers(llama3_dir: Path, variant_dirs: dict[str, Path]) -> dict[str, LoadedTokenizer]:
    dirs = {"llama3": llama3_dir, **variant_dirs}
    return {name: load_tokenizer(resolve_source(str(d))) for name, d in dirs.items()}


def _entry(lt: LoadedTokenizer, text: str) -> Entry:
    entry = Entry("test", text, lt.encode(text), None, ())
    lt.entry_starts(entry)
    return entry


def find_cut(lt: LoadedTokenizer, text: str, limit: int, entry: Entry) -> Cut | None:
    return lt.splice.find_cut(text, limit, entry, lt.entry_starts(entry))


def all_cuts(lt: LoadedTokenizer, text: str, entry: Entry, limit: int) -> list[Cut]:
    cuts = []
    while True:
        cut = find_cut(lt, text, limit, entry)
        if cut is None:
            return cuts
        cuts.append(cut)
        limit = cut.pos - 1


@pytest.mark.parametrize("variant", CUT_VARIANTS)
def test_rules_enabled_for_known_pre_tokenizers(tokenizers, variant: str) -> None:
    rules = tokenizers[variant].splice
    assert rules.space_cut and rules.special_cut, rules.reason


def test_rules_disabled_with_a_normalizer(tokenizers) -> None:
    rules = tokenizers["nfc-normalizer"].splice
    assert not rules.enabled
    assert "normalizer" in rules.reason


def rule_positions(lt: LoadedTokenizer, text: str) -> list[int]:
    """Every cut the rules allow in ``text``, from the text alone (no cached tokens)."""
    rules = lt.splice
    spaces = rules.space_cuts(text, 1, len(text))
    specials = (pos for pos, _id, _size in rules.special_cuts(text, 0, len(text)))
    return sorted(set(spaces) | set(specials))


@pytest.mark.parametrize("variant", CUT_VARIANTS)
@pytest.mark.parametrize("name", sorted(ALL))
def test_every_rule_position_is_a_boundary_and_exact(tokenizers, variant: str, name: str) -> None:
    """At each position the rules allow, the tokenizer has a token boundary and
    tokens(text) == tokens(text)[:k] + tokens(text[c:])."""
    lt = tokenizers[variant]
    text = ALL[name]
    ids = lt.encode(text)
    starts = lt.byte_starts(ids)
    boundaries = set(starts)
    positions = rule_positions(lt, text)
    assert len(positions) > 20
    for pos in positions:
        assert len(text[:pos].encode("utf-8")) in boundaries, (name, pos, text[pos - 10 : pos + 10])
    if len(positions) > 250:  # keep the run short: a deterministic sample of the long texts
        positions = random.Random(7).sample(positions, 250)
    suffixes = lt.tokenizer.encode_batch([text[pos:] for pos in positions], add_special_tokens=False)
    full = ids.tolist()
    for pos, suffix in zip(positions, suffixes, strict=True):
        k = starts.index(len(text[:pos].encode("utf-8")))
        context = text[pos - 10 : pos + 10]
        assert full[:k] + suffix.ids == full, (name, pos, context)


@pytest.mark.parametrize("variant", CUT_VARIANTS)
def test_find_cut_on_a_cached_copy_finds_every_rule_position(tokenizers, variant: str) -> None:
    lt = tokenizers[variant]
    for text in ALL.values():
        entry = _entry(lt, text)
        found = sorted(c.pos for c in all_cuts(lt, text, entry, len(text)))
        assert found == rule_positions(lt, text)


def test_special_token_cuts_are_found(tokenizers) -> None:
    lt = tokenizers["llama3"]
    text = ALL["chat"]
    entry = _entry(lt, text)
    ends = {c.pos for c in all_cuts(lt, text, entry, len(text))}
    eot = "<|eot_id|>"
    expected = {i + len(eot) for i in range(len(text)) if text.startswith(eot, i)}
    assert expected <= ends
    # The end of the text is a cut when it ends with a special token (rule C allows c == limit).
    assert find_cut(lt, text[: max(expected)], max(expected), entry).pos == max(expected)


def test_fake_special_tokens_are_not_cuts(tokenizers) -> None:
    lt = tokenizers["llama3"]
    text = "x" * 40 + "|>" + "y" * 40 + "<|not_a_token|>" + "z" * 40
    entry = _entry(lt, text)
    assert find_cut(lt, text, len(text), entry) is None


def test_cut_needs_the_space_inside_the_shared_prefix(tokenizers) -> None:
    lt = tokenizers["llama3"]
    text = "alpha beta gamma"
    entry = _entry(lt, text)
    # With 11 shared characters ("alpha beta "), the space at 10 is shared: cut there.
    assert find_cut(lt, text, 11, entry).pos == 10
    # With 10 shared characters the space at 10 is not known to follow: cut at 5.
    assert find_cut(lt, text, 10, entry).pos == 5


def test_whitespace_runs_are_never_cut_inside(tokenizers) -> None:
    lt = tokenizers["llama3"]
    text = "word" + " " * 50 + "next\n\n  \t more"
    entry = _entry(lt, text)
    cuts = {c.pos for c in all_cuts(lt, text, entry, len(text))}
    assert cuts == {4}


def test_long_text_without_cuts_in_the_last_window(tokenizers) -> None:
    lt = tokenizers["llama3"]
    text = ENGLISH[:2000] + " " + "x" * 5000
    entry = _entry(lt, text)
    cut = find_cut(lt, text, len(text), entry)
    assert cut is not None and cut.pos == 2000


def test_token_byte_offsets_match_the_tokenizer(tokenizers) -> None:
    """The store derives token positions from a per-id byte-length table: it must agree
    with the offsets `tokenizers` itself reports, on every text."""
    lt = tokenizers["llama3"]
    for text in ALL.values():
        enc = lt.tokenizer.encode(text, add_special_tokens=False)
        starts = lt.byte_starts(lt.encode(text))
        assert starts[-1] == len(text.encode("utf-8"))
        for i, (start, _end) in enumerate(enc.offsets):
            # A multi-byte character split over several tokens shares one char offset.
            assert len(text[:start].encode("utf-8")) <= starts[i] < len(text[: start + 1].encode("utf-8")) or starts[
                i
            ] == len(text[:start].encode("utf-8"))


def test_encode_matches_plain_encode(tokenizers) -> None:
    lt = tokenizers["llama3"]
    for text in ALL.values():
        assert lt.encode(text).tolist() == lt.tokenizer.encode(text, add_special_tokens=False).ids
