"""OpenAI request bodies -> what the scorer needs (model plus prompt, messages or token ids).

Only two paths carry a prompt worth scoring: ``/v1/completions`` and
``/v1/chat/completions``. Everything else is routed without a KV score.

* ``/v1/completions``: ``prompt`` may be a string, a list of strings (a batch), a list of
  token ids, or a list of token-id lists. A batch is routed as one request (Envoy sends it
  to one pod), so it is scored by its first element: the element vLLM prefills first, and
  in practice batch elements share their system prefix.
* ``/v1/chat/completions``: ``messages`` are passed through untouched; the scoring service
  renders them with the model's chat template exactly as vLLM would, so the picker never
  needs a tokenizer.

Malformed bodies raise :class:`BadRequest` (mapped to an immediate 400 by the server).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

__all__ = ["CHAT_PATH", "COMPLETIONS_PATH", "BadRequest", "PromptQuery", "is_scored_path", "parse_body"]

COMPLETIONS_PATH = "/v1/completions"
CHAT_PATH = "/v1/chat/completions"
_SCORED = frozenset({COMPLETIONS_PATH, CHAT_PATH})

#: Chat rendering options vLLM honours; forwarded to the scorer when the request has them.
CHAT_OPTIONS = ("add_generation_prompt", "continue_final_message", "chat_template_kwargs", "tools")


class BadRequest(ValueError):
    """The body of an OpenAI request cannot be used; ``status`` is the HTTP answer."""

    status = 400

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class PromptQuery:
    """One prompt to score. Exactly one of ``prompt``, ``messages``, ``token_ids`` is set."""

    model: str
    prompt: str | None = None
    messages: list[Any] | None = None
    token_ids: list[int] | None = None
    chat_options: dict[str, Any] | None = None
    cache_salt: str | None = None
    """vLLM's per-request ``cache_salt``: salted prompts only match blocks with that salt."""


def route_path(path: str) -> str:
    """``:path`` without query string or fragment."""
    for sep in ("?", "#"):
        cut = path.find(sep)
        if cut >= 0:
            path = path[:cut]
    return path


def is_scored_path(path: str) -> bool:
    return route_path(path) in _SCORED


def _is_token_list(value: list[Any]) -> bool:
    return all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)


def _completion_prompt(model: str, prompt: Any) -> PromptQuery:
    if isinstance(prompt, str):
        return PromptQuery(model=model, prompt=prompt)
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, str):
            if not all(isinstance(p, str) for p in prompt):
                raise BadRequest("'prompt' mixes strings and other values")
            return PromptQuery(model=model, prompt=first)
        if isinstance(first, list):
            if not all(isinstance(p, list) and _is_token_list(p) for p in prompt):
                raise BadRequest("'prompt' must be a list of token-id lists")
            return PromptQuery(model=model, token_ids=list(first))
        if _is_token_list(prompt):
            return PromptQuery(model=model, token_ids=list(prompt))
    raise BadRequest("'prompt' must be a string, a list of strings or a list of token ids")


def parse_body(path: str, body: bytes) -> PromptQuery:
    """Parse the body of a request to one of the scored paths."""
    route = route_path(path)
    if not body:
        raise BadRequest(f"{route}: empty request body")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(f"{route}: body is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BadRequest(f"{route}: body must be a JSON object")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest(f"{route}: missing 'model'")
    salt = data.get("cache_salt")
    if salt is not None and not isinstance(salt, str):
        raise BadRequest(f"{route}: 'cache_salt' must be a string")
    if route == COMPLETIONS_PATH:
        if "prompt" not in data:
            raise BadRequest(f"{route}: missing 'prompt'")
        query = _completion_prompt(model, data["prompt"])
        return replace(query, cache_salt=salt) if salt else query
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest(f"{route}: 'messages' must be a non-empty list")
    if not all(isinstance(m, dict) for m in messages):
        raise BadRequest(f"{route}: every message must be an object")
    options = {k: data[k] for k in CHAT_OPTIONS if k in data}
    return PromptQuery(model=model, messages=messages, chat_options=options or None, cache_salt=salt or None)
