"""Chat-template rendering that matches vLLM (which renders with HF transformers' rules).

What vLLM does for ``/v1/chat/completions`` on a text-only model, reproduced here:

* Messages are normalized first: text parts of list content are joined with ``"\\n"`` when
  the template expects string content, or kept as ``{"type": "text", "text": ...}`` parts
  (a string becomes one part) when the template loops over ``message.content`` -- the
  "auto" content-format detection, done on the template's syntax tree. ``None`` content is
  the empty string. Only ``role``, ``content``, ``name``, assistant ``tool_calls`` (with JSON
  ``arguments`` parsed to a dict) and ``reasoning``, and tool ``tool_call_id`` are kept.
* The template runs in ``jinja2.sandbox.ImmutableSandboxedEnvironment`` with
  ``trim_blocks``, ``lstrip_blocks``, the ``loopcontrols`` extension, a
  ``{% generation %}`` block tag, the ``raise_exception`` and ``strftime_now`` globals and a
  ``tojson`` filter that keeps non-ASCII characters. Variables: ``messages``, ``tools``,
  ``documents``, ``add_generation_prompt``, the tokenizer's special tokens (``bos_token``,
  ``eos_token``, ...), then the caller's ``chat_template_kwargs``.
* ``continue_final_message`` cuts the rendering right after the final message's text.
"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kvindex_service.tokenization.errors import TemplateError, TokenizationError

__all__ = [
    "BUILTIN_TEMPLATES",
    "ChatRenderer",
    "ContentFormat",
    "builtin_template",
    "detect_content_format",
    "load_template_setting",
    "normalize_messages",
    "select_template",
]

ContentFormat = Literal["string", "openai"]

#: Built-in templates by family name (files in ``templates/``).
BUILTIN_TEMPLATES: tuple[str, ...] = ("llama3",)

_TEXT_PART_FIELDS = {
    "text": "text",
    "input_text": "text",
    "output_text": "text",
    "refusal": "refusal",
    "thinking": "thinking",
}
_RESERVED_KWARGS = frozenset({"messages", "chat_template", "tokenize"})


@cache
def builtin_template(name: str) -> str:
    """Text of a built-in template (``templates/<name>.jinja``)."""
    if name not in BUILTIN_TEMPLATES:
        raise TemplateError(f"unknown built-in chat template {name!r}")
    path = resources.files("kvindex_service.tokenization") / "templates" / f"{name}.jinja"
    return path.read_text(encoding="utf-8")


def select_template(templates: Mapping[str, str], tools: Sequence[Any] | None) -> str | None:
    """HF's choice among named templates: ``tool_use`` when tools are given, else ``default``."""
    if not templates:
        return None
    if len(templates) == 1 and "default" in templates:
        return templates["default"]
    if tools is not None and "tool_use" in templates:
        return templates["tool_use"]
    if "default" in templates:
        return templates["default"]
    raise TemplateError(
        "the tokenizer has several named chat templates and none is called 'default': " + ", ".join(sorted(templates))
    )


# -- jinja environment ---------------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (HF's assistant-mask marker) renders its body."""

    tags = {"generation"}  # noqa: RUF012 (jinja2 declares it a plain class attribute)

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise TemplateError(str(message))


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _make_environment(clock: Callable[[], datetime]) -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: clock().strftime(fmt)
    return env


# -- content format detection --------------------------------------------------------------


def _is_content_access(node: jinja2.nodes.Node, names: set[str]) -> bool:
    """``x.content`` / ``x['content']`` or a variable previously bound to one."""
    if isinstance(node, jinja2.nodes.Getattr):
        return node.attr == "content"
    if isinstance(node, jinja2.nodes.Getitem):
        arg = node.arg
        return isinstance(arg, jinja2.nodes.Const) and arg.value == "content"
    if isinstance(node, jinja2.nodes.Name):
        return node.name in names
    if isinstance(node, jinja2.nodes.Filter):  # e.g. message.content | selectattr(...)
        return node.node is not None and _is_content_access(node.node, names)
    return False


def detect_content_format(template: str) -> ContentFormat:
    """ "openai" when the template iterates over a message's content, else "string"."""
    try:
        ast = jinja2.Environment(extensions=[_GenerationTag, jinja2.ext.loopcontrols]).parse(template)
    except jinja2.TemplateSyntaxError:
        return "string"
    bound: set[str] = set()
    for assign in ast.find_all(jinja2.nodes.Assign):
        if isinstance(assign.target, jinja2.nodes.Name) and _is_content_access(assign.node, bound):
            bound.add(assign.target.name)
    for loop in ast.find_all(jinja2.nodes.For):
        if _is_content_access(loop.iter, bound):
            return "openai"
    return "string"


# -- message normalization -----------------------------------------------------------------


def _part_text(part: Any) -> str | None:
    if isinstance(part, str):
        return part
    if not isinstance(part, Mapping):
        raise TokenizationError(f"content part must be an object or a string, not {part!r}")
    kind = part.get("type")
    field = _TEXT_PART_FIELDS.get(kind) if isinstance(kind, str) else None
    if field is None:
        raise TokenizationError(f"unsupported content part type {kind!r}: only text parts can be tokenized here")
    text = part.get(field)
    if text is not None and not isinstance(text, str):
        raise TokenizationError(f"content part {kind!r} needs a string {field!r}")
    return text


def _content_texts(content: Any) -> list[str]:
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if isinstance(content, Sequence):
        return [t for t in map(_part_text, content) if t is not None]
    raise TokenizationError("message content must be a string, a list of parts or null")


def _parse_tool_calls(tool_calls: Any) -> list[Any] | None:
    if tool_calls is None:
        return None
    if not isinstance(tool_calls, list):
        raise TokenizationError("tool_calls must be a list")
    calls = copy.deepcopy(tool_calls)
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise TokenizationError("each tool call needs a 'function' object")
        args = function.get("arguments")
        if isinstance(args, str):
            try:
                function["arguments"] = json.loads(args)
            except ValueError:
                function["arguments"] = {}
        elif not isinstance(args, (dict, list)):
            function["arguments"] = {}
    return calls


def normalize_messages(messages: Sequence[Mapping[str, Any]], content_format: ContentFormat) -> list[dict[str, Any]]:
    """Copy ``messages`` into the form vLLM hands to the template (see module docstring)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TokenizationError("messages must be a list of message objects")
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TokenizationError(f"messages[{i}] must be an object")
        role = message.get("role")
        if not isinstance(role, str):
            raise TokenizationError(f"messages[{i}] needs a string 'role'")
        texts = _content_texts(message.get("content"))
        content: Any
        if content_format == "openai":
            content = [{"type": "text", "text": t} for t in texts]
        else:
            content = "\n".join(texts)
        if role == "tool" and isinstance(content, list):
            content = "\n".join(texts)  # vLLM flattens text-only tool results for templates
        msg: dict[str, Any] = {"role": role, "content": content}
        if role == "assistant":
            calls = _parse_tool_calls(message.get("tool_calls"))
            if calls:
                msg["tool_calls"] = calls
            reasoning = message.get("reasoning")
            if isinstance(reasoning, str):
                msg["reasoning"] = reasoning
                msg["reasoning_content"] = reasoning
        elif role == "tool" and "tool_call_id" in message:
            msg["tool_call_id"] = message["tool_call_id"]
        elif role == "developer":
            msg["tools"] = copy.deepcopy(message.get("tools"))
        if isinstance(message.get("name"), str):
            msg["name"] = message["name"]
        out.append(msg)
    return out


def _final_text(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):
        for part in reversed(content):
            text = part.get("text") if isinstance(part, Mapping) else None
            if isinstance(text, str):
                return text
        raise TemplateError("continue_final_message: the final message has no text to continue")
    return content if isinstance(content, str) else ""


# -- renderer ------------------------------------------------------------------------------


class ChatRenderer:
    """Compiles and renders chat templates; compiled templates are cached by their text."""

    def __init__(self, clock: Callable[[], datetime] | None = None) -> None:
        self._env = _make_environment(clock or datetime.now)
        self._compiled: dict[str, tuple[jinja2.Template, ContentFormat]] = {}
        self._lock = threading.Lock()

    def compile(self, template: str) -> tuple[jinja2.Template, ContentFormat]:
        cached = self._compiled.get(template)
        if cached is not None:
            return cached
        try:
            compiled = self._env.from_string(template)
        except jinja2.TemplateError as exc:
            raise TemplateError(f"chat template does not compile: {exc}") from exc
        entry = (compiled, detect_content_format(template))
        with self._lock:
            self._compiled.setdefault(template, entry)
        return entry

    def render(
        self,
        template: str,
        messages: Sequence[Mapping[str, Any]],
        *,
        special_tokens: Mapping[str, Any] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[Any] | None = None,
        documents: list[Any] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        compiled, content_format = self.compile(template)
        conversation = normalize_messages(messages, content_format)
        variables: dict[str, Any] = dict(special_tokens or {})
        variables.update(tools=tools, documents=documents, add_generation_prompt=add_generation_prompt)
        if chat_template_kwargs:
            reserved = _RESERVED_KWARGS.intersection(chat_template_kwargs)
            if reserved:
                raise TokenizationError(f"chat_template_kwargs may not set {', '.join(sorted(reserved))}")
            variables.update(chat_template_kwargs)
        continue_final_message = bool(variables.pop("continue_final_message", continue_final_message))
        if continue_final_message and variables["add_generation_prompt"]:
            raise TokenizationError("continue_final_message and add_generation_prompt cannot both be true")
        if continue_final_message and not conversation:
            raise TokenizationError("continue_final_message needs at least one message")
        try:
            rendered = compiled.render(messages=conversation, **variables)
        except TokenizationError:
            raise
        except jinja2.TemplateError as exc:
            raise TemplateError(f"chat template failed: {exc}") from exc
        except (TypeError, ValueError, LookupError, AttributeError, ArithmeticError) as exc:
            raise TemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from exc
        if continue_final_message:
            rendered = _cut_after_final(rendered, _final_text(conversation[-1]))
        return rendered


def _cut_after_final(rendered: str, final: str) -> str:
    """HF's continue_final_message: keep the rendering up to the end of the final text."""
    stripped = final.strip()
    loc = rendered.rfind(stripped)
    if loc < 0:
        raise TemplateError("continue_final_message: the final message does not appear in the rendered chat")
    if rendered[loc : loc + len(final.lstrip())] == final:
        return rendered[: loc + len(final.lstrip())]
    return rendered[: loc + len(stripped)]


def load_template_setting(value: str) -> str:
    """A configured template: a built-in name, a file path or the template text itself."""
    if value in BUILTIN_TEMPLATES:
        return builtin_template(value)
    if any(c in value for c in "{}\n"):
        return value
    path = Path(value).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TemplateError(f"chat template {value!r} is not a file: {exc}") from exc
