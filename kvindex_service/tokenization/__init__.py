"""Tokenization for routing: offline HF tokenizers, vLLM-exact chat templates, prefix store.

The public surface is :class:`TokenizerPool` and its result type :class:`Tokenized`; errors
are :class:`TokenizationError` (a ``ValueError``) and its subclasses.
"""

from kvindex_service.tokenization.errors import (
    InputTooLargeError,
    TemplateError,
    TokenizationError,
    TokenizerLoadError,
    UnknownModelError,
)
from kvindex_service.tokenization.loader import find_llama3_tokenizer_dir, hf_hub_cache_dir
from kvindex_service.tokenization.pool import MODES, Tokenized, TokenizerPool

__all__ = [
    "MODES",
    "InputTooLargeError",
    "TemplateError",
    "TokenizationError",
    "Tokenized",
    "TokenizerLoadError",
    "TokenizerPool",
    "UnknownModelError",
    "find_llama3_tokenizer_dir",
    "hf_hub_cache_dir",
]
