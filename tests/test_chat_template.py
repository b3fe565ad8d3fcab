"""Chat templates: HF conventions, the real Qwen3 template, sandboxing, and typed errors.

Expected Qwen3 prompts were derived by reading the template in tokenizer_config.json.
"""

from __future__ import annotations

import copy
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import jinja2.ext
import pytest
from helpers import QWEN3_DIR
from hypothesis import given
from hypothesis import strategies as st
from jinja2.sandbox import ImmutableSandboxedEnvironment

from interlock.processing import (
    ChatMessageError,
    ChatTemplate,
    ChatTemplateError,
    HFTokenizer,
    load_chat_template,
    load_tokenizer,
)
from interlock.processing._messages import validate_messages

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Météo du jour <à Paris>",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
# tojson as HF does it: no ASCII escaping, no HTML escaping, json.dumps' default separators.
WEATHER_TOOL_JSON = (
    '{"type": "function", "function": {"name": "get_weather", "description": '
    '"Météo du jour <à Paris>", "parameters": {"type": "object", "properties": '
    '{"city": {"type": "string"}}, "required": ["city"]}}}'
)
TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    + WEATHER_TOOL_JSON
    + "\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
)


@pytest.fixture(scope="module")
def qwen3_dir() -> Path:
    if not (QWEN3_DIR / "tokenizer_config.json").is_file():
        pytest.skip(f"Qwen3 tokenizer files not found at {QWEN3_DIR.resolve()}")
    return QWEN3_DIR


@pytest.fixture(scope="module")
def qwen3_template(qwen3_dir: Path) -> ChatTemplate:
    return load_chat_template(qwen3_dir / "tokenizer_config.json")


Message = dict[str, object]


def user(text: str) -> Message:
    return {"role": "user", "content": text}


# --- The real Qwen3 template ------------------------------------------------------------------


def test_qwen3_multi_turn_with_generation_prompt(qwen3_template: ChatTemplate) -> None:
    messages: list[Message] = [
        {"role": "system", "content": "You are a helpful assistant."},
        user("Hello"),
        {"role": "assistant", "content": "Hi! How can I help?"},
        user("What is 2+2?"),
    ]
    assert qwen3_template.render(messages, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHello<|im_end|>\n"
        "<|im_start|>assistant\nHi! How can I help?<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_qwen3_without_generation_prompt_wraps_the_last_reply_in_empty_think(
    qwen3_template: ChatTemplate,
) -> None:
    messages: list[Message] = [user("Hello"), {"role": "assistant", "content": "Hi!"}]
    assert qwen3_template.render(messages, add_generation_prompt=False) == (
        "<|im_start|>user\nHello<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nHi!<|im_end|>\n"
    )


def test_qwen3_drops_reasoning_from_earlier_turns(qwen3_template: ChatTemplate) -> None:
    messages: list[Message] = [
        user("Hello"),
        {"role": "assistant", "content": "<think>\nThey greet me.\n</think>\n\nHi!"},
        user("Bye"),
    ]
    assert qwen3_template.render(messages) == (
        "<|im_start|>user\nHello<|im_end|>\n"
        "<|im_start|>assistant\nHi!<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_qwen3_enable_thinking_false_adds_an_empty_think_block(
    qwen3_template: ChatTemplate,
) -> None:
    assert qwen3_template.render([user("Hello")], enable_thinking=False) == (
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    # Only False switches thinking off; leaving it out keeps the plain generation prompt.
    assert qwen3_template.render([user("Hello")], enable_thinking=True).endswith(
        "<|im_start|>assistant\n"
    )


def test_qwen3_tools_go_into_the_system_message(qwen3_template: ChatTemplate) -> None:
    messages: list[Message] = [
        {"role": "system", "content": "You are helpful."},
        user("Weather in Paris?"),
    ]
    assert qwen3_template.render(messages, tools=[WEATHER_TOOL]) == (
        "<|im_start|>system\nYou are helpful.\n\n"
        + TOOLS_PREAMBLE
        + "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_qwen3_tool_call_and_tool_response(qwen3_template: ChatTemplate) -> None:
    messages: list[Message] = [
        user("Weather in Paris?"),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    ]
    before = copy.deepcopy(messages)
    assert qwen3_template.render(messages, tools=[WEATHER_TOOL]) == (
        "<|im_start|>system\n" + TOOLS_PREAMBLE + "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n"
        '{"temp": 21}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n"
    )
    assert messages == before, "render must not modify the caller's messages"


def test_qwen3_readme_example_renders_to_24_tokens(qwen3_dir: Path) -> None:
    tokenizer: HFTokenizer = load_tokenizer(qwen3_dir)
    assert tokenizer.chat_template is not None
    prompt = tokenizer.chat_template.render(
        [{"role": "system", "content": "You are helpful."}, user("What is 2+2?")]
    )
    assert prompt == (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tokenizer.encode(prompt)
    assert len(ids) == 24
    assert ids.count(151_644) == 3  # <|im_start|>


# --- Built-in ChatML ----------------------------------------------------------------------------


def test_chatml_renders_the_classic_format() -> None:
    messages: list[Message] = [
        {"role": "system", "content": "Be brief."},
        user("Hi"),
        {"role": "assistant", "content": "Hello."},
        user("Bye"),
    ]
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
    )
    template = ChatTemplate.chatml()
    assert template.render(messages, add_generation_prompt=False) == expected
    assert template.render(messages) == expected + "<|im_start|>assistant\n"


def test_chatml_renders_tools_and_tool_calls() -> None:
    messages: list[Message] = [
        {"role": "system", "content": "You are helpful."},
        user("Weather?"),
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}],
        },
        {"role": "tool", "content": "-3"},
    ]
    assert ChatTemplate.chatml().render(messages, tools=[WEATHER_TOOL]) == (
        "<|im_start|>system\nYou are helpful.\n\n"
        + TOOLS_PREAMBLE
        + "<|im_start|>user\nWeather?<|im_end|>\n"
        "<|im_start|>assistant\nChecking.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>tool\n-3<|im_end|>\n<|im_start|>assistant\n"
    )


def test_text_content_parts_are_joined_with_newlines() -> None:
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    assert ChatTemplate.chatml().render(
        [{"role": "user", "content": parts}], add_generation_prompt=False
    ) == ("<|im_start|>user\nfirst\nsecond<|im_end|>\n")


# --- Hugging Face conventions ---------------------------------------------------------------


def render(source: str, **kwargs: object) -> str:
    return ChatTemplate(source, name="test").render([user("hi")], **kwargs)  # type: ignore[arg-type]


def test_tojson_matches_hugging_face() -> None:
    value = {"a": "é<&>'", "b": [1, 2]}
    assert render("{{ v | tojson }}", v=value) == json.dumps(value, ensure_ascii=False)
    assert render("{{ v | tojson(indent=2) }}", v=value) == json.dumps(
        value, ensure_ascii=False, indent=2
    )
    assert render("{{ v | tojson(ensure_ascii=True, sort_keys=True) }}", v={"b": "é", "a": 1}) == (
        '{"a": 1, "b": "\\u00e9"}'
    )


def test_trim_blocks_and_lstrip_blocks_are_on() -> None:
    assert render("  {% if true %}\nA\n  {% endif %}\nB") == "A\nB"


def test_variables_bos_eos_and_extra_kwargs_are_visible() -> None:
    template = ChatTemplate(
        "{{ bos_token }}|{{ eos_token }}|{{ enable_thinking }}|{{ add_generation_prompt }}",
        bos_token="<s>",
        eos_token="</s>",
    )
    assert template.render([user("hi")], enable_thinking=False) == "<s>|</s>|False|True"


def test_undefined_variable_renders_empty_like_hugging_face() -> None:
    assert render("[{{ nothing }}]") == "[]"
    assert render("{% if nothing is defined %}yes{% else %}no{% endif %}") == "no"


def test_generation_markers_and_loop_controls_are_supported() -> None:
    assert render("{% generation %}kept{% endgeneration %}") == "kept"
    assert render("{% for m in messages %}{% break %}{% endfor %}ok") == "ok"
    assert re.fullmatch(r"\d{4}", render("{{ strftime_now('%Y') }}"))


# --- Template errors --------------------------------------------------------------------------


def test_raise_exception_is_a_chat_template_error_with_the_templates_message() -> None:
    with pytest.raises(ChatTemplateError, match="rejected the conversation: roles must alternate"):
        render("{{ raise_exception('roles must alternate') }}")


def test_using_an_undefined_variable_is_a_chat_template_error_with_the_line() -> None:
    with pytest.raises(ChatTemplateError, match=r"line 2: UndefinedError: 'foo' is undefined"):
        render("ok\n{{ foo.bar }}")


def test_a_failing_expression_is_a_chat_template_error() -> None:
    with pytest.raises(ChatTemplateError, match="TypeError"):
        render("{{ messages[0].content + 1 }}")


def test_syntax_error_is_reported_at_construction() -> None:
    with pytest.raises(ChatTemplateError, match=r"does not compile: .* \(template line 1\)"):
        ChatTemplate("{% if %}", name="broken")


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ messages.append(1) }}",
        "{% set d = {} %}{{ d.update({'a': 1}) }}",
        "{{ messages[0].update({'role': 'system'}) }}",
    ],
)
def test_the_sandbox_forbids_unsafe_and_mutating_operations(source: str) -> None:
    messages: list[Message] = [user("hi")]
    with pytest.raises(ChatTemplateError, match="SecurityError"):
        ChatTemplate(source).render(messages)
    assert messages == [user("hi")]


@pytest.mark.parametrize(
    "source",
    [
        "{% for m in messages %}{{ m.role }}:{{ m.content.upper() }}"
        "{{ m.content.startswith('h') }}{{ m.content.split('{') }}{% endfor %}",
        "{{ messages[0].items() | list }}{{ messages[0].get('role') }}"
        "{{ messages[0].keys is defined }}",
        "{{ messages[0].missing is defined }}[{{ messages[0].missing }}]",
        "{{ messages[1].content.format(7) }}{{ messages[1].content.format_map({}) }}",
        "{{ '{0.__class__}'.format(messages) }}",
        "{{ messages[0].content.__class__ }}",
        "{{ messages[0].__class__ }}",
        "{{ messages[0].__len__() }}",
        "{% set ns = namespace(a=1, s='x', f=none, r=1.5, t=true, l=[1]) %}"
        "{{ ns.a }}{{ ns.s }}{{ ns.f }}{{ ns.r }}{{ ns.t }}{{ ns.l }}{{ ns.missing is defined }}",
        "{% set ns = namespace(f='{}!'.format) %}{{ ns.f(3) }}{{ ns._Namespace__attrs }}",
        "{% for m in messages %}{{ loop.index0 }}{{ loop.first }}{{ loop.last }}{{ loop.length }}"
        "{{ loop.cycle('a', 'b') }}{{ loop.previtem is defined }}{{ loop.nope is defined }}"
        "{% endfor %}",
    ],
)
def test_attribute_lookups_render_as_in_jinjas_own_sandbox(source: str) -> None:
    # The template environment answers the frequent lookups without the sandbox's checks:
    # the same text, and the same refusals, as jinja2's ImmutableSandboxedEnvironment.
    reference = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    messages = [{"role": "system", "content": "hi {x}"}, {"role": "user", "content": "n={}"}]
    try:
        expected: str | type[Exception] = reference.from_string(source).render(
            messages=copy.deepcopy(messages)
        )
    except Exception as exc:
        expected = type(exc)
    try:
        got: str | type[Exception] = ChatTemplate(source).render(
            messages, add_generation_prompt=False
        )
    except ChatTemplateError as exc:
        assert exc.__cause__ is not None
        got = type(exc.__cause__)
    assert got == expected


def test_template_kwargs_cannot_replace_helpers() -> None:
    with pytest.raises(ChatTemplateError, match="raise_exception"):
        render("x", raise_exception=None)


# --- Message validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ("hello", "messages"),
        ([], "messages"),
        ([user("a"), 3], "messages[1]"),
        ([{"role": "usr", "content": "x"}], "messages[0].role"),
        ([{"content": "x"}], "messages[0].role"),
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content[0].type"),
        ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text"),
        ([{"role": "user", "content": ["text"]}], "messages[0].content[0]"),
        ([{"role": "user", "content": "x", "nmae": "bob"}], "messages[0].nmae"),
        ([{"role": "user", "content": "x", "name": 7}], "messages[0].name"),
        ([{"role": "tool", "content": "x", "tool_call_id": None}], "messages[0].tool_call_id"),
        (
            [{"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]}],
            "messages[0].tool_calls",
        ),
        ([{"role": "assistant", "tool_calls": "f"}], "messages[0].tool_calls"),
        (
            [{"role": "assistant", "tool_calls": [{"id": "1"}]}],
            "messages[0].tool_calls[0].function",
        ),
        (
            [{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}],
            "messages[0].tool_calls[0].function.name",
        ),
        (
            [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}]}],
            "messages[0].tool_calls[0].function.arguments",
        ),
        (
            [
                {
                    "role": "assistant",
                    "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}],
                }
            ],
            "messages[0].tool_calls[0].function.arguments",
        ),
    ],
)
def test_malformed_messages_name_the_field(messages: object, field: str) -> None:
    with pytest.raises(ChatMessageError) as info:
        ChatTemplate.chatml().render(messages)  # type: ignore[arg-type]
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert isinstance(info.value, ChatTemplateError)


@pytest.mark.parametrize(("tools", "field"), [("x", "tools"), ([{"a": 1}, "b"], "tools[1]")])
def test_malformed_tools_name_the_field(tools: object, field: str) -> None:
    with pytest.raises(ChatMessageError) as info:
        ChatTemplate.chatml().render([user("hi")], tools=tools)  # type: ignore[arg-type]
    assert info.value.field == field


# --- Loading ------------------------------------------------------------------------------------


def test_load_from_directory_or_config_file(qwen3_dir: Path) -> None:
    from_dir = load_chat_template(qwen3_dir)
    from_file = load_chat_template(qwen3_dir / "tokenizer_config.json")
    assert from_dir.source == from_file.source
    assert from_dir.eos_token == "<|im_end|>"
    assert from_dir.bos_token is None
    assert from_dir.name.endswith("tokenizer_config.json")


def test_chat_template_jinja_wins_over_the_config(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "config", "eos_token": {"content": "</s>"}})
    )
    (tmp_path / "chat_template.jinja").write_text("jinja {{ eos_token }}")
    assert load_chat_template(tmp_path).render([user("hi")]) == "jinja </s>"
    assert load_chat_template(tmp_path / "chat_template.jinja").render([user("hi")]) == "jinja </s>"
    assert load_chat_template(tmp_path / "tokenizer_config.json").render([user("hi")]) == "config"


def test_named_templates_pick_default_unless_asked(tmp_path: Path) -> None:
    config = tmp_path / "tokenizer_config.json"
    config.write_text(
        json.dumps(
            {
                "chat_template": [
                    {"name": "default", "template": "plain"},
                    {"name": "tool_use", "template": "tools"},
                ]
            }
        )
    )
    assert load_chat_template(config).render([user("hi")]) == "plain"
    assert load_chat_template(tmp_path, name="tool_use").render([user("hi")]) == "tools"
    with pytest.raises(ChatTemplateError, match="no chat template named 'rag'"):
        load_chat_template(config, name="rag")


def test_missing_template_names_the_path_and_what_was_looked_for(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ChatTemplateError) as info:
        load_chat_template(tmp_path)
    assert str(tmp_path) in str(info.value)
    assert "chat_template.jinja" in str(info.value)
    with pytest.raises(ChatTemplateError, match="has no 'chat_template' key"):
        load_chat_template(tmp_path / "tokenizer_config.json")
    with pytest.raises(ChatTemplateError, match="no such file"):
        load_chat_template(tmp_path / "absent.json")


def test_a_broken_template_in_a_model_directory_fails_at_load(tmp_path: Path) -> None:
    (tmp_path / "chat_template.jinja").write_text("{% for %}")
    with pytest.raises(ChatTemplateError, match=r"chat_template\.jinja does not compile"):
        load_chat_template(tmp_path)


# --- Byte for byte what jinja2's own sandbox renders --------------------------------------------

# Pieces the Qwen3 template looks for (think and tool-response markers) among plain text.
_texts = st.lists(
    st.sampled_from(["a", " ", "\n", "é", "{", "}", "<think>", "</think>", "<tool_response>",
                     "</tool_response>", "<|im_end|>", "\\", "'", '"']),
    max_size=6,
).map("".join)  # fmt: skip
_tool_calls = st.lists(
    st.fixed_dictionaries(
        {
            "type": st.just("function"),
            "function": st.fixed_dictionaries(
                {
                    "name": _texts,
                    "arguments": st.one_of(
                        st.dictionaries(_texts, _texts, max_size=2),
                        st.dictionaries(_texts, st.integers(), max_size=2).map(json.dumps),
                    ),
                }
            ),
        }
    ),
    max_size=2,
)


class _Loud(str):
    """Text that concatenates its own way: ChatML's shortcut past jinja2 must leave it to
    jinja2, which calls ``__radd__``."""

    def __radd__(self, other: object) -> str:
        return f"{other}[loud]{self!s}"


_messages = st.lists(
    st.one_of(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["system", "user", "tool"]),
             "content": st.one_of(_texts, _texts.map(_Loud))}
        ),
        st.fixed_dictionaries(
            {"role": st.just("assistant"), "content": st.one_of(st.none(), _texts)},
            optional={"reasoning_content": st.one_of(st.none(), _texts), "tool_calls": _tool_calls},
        ),
    ),
    min_size=1,
    max_size=5,
)  # fmt: skip


def _jinja_reference(source: str) -> Any:
    """The template compiled as transformers compiles a chat template: jinja2's stock
    ImmutableSandboxedEnvironment, none of interlock's shortcuts."""
    from interlock.processing import _chat_template as internals

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[internals._GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = internals._tojson
    env.globals["raise_exception"] = internals._raise_exception
    env.globals["strftime_now"] = internals._strftime_now
    return env.from_string(source)


@cache
def _templates_and_references() -> list[tuple[ChatTemplate, Any]]:
    """ChatML's template and Qwen3's (where the checkout has it beside it), each with its
    `_jinja_reference`: compiled once, not for every example (that was most of the time)."""
    templates = [ChatTemplate.chatml()]
    if (QWEN3_DIR / "tokenizer_config.json").is_file():
        templates.append(load_chat_template(QWEN3_DIR / "tokenizer_config.json"))
    return [(template, _jinja_reference(template.source)) for template in templates]


@given(
    messages=_messages,
    tools=st.one_of(st.none(), st.lists(st.fixed_dictionaries({"name": _texts}), max_size=2)),
    # Not only bools: ChatML's shortcut must judge a value's truth as the template does.
    add_generation_prompt=st.sampled_from([True, False, 1, ""]),
    thinking=st.one_of(st.none(), st.booleans()),
)
def test_qwen3_and_chatml_render_byte_for_byte_as_jinjas_own_sandbox(
    messages: list[Message],
    tools: list[Message] | None,
    add_generation_prompt: bool,
    thinking: bool | None,
) -> None:
    # The attribute and call shortcuts of the template's environment, and ChatML's shortcut
    # past jinja2 for a conversation without tools, change no byte of a prompt.
    kwargs: dict[str, object] = {} if thinking is None else {"enable_thinking": thinking}
    for template, reference in _templates_and_references():
        context = {
            "messages": validate_messages(messages),
            "tools": tools,
            "add_generation_prompt": add_generation_prompt,
            **kwargs,
        }
        if template.eos_token is not None:
            context["eos_token"] = template.eos_token
        if template.bos_token is not None:
            context["bos_token"] = template.bos_token
        try:
            expected: str | type[Exception] = reference.render(copy.deepcopy(context))
        except Exception as exc:
            expected = type(exc)
        try:
            got: str | type[Exception] = template.render(
                messages, tools=tools, add_generation_prompt=add_generation_prompt, **kwargs
            )
        except ChatTemplateError as exc:
            assert exc.__cause__ is not None
            got = type(exc.__cause__)
        assert got == expected, (template.name, messages)
