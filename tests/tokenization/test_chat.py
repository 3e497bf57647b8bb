"""Chat templates: the built-in Llama 3.x format to the character, template resolution, and
the HF/vLLM rendering rules (sandbox, globals, filters, content flattening)."""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

from kvindex_service.tokenization import TemplateError, TokenizationError, TokenizerPool
from tests.tokenization.conftest import MODEL

SYSTEM_USER_ASSISTANT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
]

EXPECTED_HISTORY = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    "Cutting Knowledge Date: December 2023\n"
    "Today Date: 26 Jul 2024\n\n"
    "You are a helpful assistant.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n"
    "What is the capital of France?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
    "The capital of France is Paris.<|eot_id|>"
)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


# -- the built-in Llama 3.x template -------------------------------------------------------


def test_llama3_with_generation_prompt(pool: TokenizerPool) -> None:
    rendered = pool.render_chat(MODEL, SYSTEM_USER_ASSISTANT)
    assert rendered == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\n"
        "You are a helpful assistant.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n"
        "What is the capital of France?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        "The capital of France is Paris.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_llama3_without_generation_prompt(pool: TokenizerPool) -> None:
    rendered = pool.render_chat(MODEL, SYSTEM_USER_ASSISTANT, add_generation_prompt=False)
    assert rendered == EXPECTED_HISTORY


def test_llama3_without_system_message_and_content_is_stripped(pool: TokenizerPool) -> None:
    messages = [{"role": "user", "content": "  \n Hi there!\n\n "}]
    assert pool.render_chat(MODEL, messages) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\n"
        "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "Hi there!<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_date_comes_from_strftime_now_or_date_string(llama3_dir: Path) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    with TokenizerPool({"m": str(llama3_dir)}, clock=lambda: datetime(2025, 3, 9)) as pool:
        assert "Today Date: 09 Mar 2025\n\n" in pool.render_chat("m", messages)
        kwargs = {"date_string": "01 Jan 2030"}
        rendered = pool.render_chat("m", messages, chat_template_kwargs=kwargs)
        assert "Today Date: 01 Jan 2030\n\n" in rendered
    with TokenizerPool({"m": str(llama3_dir)}) as pool:  # the real clock
        before = datetime.now().strftime("%d %b %Y")
        rendered = pool.render_chat("m", messages)
        after = datetime.now().strftime("%d %b %Y")
        assert f"Today Date: {before}\n" in rendered or f"Today Date: {after}\n" in rendered


def test_text_parts_are_joined_with_newlines(pool: TokenizerPool) -> None:
    parts = [
        {"type": "text", "text": "First part."},
        "bare string",
        {"type": "text", "text": "Last"},
    ]
    plain = [{"role": "user", "content": "First part.\nbare string\nLast"}]
    assert pool.render_chat(MODEL, [{"role": "user", "content": parts}]) == pool.render_chat(MODEL, plain)
    # None content renders as empty text.
    rendered = pool.render_chat(MODEL, [{"role": "user", "content": None}])
    assert "<|start_header_id|>user<|end_header_id|>\n\n<|eot_id|>" in rendered


def test_tools_in_first_user_message_tool_call_and_result(pool: TokenizerPool) -> None:
    messages = [
        {"role": "user", "content": "Weather in Zürich?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call-1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call-1", "content": '{"temp": 21}'},
    ]
    spec = (
        "{\n"
        '    "type": "function",\n'
        '    "function": {\n'
        '        "name": "get_weather",\n'
        '        "description": "Weather in a city",\n'
        '        "parameters": {\n'
        '            "type": "object",\n'
        '            "properties": {\n'
        '                "city": {\n'
        '                    "type": "string"\n'
        "                }\n"
        "            },\n"
        '            "required": [\n'
        '                "city"\n'
        "            ]\n"
        "        }\n"
        "    }\n"
        "}"
    )
    assert pool.render_chat(MODEL, messages, tools=TOOLS) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Environment: ipython\n"
        "Cutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\n"
        "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "Given the following functions, please respond with a JSON for a function call with "
        "its proper arguments that best answers the given prompt.\n\n"
        'Respond in the format {"name": function name, "parameters": dictionary of argument '
        "name and its value}.Do not use variables.\n\n" + spec + "\n\n"
        "Weather in Zürich?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        '{"name": "get_weather", "parameters": {"city": "Zürich"}}<|eot_id|>'
        "<|start_header_id|>ipython<|end_header_id|>\n\n"
        '"{\\"temp\\": 21}"<|eot_id|>'
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_tools_in_system_message(pool: TokenizerPool) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = pool.render_chat(MODEL, messages, tools=TOOLS, chat_template_kwargs={"tools_in_user_message": False})
    assert rendered.startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Environment: ipython\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
        "You have access to the following functions. To call a function, please respond with "
        'JSON for a function call.Respond in the format {"name": function name, "parameters": '
        "dictionary of argument name and its value}.Do not use variables.\n\n{\n"
    )
    assert rendered.endswith(
        "}\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_two_tool_calls_raise_template_error(pool: TokenizerPool) -> None:
    call = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [call, call]}]
    with pytest.raises(TemplateError, match="one tool call"):
        pool.render_chat(MODEL, messages)


def test_chat_tokens_have_one_bos(pool: TokenizerPool, reference) -> None:
    got = pool.tokenize_chat(MODEL, SYSTEM_USER_ASSISTANT, add_generation_prompt=False)
    assert got.token_ids == reference(EXPECTED_HISTORY, add_special_tokens=False)
    assert got.token_ids[:2] == [128000, 128006] and got.token_ids.count(128000) == 1
    assert got.token_ids[-1] == 128009  # <|eot_id|>


def test_continue_final_message(pool: TokenizerPool) -> None:
    messages = [*SYSTEM_USER_ASSISTANT[:2], {"role": "assistant", "content": "The capital is "}]
    rendered = pool.render_chat(MODEL, messages, add_generation_prompt=False, continue_final_message=True)
    assert rendered.endswith("<|start_header_id|>assistant<|end_header_id|>\n\nThe capital is")
    with pytest.raises(TokenizationError):
        pool.render_chat(MODEL, messages, continue_final_message=True)


# -- message validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "messages",
    [
        "not a list",
        [{"content": "no role"}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        [{"role": "user", "content": 42}],
        ["not a dict"],
    ],
)
def test_bad_messages_are_tokenization_errors(pool: TokenizerPool, messages) -> None:
    with pytest.raises(TokenizationError):
        pool.render_chat(MODEL, messages)


def test_reserved_kwargs_are_rejected(pool: TokenizerPool) -> None:
    with pytest.raises(TokenizationError):
        pool.render_chat(MODEL, [], chat_template_kwargs={"messages": []})


# -- template resolution -------------------------------------------------------------------


def _tokenizer_dir(tmp_path: Path, llama3_dir: Path, config: dict | None = None) -> Path:
    target = tmp_path / "tok"
    target.mkdir()
    (target / "tokenizer.json").symlink_to(llama3_dir / "tokenizer.json")
    base = json.loads((llama3_dir / "tokenizer_config.json").read_text())
    base.update(config or {})
    (target / "tokenizer_config.json").write_text(json.dumps(base))
    return target


SIMPLE = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"


def test_template_from_tokenizer_config_string(tmp_path: Path, llama3_dir: Path) -> None:
    src = _tokenizer_dir(tmp_path, llama3_dir, {"chat_template": SIMPLE})
    with TokenizerPool({"m": str(src)}) as pool:
        assert pool.render_chat("m", SYSTEM_USER_ASSISTANT[1:2]) == (
            "<|begin_of_text|>[user]What is the capital of France?"
        )
        assert pool.tokenizer_info("m")["chat_template"] == "tokenizer_config.json"


def test_template_list_default_wins_and_tool_use_with_tools(tmp_path: Path, llama3_dir: Path) -> None:
    templates = [
        {"name": "rag", "template": "RAG"},
        {"name": "default", "template": "DEFAULT"},
        {"name": "tool_use", "template": "TOOLS {{ tools | length }}"},
    ]
    src = _tokenizer_dir(tmp_path, llama3_dir, {"chat_template": templates})
    with TokenizerPool({"m": str(src)}) as pool:
        assert pool.render_chat("m", []) == "DEFAULT"
        assert pool.render_chat("m", [], tools=TOOLS) == "TOOLS 1"


def test_special_tokens_may_be_added_token_dicts(tmp_path: Path, llama3_dir: Path) -> None:
    config = {
        "chat_template": "{{ bos_token }}|{{ eos_token }}",
        "bos_token": {"content": "<|begin_of_text|>", "lstrip": False},
        "eos_token": {"content": "<|eot_id|>", "rstrip": False},
    }
    src = _tokenizer_dir(tmp_path, llama3_dir, config)
    with TokenizerPool({"m": str(src)}) as pool:
        assert pool.render_chat("m", []) == "<|begin_of_text|>|<|eot_id|>"


def test_chat_template_jinja_file_and_config_precedence(tmp_path: Path, llama3_dir: Path) -> None:
    src = _tokenizer_dir(tmp_path, llama3_dir)
    (src / "chat_template.jinja").write_text("FROM FILE {{ messages | length }}\n")
    with TokenizerPool({"m": str(src)}) as pool:
        assert pool.render_chat("m", [{"role": "user", "content": "x"}]) == "FROM FILE 1"
    config = json.loads((src / "tokenizer_config.json").read_text())
    config["chat_template"] = "FROM CONFIG"
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    with TokenizerPool({"m": str(src)}) as pool:
        assert pool.render_chat("m", []) == "FROM CONFIG"


def test_configured_templates_override(tmp_path: Path, llama3_dir: Path) -> None:
    src = _tokenizer_dir(tmp_path, llama3_dir, {"chat_template": "TOKENIZER"})
    path = tmp_path / "custom.jinja"
    path.write_text("CUSTOM {{ add_generation_prompt }}")
    sources = {"file": str(src), "inline": str(src), "builtin": str(src)}
    overrides = {"file": str(path), "inline": "INLINE {{ messages | length }}", "builtin": "llama3"}
    with TokenizerPool(sources, chat_templates=overrides) as pool:
        assert pool.render_chat("file", []) == "CUSTOM True"
        assert pool.render_chat("inline", [{"role": "user", "content": "a"}]) == "INLINE 1"
        assert pool.render_chat("builtin", []).startswith("<|begin_of_text|><|start_header_id|>")
    with TokenizerPool({"m": str(src)}, chat_templates={"m": "/does/not/exist.jinja"}) as pool:
        with pytest.raises(TemplateError):
            pool.render_chat("m", [])


def test_model_without_any_template(tmp_path: Path) -> None:
    tok = Tokenizer(WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    tok.save(str(tmp_path / "tokenizer.json"))
    with TokenizerPool({"tiny": str(tmp_path)}) as pool:
        with pytest.raises(TemplateError, match="no chat template"):
            pool.render_chat("tiny", [{"role": "user", "content": "hello"}])
        # Plain prompts still work, and the store stays off for an unproven tokenizer.
        assert pool.tokenize("tiny", "hello").token_ids == [1]
        assert pool.tokenizer_info("tiny")["prefix_store_reuse"] is False


# -- rendering rules -----------------------------------------------------------------------


def _render(tmp_path: Path, llama3_dir: Path, template: str, messages, **kwargs) -> str:
    src = tmp_path / "t"
    if not src.exists():
        src.mkdir()
        (src / "tokenizer.json").symlink_to(llama3_dir / "tokenizer.json")
        shutil.copy(llama3_dir / "tokenizer_config.json", src / "tokenizer_config.json")
    with TokenizerPool({"m": str(src)}, chat_templates={"m": template}) as pool:
        return pool.render_chat("m", messages, **kwargs)


def test_raise_exception_is_a_template_error(tmp_path: Path, llama3_dir: Path) -> None:
    with pytest.raises(TemplateError, match="roles must alternate") as info:
        _render(tmp_path, llama3_dir, "{{ raise_exception('roles must alternate') }}", [])
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "template",
    [
        "{% for x in %}",  # syntax error
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",  # sandbox
        "{{ messages.append(1) }}",  # immutable sandbox
        "{{ 1 / 0 }}",
    ],
)
def test_broken_or_unsafe_templates(tmp_path: Path, llama3_dir: Path, template: str) -> None:
    with pytest.raises(TemplateError):
        _render(tmp_path, llama3_dir, template, [])


def test_tojson_keeps_non_ascii_and_takes_arguments(tmp_path: Path, llama3_dir: Path) -> None:
    template = "{{ messages[0]['content'] | tojson }} {{ {'b': 1, 'a': [1]} | tojson(sort_keys=true) }}"
    rendered = _render(tmp_path, llama3_dir, template, [{"role": "user", "content": "café <b>"}])
    assert rendered == '"café <b>" {"a": [1], "b": 1}'


def test_loopcontrols_trim_blocks_and_generation_tag(tmp_path: Path, llama3_dir: Path) -> None:
    template = (
        "{% for m in messages %}\n"
        "    {% if loop.index > 2 %}{% break %}{% endif %}\n"
        "    {% generation %}{{ m['content'] }};{% endgeneration %}\n"
        "{% endfor %}"
    )
    msgs = [{"role": "user", "content": c} for c in "abc"]
    # trim_blocks drops the newline after every block tag, lstrip_blocks the indentation.
    assert _render(tmp_path, llama3_dir, template, msgs) == "a;b;"


def test_openai_content_format_keeps_parts(tmp_path: Path, llama3_dir: Path) -> None:
    template = (
        "{% for m in messages %}{% for part in m['content'] %}"
        "<{{ part['type'] }}:{{ part['text'] }}>{% endfor %}{% endfor %}"
    )
    messages = [
        {"role": "user", "content": "plain"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]
    assert _render(tmp_path, llama3_dir, template, messages) == "<text:plain><text:a><text:b>"


def test_kwargs_tools_and_documents_reach_the_template(tmp_path: Path, llama3_dir: Path) -> None:
    template = "{{ documents | length }} {{ tools[0]['function']['name'] }} {{ enable_thinking }}"
    rendered = _render(
        tmp_path,
        llama3_dir,
        template,
        [],
        tools=TOOLS,
        documents=[{"title": "t", "text": "x"}],
        chat_template_kwargs={"enable_thinking": False},
    )
    assert rendered == "1 get_weather False"


def test_messages_are_not_mutated(pool: TokenizerPool) -> None:
    call = {"type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [call]}]
    before = json.dumps(messages)
    pool.render_chat(MODEL, messages)
    assert json.dumps(messages) == before
