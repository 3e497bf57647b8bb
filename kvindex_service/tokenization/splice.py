"""Where the tokens of a cached text can be reused for a longer (or different) text.

Tokenizing ``T`` as ``tokens(T[:c]) + tokens(T[c:])`` is only right when ``c`` is a boundary
that the tokenizer itself would produce and that does not depend on what follows. For the
byte-level BPE tokenizers of the GPT-4/Llama 3 family (no normalizer, a ``Split`` regex
pre-tokenizer without look-behind, byte-level mapping, BPE inside each pre-token, added
tokens matched before everything else) two kinds of cut are provably safe:

Rule A -- a space after a non-space. If ``T[c] == " "`` and ``T[c-1]`` is not whitespace,
    every alternative of the pre-tokenizer regex that covers ``T[c-1]`` (a letter run, a
    contraction, at most three digits, or a punctuation run followed only by ``\\r``/``\\n``)
    must end at ``c``; so whatever the alignment of the scan, a pre-token ends at ``c``. The
    regex has no look-behind, so the scan of ``T[c:]`` equals the scan of ``T`` from ``c``;
    and no match starting before ``c`` reads past ``T[c]``, so the tokens before ``c`` only
    depend on ``T[:c+1]``. Added tokens never contain whitespace (checked), so none spans
    ``c`` either.

Rule C -- right after an added token shaped ``<|...|>``. Added tokens are split off before
    pre-tokenization. When every added token starts with ``<|`` and contains ``|>`` only at
    its end (checked), no added-token occurrence can span the end of one, so the text splits
    there whatever comes next. This makes chat transcripts reusable at every ``<|eot_id|>``.

:func:`analyze` decides from the tokenizer's own configuration whether these rules hold
and disables reuse otherwise (exact full tokenization is then always used). The tests check
every position the rules allow in real texts: it is a token boundary of the real tokenizer
and splicing there gives the full tokenization, also when the cached text forks right after.
"""

from __future__ import annotations

import json
from array import array
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from kvindex_service.tokenization.prefix_store import Entry

__all__ = ["SAFE_SPLIT_PATTERNS", "Cut", "SpliceRules", "analyze", "tokens_before", "utf8_len"]

#: Split regexes for which rule A is proven (see the module docstring).
SAFE_SPLIT_PATTERNS: frozenset[str] = frozenset(
    {
        # Llama 3 / GPT-4 cl100k family: digits in groups of up to three.
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        # Qwen2 family: the same with single digits.
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    }
)

# Zero-width and format characters that some Unicode versions counted as whitespace: a
# space after one of them is not a rule-A cut.
_AMBIGUOUS = frozenset("\u180e\u200b\u200c\u200d\u2060\ufeff")


def _not_after_text(ch: str) -> bool:
    """True if a space after ``ch`` may continue a whitespace run (so it is no cut)."""
    return ch.isspace() or ch in _AMBIGUOUS


_FIRST_WINDOW = 512


@dataclass(frozen=True, slots=True)
class Cut:
    """A safe cut at character ``pos`` (UTF-8 byte ``byte``), after ``tokens`` cached tokens."""

    pos: int
    byte: int
    tokens: int


def utf8_len(text: str, end: int) -> int:
    """UTF-8 length of ``text[:end]``."""
    return end if text.isascii() else len(text[:end].encode("utf-8", "surrogatepass"))


def tokens_before(starts: array[int], byte: int) -> int:
    """Number of tokens starting before ``byte`` (``starts``: cumulative byte offsets)."""
    return bisect_left(starts, byte, 0, len(starts) - 1)


@dataclass(frozen=True)
class SpliceRules:
    """What the tokenizer allows; ``enabled`` is False when no reuse is provably exact.

    ``added_tokens`` maps the text of every ``<|...|>`` added token to its id (empty when
    rule C does not hold).
    """

    space_cut: bool
    special_cut: bool
    added_tokens: dict[str, int] = field(default_factory=dict)
    reason: str = ""
    max_added_len: int = 0

    @property
    def enabled(self) -> bool:
        return self.space_cut or self.special_cut

    # -- the rules, on text alone ------------------------------------------------------------

    def space_cuts(self, text: str, lo: int, limit: int) -> Iterator[int]:
        """Rule A positions ``c`` in ``[max(lo, 1), limit)``, largest first."""
        if not self.space_cut:
            return
        lo = max(lo, 1)
        pos = text.rfind(" ", lo, limit)
        while pos >= lo:
            if not _not_after_text(text[pos - 1]):
                yield pos
            pos = text.rfind(" ", lo, pos)

    def special_cuts(self, text: str, lo: int, limit: int) -> Iterator[tuple[int, int, int]]:
        """Rule C positions ``c`` in ``(lo, limit]`` right after an added token, largest first,
        with the token's id and UTF-8 length."""
        if not self.special_cut:
            return
        added = self.added_tokens
        end = limit
        while True:
            idx = text.rfind("|>", lo, end)
            if idx < 0:
                return
            begin = text.rfind("<|", max(0, idx + 2 - self.max_added_len), idx)
            if begin >= 0:
                token = text[begin : idx + 2]
                token_id = added.get(token)
                if token_id is not None:
                    yield idx + 2, token_id, utf8_len(token, len(token))
            end = idx + 1

    # -- applying them to a cached entry -----------------------------------------------------

    def find_cut(self, text: str, limit: int, entry: Entry, starts: array[int], floor: int = 1) -> Cut | None:
        """The largest safe cut ``c`` with ``floor <= c`` inside ``text[:limit]``.

        ``entry`` is the cached tokenization of a text that agrees with ``text`` on its first
        ``limit`` characters and ``starts`` its cumulative token byte offsets. Rule A cuts
        need ``c < limit`` (the space itself must be shared); rule C cuts need ``c <= limit``.
        The entry must have a token boundary at the cut (the rules guarantee it; checked).
        """
        if not self.enabled or limit <= floor:
            return None
        width = _FIRST_WINDOW
        while True:
            lo = max(floor, limit - width)
            best = self._best_in_window(text, lo, limit, entry, starts)
            if best is not None or lo <= floor:
                return best
            width *= 4

    def _best_in_window(self, text: str, lo: int, limit: int, entry: Entry, starts: array[int]) -> Cut | None:
        best: Cut | None = None
        for pos in self.space_cuts(text, lo, limit):
            byte = utf8_len(text, pos)
            tokens = tokens_before(starts, byte)
            if tokens < len(entry.ids) and starts[tokens] == byte:
                best = Cut(pos, byte, tokens)
            break
        floor = best.pos if best is not None else lo - 1
        for pos, token_id, size in self.special_cuts(text, floor, limit):
            byte = utf8_len(text, pos)
            tokens = tokens_before(starts, byte)
            if (
                tokens > 0
                and starts[tokens] == byte
                and starts[tokens - 1] == byte - size
                and entry.ids[tokens - 1] == token_id
            ):
                return Cut(pos, byte, tokens)
        return best


def _disabled(reason: str) -> SpliceRules:
    return SpliceRules(space_cut=False, special_cut=False, reason=reason)


def _state(component: Any) -> dict[str, Any]:
    """The JSON configuration of a tokenizers component (its pickle state)."""
    state = json.loads(component.__getstate__())
    return state if isinstance(state, dict) else {}


def _pretokenizer_ok(state: dict[str, Any]) -> bool:
    kind = state.get("type")
    if kind == "Sequence":
        steps = state.get("pretokenizers") or []
        if len(steps) == 1:
            return _pretokenizer_ok(steps[0])
        if len(steps) != 2:
            return False
        split, byte_level = steps
        pattern = (split.get("pattern") or {}).get("Regex")
        return (
            split.get("type") == "Split"
            and pattern in SAFE_SPLIT_PATTERNS
            and split.get("behavior") == "Isolated"
            and not split.get("invert", False)
            and byte_level.get("type") == "ByteLevel"
            and not byte_level.get("add_prefix_space", True)
            and not byte_level.get("use_regex", True)
        )
    if kind == "ByteLevel":
        # GPT-2's built-in regex: ' ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+' plus
        # contractions; rule A holds for it as well.
        return bool(state.get("use_regex", True)) and not state.get("add_prefix_space", True)
    return False


def analyze(tokenizer: Tokenizer) -> SpliceRules:
    """Decide which cuts are exact for ``tokenizer`` (conservatively: unknown means none)."""
    if tokenizer.normalizer is not None:
        return _disabled("tokenizer has a normalizer")
    if tokenizer.pre_tokenizer is None or not _pretokenizer_ok(_state(tokenizer.pre_tokenizer)):
        return _disabled("pre-tokenizer is not a known byte-level regex split")
    if type(tokenizer.model).__name__ != "BPE" or getattr(tokenizer.model, "dropout", None):
        return _disabled("model is not a deterministic BPE")
    added = tokenizer.get_added_tokens_decoder()
    lengths: dict[str, int] = {}
    special_shape = True
    for token_id, tok in added.items():
        content = tok.content
        if tok.lstrip or tok.rstrip or tok.single_word or any(ch.isspace() for ch in content):
            return _disabled(f"added token {content!r} strips or contains whitespace")
        if content.startswith("<|") and content.find("|>") == len(content) - 2 > 0:
            lengths[content] = token_id
        else:
            special_shape = False
    return SpliceRules(
        space_cut=True,
        special_cut=special_shape and bool(lengths),
        added_tokens=lengths if special_shape else {},
        max_added_len=max(map(len, lengths), default=0) if special_shape else 0,
    )
