"""TokenizerPool: per-model tokenizers, chat rendering and the prefix store behind one API.

Modes
-----
``exact``
    Every answer is the exact token list vLLM would compute. A text that shares a prefix
    with a cached one reuses the cached tokens up to the last provably safe cut (see
    :mod:`kvindex_service.tokenization.splice`) and tokenizes only the rest.
``fast``
    llm-d's behaviour: when the uncached part of a text is longer than ``chunk_chars``, the
    answer is at once the tokens of the longest cached prefix (maybe only the BOS token),
    marked ``exact=False``, while the full tokenization runs in the background and fills the
    store; the next request for the same text is exact. Short tails are tokenized on the
    spot, so the answer is exact whenever that is cheap.

Sync methods do the work on the calling thread; async methods run it in a thread pool
(``tokenizers`` releases the GIL while it encodes), so the event loop keeps running. The one
exception is an exact prefix-store hit for a plain prompt, a dict look-up answered at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from array import array
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

from kvindex_service.tokenization.chat import (
    BUILTIN_TEMPLATES,
    ChatRenderer,
    builtin_template,
    load_template_setting,
    select_template,
)
from kvindex_service.tokenization.errors import (
    TemplateError,
    TokenizationError,
    TokenizerLoadError,
    UnknownModelError,
)
from kvindex_service.tokenization.limits import Limits, Messages, materialize
from kvindex_service.tokenization.loader import (
    LoadedTokenizer,
    find_in_hf_cache,
    load_tokenizer,
    resolve_source,
)
from kvindex_service.tokenization.prefix_store import Lookup, PrefixStore
from kvindex_service.tokenization.splice import Cut

__all__ = ["MODES", "Tokenized", "TokenizerPool"]

log = logging.getLogger(__name__)

MODES: tuple[str, ...] = ("exact", "fast")

# Exact store hits of texts up to this size are answered on the event loop: hashing the text
# is the only O(n) step (~1 GB/s), far cheaper than the hop to a worker thread.
_INLINE_HIT_MAX_CHARS = 256_000


@dataclass(frozen=True)
class Tokenized:
    """Token ids of one prompt and where they came from."""

    token_ids: list[int]
    from_prefix_store: bool  # some tokens came from the prefix store
    cached_tokens: int  # how many tokens came from the store
    exact: bool  # False only in fast mode when the answer is partial


_COUNTERS = (
    "tokenize_calls",
    "chat_renders",
    "prefix_store_hits",
    "prefix_store_exact_hits",
    "prefix_store_misses",
    "prefix_store_bypassed",
    "prefix_store_realign_failures",
    "cached_tokens",
    "tokenized_chars",
    "partial_answers",
    "background_fills",
    "background_errors",
)


class TokenizerPool:
    """Tokenizers for a set of models, loaded once each, shared by all threads.

    ``sources`` maps a model name to a tokenizer directory, a ``tokenizer.json`` path or a
    Hugging Face repo id in the local cache. A model that is not configured is looked up in
    the local HF cache under its own name. ``chat_templates`` maps a model name to a template
    file, an inline template or a built-in name (``"llama3"``); it overrides the tokenizer's
    own template, like vLLM's ``--chat-template``.
    """

    def __init__(
        self,
        sources: Mapping[str, str] = {},
        *,
        chat_templates: Mapping[str, str] = {},
        prefix_store_chars: int = 64_000_000,
        chunk_chars: int = 256,
        mode: str = "exact",
        max_workers: int = 4,
        hf_cache: str | None = None,
        clock: Callable[[], datetime] | None = None,
        limits: Limits | None = None,
        unavailable: Mapping[str, str] = {},
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if max_workers < 1:
            raise ValueError("max_workers must be >= 1")
        self._sources = dict(sources)
        self._template_overrides = dict(chat_templates)
        self._hf_cache = hf_cache
        self.limits = limits if limits is not None else Limits()
        self._unavailable = dict(unavailable)  # model -> why its tokenizer is missing (404 text)
        self.mode = mode
        self._store = PrefixStore(prefix_store_chars, chunk_chars)
        self._fast_sync_chars = chunk_chars
        self._renderer = ChatRenderer(clock)
        self._max_workers = max_workers
        self._executor = ThreadPoolExecutor(max_workers, thread_name_prefix="kvindex-tokenize")
        self._background: ThreadPoolExecutor | None = None
        self._loaded: dict[str, LoadedTokenizer] = {}
        self._by_path: dict[str, LoadedTokenizer] = {}
        self._load_locks: dict[str, threading.Lock] = {}
        self._templates: dict[str, str] = {}
        self._lock = threading.Lock()
        self._inflight: dict[tuple[str, str], Future[None]] = {}
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._closed = False

    # -- models ----------------------------------------------------------------------------

    def models(self) -> list[str]:
        """Configured models plus the models loaded on demand from the HF cache."""
        return sorted(set(self._sources) | set(self._loaded))

    def has_model(self, model: str) -> bool:
        """True if ``model`` is configured or resolvable from the local HF cache."""
        if not isinstance(model, str):
            return False
        if model in self._sources or model in self._loaded:
            return True
        return find_in_hf_cache(model, self._hf_cache) is not None

    def preload(self) -> None:
        """Load every configured tokenizer now; raises TokenizationError listing failures."""
        errors = []
        for model in self._sources:
            try:
                self._tokenizer(model)
            except TokenizationError as exc:
                errors.append(str(exc))
        if errors:
            raise TokenizerLoadError("; ".join(errors))

    def ready(self) -> bool:
        """True when every configured tokenizer is loaded."""
        return all(model in self._loaded for model in self._sources)

    def tokenizer_info(self, model: str) -> dict[str, Any]:
        """Where the model's tokenizer and template come from (for diagnostics endpoints)."""
        lt = self._tokenizer(model)
        return {
            "tokenizer_json": str(lt.source.tokenizer_json),
            "origin": lt.source.origin,
            "family": lt.family,
            "chat_template": self._template_origin(model, lt),
            "prefix_store_reuse": lt.splice.enabled,
            "prefix_store_reuse_note": lt.splice.reason,
        }

    def _tokenizer(self, model: str) -> LoadedTokenizer:
        if not isinstance(model, str) or not model:
            raise UnknownModelError(str(model), "model name must be a non-empty string")
        lt = self._loaded.get(model)
        if lt is not None:
            return lt
        with self._lock:
            lock = self._load_locks.setdefault(model, threading.Lock())
        with lock:
            lt = self._loaded.get(model)
            if lt is not None:
                return lt
            spec = self._sources.get(model)
            if spec is None:
                snapshot = find_in_hf_cache(model, self._hf_cache)
                if snapshot is None:
                    why = self._unavailable.get(model, "not configured and not in the local HF cache")
                    raise UnknownModelError(model, why)
                spec = str(snapshot)
            source = resolve_source(spec, self._hf_cache)
            key = str(source.tokenizer_json.resolve())
            with self._lock:
                lt = self._by_path.get(key)
            if lt is None:
                lt = load_tokenizer(source)
                log.info(
                    "loaded tokenizer for %s from %s (prefix reuse: %s)",
                    model,
                    source.tokenizer_json,
                    "on" if lt.splice.enabled else f"off, {lt.splice.reason}",
                )
            with self._lock:
                lt = self._by_path.setdefault(key, lt)
                self._loaded[model] = lt
            return lt

    # -- chat templates --------------------------------------------------------------------

    def _template_origin(self, model: str, lt: LoadedTokenizer) -> str:
        if model in self._template_overrides:
            return "configured"
        if lt.chat_templates:
            return lt.template_origin
        return f"built-in {lt.family}" if lt.family in BUILTIN_TEMPLATES else "none"

    def _template(self, model: str, lt: LoadedTokenizer, tools: list[Any] | None) -> str:
        override = self._template_overrides.get(model)
        if override is not None:
            cached = self._templates.get(model)
            if cached is None:
                cached = load_template_setting(override)
                self._templates[model] = cached
            return cached
        chosen = select_template(lt.chat_templates, tools)
        if chosen is not None:
            return chosen
        if lt.family in BUILTIN_TEMPLATES:
            return builtin_template(lt.family)
        raise TemplateError(
            f"model {model!r} has no chat template: its tokenizer ships none and no built-in "
            "template fits; configure one in chat_templates"
        )

    def render_chat(
        self,
        model: str,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
        tools: list[Any] | None = None,
        documents: list[Any] | None = None,
        continue_final_message: bool = False,
    ) -> str:
        """Render ``messages`` with the model's chat template exactly as vLLM would."""
        lt = self._tokenizer(model)
        template = self._template(model, lt, tools)
        self._count("chat_renders")
        return self._renderer.render(
            template,
            messages,
            special_tokens=lt.special_tokens,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=tools,
            documents=documents,
            chat_template_kwargs=chat_template_kwargs,
        )

    # -- tokenization ----------------------------------------------------------------------

    def tokenize(self, model: str, text: str, *, add_special_tokens: bool = True) -> Tokenized:
        """Token ids of a completion prompt (``add_special_tokens=True`` adds BOS, as vLLM)."""
        self._check_open()
        if not isinstance(text, str):
            raise TokenizationError("prompt text must be a string")
        self.limits.check_text(len(text))
        lt = self._tokenizer(model)
        self._count("tokenize_calls")
        return self._tokenize(lt, text, add_special_tokens)

    def tokenize_chat(self, model: str, messages: Messages, **render_kwargs: Any) -> Tokenized:
        """Render the chat, then tokenize without adding special tokens (the template has BOS).
        ``messages`` may be a callable returning them (called here, on this thread)."""
        msgs = materialize(messages)
        self.limits.check_messages(len(msgs))
        self.limits.check_chat_content(msgs)
        text = self.render_chat(model, msgs, **render_kwargs)
        self.limits.check_text(len(text), "rendered chat characters")
        return self.tokenize(model, text, add_special_tokens=False)

    async def atokenize(self, model: str, text: str, *, add_special_tokens: bool = True) -> Tokenized:
        self._check_open()
        self.limits.check_text(len(text) if isinstance(text, str) else 0)
        hit = self._inline_hit(model, text, add_special_tokens)
        if hit is not None:
            return hit
        return await self._offload(partial(self.tokenize, model, text, add_special_tokens=add_special_tokens))

    async def atokenize_chat(self, model: str, messages: Messages, **render_kwargs: Any) -> Tokenized:
        return await self._offload(partial(self.tokenize_chat, model, messages, **render_kwargs))

    async def _offload(self, fn: Callable[[], Tokenized]) -> Tokenized:
        self._check_open()
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def _wrap(self, lt: LoadedTokenizer, ids: list[int], add_special_tokens: bool) -> list[int]:
        if add_special_tokens and (lt.prefix_specials or lt.suffix_specials):
            return [*lt.prefix_specials, *ids, *lt.suffix_specials]
        return ids

    def _tokenize(self, lt: LoadedTokenizer, text: str, add_special_tokens: bool) -> Tokenized:
        store = self._store
        if not store.enabled or (add_special_tokens and not lt.wraps_specials):
            self._count("prefix_store_bypassed")
            self._count("tokenized_chars", len(text))
            return Tokenized(lt.encode_ids(text, add_special_tokens), False, 0, True)
        lookup = store.lookup(lt.namespace, text)
        if lookup.exact:
            assert lookup.entry is not None
            return self._hit(lt, lookup.entry.ids, add_special_tokens)
        if self.mode == "fast":
            cut = self._cut(lt, lookup)
            if len(text) - (cut.pos if cut else 0) > self._fast_sync_chars:
                known = lookup.entry.ids[: cut.tokens].tolist() if cut and lookup.entry else []
                self._count("partial_answers")
                self._count("cached_tokens", len(known))
                self._schedule_fill(lt, lookup)
                return Tokenized(
                    self._wrap_partial(lt, known, add_special_tokens),
                    bool(known),
                    len(known),
                    False,
                )
        ids, reused = self._exact(lt, lookup)
        self._count("cached_tokens", reused)
        return Tokenized(self._wrap(lt, ids.tolist(), add_special_tokens), reused > 0, reused, True)

    def _hit(self, lt: LoadedTokenizer, cached: array[int], add_special_tokens: bool) -> Tokenized:
        ids = cached.tolist()
        with self._lock:
            counts = self._counts
            counts["prefix_store_hits"] += 1
            counts["prefix_store_exact_hits"] += 1
            counts["cached_tokens"] += len(ids)
        return Tokenized(self._wrap(lt, ids, add_special_tokens), bool(ids), len(ids), True)

    def _inline_hit(self, model: str, text: object, add_special_tokens: bool) -> Tokenized | None:
        """An exact store hit answered on the caller's thread (a dict look-up, no hop)."""
        lt = self._loaded.get(model) if isinstance(model, str) else None
        if lt is None or not isinstance(text, str) or len(text) > _INLINE_HIT_MAX_CHARS:
            return None
        if add_special_tokens and not lt.wraps_specials:
            return None
        entry = self._store.get(lt.namespace, text)
        if entry is None:
            return None
        self._count("tokenize_calls")
        return self._hit(lt, entry.ids, add_special_tokens)

    def _wrap_partial(self, lt: LoadedTokenizer, ids: list[int], add_special_tokens: bool) -> list[int]:
        # A partial answer must stay a prefix of the exact answer: no suffix specials.
        if add_special_tokens and lt.prefix_specials:
            return [*lt.prefix_specials, *ids]
        return ids

    @staticmethod
    def _cut(lt: LoadedTokenizer, lookup: Lookup) -> Cut | None:
        entry = lookup.entry
        if entry is None or not lt.splice.enabled:
            return None
        return lt.splice.find_cut(lookup.text, lookup.common, entry, lt.entry_starts(entry))

    def _miss(self, lt: LoadedTokenizer, lookup: Lookup) -> tuple[array[int], int]:
        self._count("prefix_store_misses")
        self._count("tokenized_chars", len(lookup.text))
        ids = lt.encode(lookup.text)
        self._store.insert(lookup, ids)
        return ids, 0

    def _exact(self, lt: LoadedTokenizer, lookup: Lookup) -> tuple[array[int], int]:
        """Exact content tokens for ``lookup.text``, reusing the store; fills the store."""
        text, entry = lookup.text, lookup.entry
        if entry is not None and lookup.exact:
            return entry.ids, len(entry.ids)
        cut = self._cut(lt, lookup)
        if cut is None or entry is None:
            return self._miss(lt, lookup)
        # Re-tokenize from the safe cut before the chosen one (if near) and check that the
        # overlap re-aligns with the cached tokens: the cut rules guarantee it, this is a
        # cheap guard against a tokenizer that breaks their assumptions.
        starts = lt.entry_starts(entry)
        check = lt.splice.find_cut(text, cut.pos - 1, entry, starts)
        start = check if check is not None and cut.pos - check.pos <= 1024 else cut
        tail_ids = lt.encode(text[start.pos :])
        overlap = cut.tokens - start.tokens
        if tail_ids[:overlap] != entry.ids[start.tokens : cut.tokens]:
            self._count("prefix_store_realign_failures")
            log.warning("prefix store re-alignment failed; falling back to full tokenization")
            return self._miss(lt, lookup)
        self._count("prefix_store_hits")
        self._count("tokenized_chars", len(text) - start.pos)
        ids = entry.ids[: start.tokens]
        ids.extend(tail_ids)
        new_starts = starts[: start.tokens]
        shift = start.byte
        new_starts.extend(b + shift for b in lt.byte_starts(tail_ids))
        self._store.insert(lookup, ids, new_starts)
        return ids, start.tokens

    # -- fast mode background fills --------------------------------------------------------

    def _schedule_fill(self, lt: LoadedTokenizer, lookup: Lookup) -> None:
        key = (lt.namespace, lookup.text)
        with self._lock:
            if self._closed or key in self._inflight:
                return
            if self._background is None:
                workers = max(1, (self._max_workers + 1) // 2)
                self._background = ThreadPoolExecutor(workers, thread_name_prefix="kvindex-tokenize-bg")
            future = self._background.submit(self._fill, lt, lookup)
            self._inflight[key] = future
        future.add_done_callback(lambda _f: self._fill_done(key))

    def _fill(self, lt: LoadedTokenizer, lookup: Lookup) -> None:
        try:
            # Look up again: the store may have grown since the partial answer.
            fresh = self._store.lookup(lt.namespace, lookup.text)
            self._exact(lt, fresh)
            self._count("background_fills")
        except Exception:  # a background task must not die silently
            self._count("background_errors")
            log.exception("background tokenization failed")

    def _fill_done(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._inflight.pop(key, None)

    def wait_background(self, timeout: float | None = None) -> bool:
        """Wait until the background fills started so far are done (fast mode)."""
        with self._lock:
            pending = list(self._inflight.values())
        for future in pending:
            try:
                future.result(timeout)
            except TimeoutError:
                return False
        return True

    # -- stats and lifecycle ---------------------------------------------------------------

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def stats(self) -> dict[str, float]:
        with self._lock:
            out: dict[str, float] = {k: float(v) for k, v in self._counts.items()}
            inflight = len(self._inflight)
        hits, misses = out["prefix_store_hits"], out["prefix_store_misses"]
        out["prefix_store_hit_ratio"] = hits / (hits + misses) if hits + misses else 0.0
        out["prefix_store_chars"] = float(self._store.chars)
        out["prefix_store_tokens"] = float(self._store.tokens)
        out["prefix_store_capacity_chars"] = float(self._store.max_chars)
        out["prefix_store_evictions"] = float(self._store.evictions)
        out["cached_entries"] = float(len(self._store))
        out["background_pending"] = float(inflight)
        out["models_loaded"] = float(len(self._loaded))
        out["tokenizers_loaded"] = float(len(self._by_path))
        return out

    def clear_prefix_store(self) -> None:
        self._store.clear()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("TokenizerPool is closed")

    def close(self) -> None:
        """Stop the worker threads; pending background fills are dropped."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            background = self._background
        self._executor.shutdown(wait=False, cancel_futures=True)
        if background is not None:
            background.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> TokenizerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
