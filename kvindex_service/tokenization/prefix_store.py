"""An LRU store of already-tokenized texts, found again by their leading characters.

Each entry holds one text and its token ids (token offsets are derived on demand).
Entries are found two ways:

* by the whole text (an exact hit, a dict look-up), and
* by chunk prefixes: the text is cut into ``chunk_chars``-character chunks and every
  chunk-aligned prefix gets a chained hash (``h_k = hash((h_{k-1}, chunk_k))``). An index maps
  each such hash to the most recently used entry whose text has that prefix. A request
  probes its own chunk-prefix hashes from the longest down and stops at the first entry whose
  text really starts with the same characters, so a look-up costs O(len(text)) hashing plus
  at most a few dict probes, never a scan of the store.

The store is bounded by the total number of cached characters; the least recently used
entries go first. It knows nothing about tokenizers: the caller decides where it is safe to
reuse an entry's tokens (see :mod:`kvindex_service.tokenization.splice`).

All methods are thread-safe; hashing happens outside the lock.
"""

from __future__ import annotations

import threading
from array import array
from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["Entry", "Lookup", "PrefixStore"]


class Entry:
    """One tokenized text.

    ``ids`` is an ``array('i')``. ``starts`` is None until someone needs token positions;
    then it holds ``len(ids) + 1`` cumulative UTF-8 byte offsets (token ``i`` covers bytes
    ``starts[i]:starts[i+1]`` of the text), filled in by the tokenizer that owns the entry.
    """

    __slots__ = ("ids", "keys", "namespace", "starts", "text")

    def __init__(
        self,
        namespace: str,
        text: str,
        ids: array[int],
        starts: array[int] | None,
        keys: tuple[int, ...],
    ) -> None:
        self.namespace = namespace
        self.text = text
        self.ids = ids
        self.starts = starts
        self.keys = keys


@dataclass(frozen=True, slots=True)
class Lookup:
    """Result of :meth:`PrefixStore.lookup`.

    ``entry`` is the best entry found (or None) and ``common`` the length of the prefix that
    ``text`` shares with ``entry.text``. ``exact`` means the entry's text is the request text.
    ``keys`` are the request's chunk-prefix hashes, reused by :meth:`PrefixStore.insert`.
    """

    namespace: str
    text: str
    keys: tuple[int, ...]
    entry: Entry | None
    common: int

    @property
    def exact(self) -> bool:
        return self.entry is not None and self.common == len(self.text) == len(self.entry.text)


def _common_prefix_len(a: str, b: str, start: int) -> int:
    """Length of the common prefix of ``a`` and ``b``, knowing the first ``start`` chars agree."""
    lo, hi = start, min(len(a), len(b))
    if a[lo:hi] == b[lo:hi]:
        return hi
    hi -= 1  # a[:hi+1] != b[:hi+1] is known; find the largest lo with a[:lo] == b[:lo]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class PrefixStore:
    """Character-bounded LRU of tokenized texts with chunk-prefix look-up."""

    def __init__(self, max_chars: int = 64_000_000, chunk_chars: int = 256) -> None:
        if max_chars < 0:
            raise ValueError("max_chars must be >= 0")
        if chunk_chars < 1:
            raise ValueError("chunk_chars must be >= 1")
        self.max_chars = max_chars
        self.chunk_chars = chunk_chars
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, str], Entry] = OrderedDict()
        self._index: dict[int, Entry] = {}
        self._chars = 0
        self._tokens = 0
        self.evictions = 0

    # -- hashing ---------------------------------------------------------------------------

    def chunk_keys(self, namespace: str, text: str) -> tuple[int, ...]:
        """Chained hashes of every chunk-aligned prefix of ``text`` (shortest first)."""
        cs = self.chunk_chars
        h = hash(("kvindex-prefix", namespace))
        keys = []
        for end in range(cs, len(text) + 1, cs):
            h = hash((h, text[end - cs : end]))
            keys.append(h)
        return tuple(keys)

    # -- queries ---------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self.max_chars > 0

    def get(self, namespace: str, text: str) -> Entry | None:
        """The entry for exactly ``text`` (refreshed in the LRU), without any prefix search."""
        if not self.enabled:
            return None
        with self._lock:
            entry = self._entries.get((namespace, text))
            if entry is not None:
                self._touch(entry)
            return entry

    def lookup(self, namespace: str, text: str) -> Lookup:
        """Find the entry sharing the longest (chunk-aligned, then exact) prefix with ``text``."""
        if not self.enabled:
            return Lookup(namespace, text, (), None, 0)
        with self._lock:
            entry = self._entries.get((namespace, text))
            if entry is not None:
                self._touch(entry)
                return Lookup(namespace, text, entry.keys, entry, len(text))
        keys = self.chunk_keys(namespace, text)
        cs = self.chunk_chars
        with self._lock:
            for k in range(len(keys), 0, -1):
                cand = self._index.get(keys[k - 1])
                if cand is None:
                    continue
                n = k * cs
                # Guard against hash collisions: the candidate must really share the prefix.
                if cand.namespace == namespace and cand.text[:n] == text[:n]:
                    self._touch(cand)
                    break
            else:
                return Lookup(namespace, text, keys, None, 0)
        return Lookup(namespace, text, keys, cand, _common_prefix_len(cand.text, text, n))

    def _touch(self, entry: Entry) -> None:
        self._entries.move_to_end((entry.namespace, entry.text))
        index = self._index
        for key in entry.keys:
            index[key] = entry

    # -- updates ---------------------------------------------------------------------------

    def insert(self, lookup: Lookup, ids: array[int], starts: array[int] | None = None) -> bool:
        """Store the tokens of ``lookup.text``; returns False if it does not fit at all."""
        text, namespace = lookup.text, lookup.namespace
        if not self.enabled or len(text) > self.max_chars:
            return False
        entry = Entry(namespace, text, ids, starts, lookup.keys)
        with self._lock:
            old = self._entries.pop((namespace, text), None)
            if old is not None:
                self._forget(old)
            self._entries[(namespace, text)] = entry
            self._chars += len(text)
            self._tokens += len(ids)
            index = self._index
            for key in entry.keys:
                index[key] = entry
            while self._chars > self.max_chars:
                _, victim = self._entries.popitem(last=False)
                self._forget(victim)
                self.evictions += 1
        return True

    def _forget(self, entry: Entry) -> None:
        self._chars -= len(entry.text)
        self._tokens -= len(entry.ids)
        index = self._index
        for key in entry.keys:
            if index.get(key) is entry:
                del index[key]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._index.clear()
            self._chars = 0
            self._tokens = 0

    # -- introspection ---------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def chars(self) -> int:
        return self._chars

    @property
    def tokens(self) -> int:
        return self._tokens
