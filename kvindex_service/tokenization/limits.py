"""Size limits on what one request may ask the tokenizer pool to render and tokenize.

Rendering a chat and tokenizing it run in worker threads, off the event loop, but they are
still CPU work proportional to the input: the limits bound it per request. Over a limit the
pool raises :class:`~kvindex_service.tokenization.errors.InputTooLargeError` naming the
setting, before any work is done (for chats, the rendered text is checked again before it
is tokenized, since a template can make it longer than its messages).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kvindex_service.tokenization.errors import InputTooLargeError

__all__ = ["Limits", "Messages", "materialize"]

#: Chat messages as a list, or a zero-argument callable that builds them (so a caller can
#: have the conversion to plain dicts done in the worker thread too).
Messages = Sequence[dict[str, Any]] | Callable[[], Sequence[dict[str, Any]]]


@dataclass(frozen=True, slots=True)
class Limits:
    """``None`` disables a limit."""

    max_messages: int | None = None
    max_prompt_chars: int | None = None

    def check_messages(self, count: int) -> None:
        if self.max_messages is not None and count > self.max_messages:
            raise InputTooLargeError("chat messages", count, "tokenizers.max_messages", self.max_messages)

    def check_text(self, chars: int, what: str = "prompt characters") -> None:
        if self.max_prompt_chars is not None and chars > self.max_prompt_chars:
            raise InputTooLargeError(what, chars, "tokenizers.max_prompt_chars", self.max_prompt_chars)

    def check_chat_content(self, messages: Sequence[Any]) -> None:
        """Cheap pre-render bound: the string contents alone must fit the character limit."""
        if self.max_prompt_chars is None:
            return
        total = 0
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else getattr(m, "content", None)
            if isinstance(content, str):
                total += len(content)
        self.check_text(total, "chat content characters")


def materialize(messages: Messages) -> list[dict[str, Any]]:
    """The messages as a list (calling the builder if given one)."""
    return list(messages() if callable(messages) else messages)
