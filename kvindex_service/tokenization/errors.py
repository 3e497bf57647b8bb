"""Exceptions raised by the tokenization layer.

Every class subclasses :class:`ValueError` (through :class:`TokenizationError`) so that a
transport maps all of them to a client error in one place; :class:`UnknownModelError` is
also a :class:`LookupError` for callers that want to answer 404.
"""

from __future__ import annotations

__all__ = [
    "InputTooLargeError",
    "TemplateError",
    "TokenizationError",
    "TokenizerLoadError",
    "UnknownModelError",
]


class TokenizationError(ValueError):
    """A prompt could not be rendered or tokenized (bad template, bad messages, encode failure)."""


class UnknownModelError(TokenizationError, LookupError):
    """No tokenizer is configured for the model and none is in the local Hugging Face cache."""

    def __init__(self, model: str, detail: str = "") -> None:
        self.model = model
        msg = f"no tokenizer for model {model!r}"
        super().__init__(f"{msg}: {detail}" if detail else msg)


class TokenizerLoadError(TokenizationError):
    """A configured tokenizer source exists in the configuration but cannot be loaded."""


class TemplateError(TokenizationError):
    """A chat template failed to compile or render, or called ``raise_exception``."""


class InputTooLargeError(TokenizationError):
    """A prompt or chat is over a configured limit (``setting``); transports answer 413."""

    def __init__(self, what: str, size: int, setting: str, limit: int) -> None:
        self.setting = setting
        self.limit = limit
        self.size = size
        super().__init__(f"{what}: {size} exceeds the limit {setting}={limit}")
