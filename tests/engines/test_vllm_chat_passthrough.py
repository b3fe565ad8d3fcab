"""`interlock serve --postprocessing engine` in front of real vLLM: a chat runs on the engine's
``/v1/chat/completions`` and its tool calls reach the official openai client (issue 12, item 1).

vLLM 0.32 returns ``tool_calls`` only when started with a tool-call parser; the session's
engines have none, so this module starts one more engine (id 4, the tier's flags plus
``--enable-auto-tool-choice --tool-call-parser hermes``) for its tests and stops it at the end
(~1-2 min with a warm compile cache). A named ``tool_choice`` makes vLLM constrain the output
(an xgrammar structural tag: ``<tool_call>\n{"name": "get_weather", "arguments": ...}`` with a
strict tool's schema), so even the tier's random-weight model emits a call to that tool, which
the hermes parser streams as ``tool_calls``. One test also runs over a session engine, without a
parser, and documents what vLLM 0.32 does then: it refuses a chat with tools (400, "requires
--tool-call-parser"), and interlock passes the refusal on as a 400.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from engine_tier import (
    SERVED_MODEL_NAME,
    EngineTier,
    VllmEngine,
    engine_flag,
)
from test_serve_over_vllm import client, interlock_serve, words

TOOL_ENGINE_ID = 4
TOOL_PARSER_FLAGS = ("--enable-auto-tool-choice", "--tool-call-parser", "hermes")
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                "required": ["unit"],
                "additionalProperties": False,
            },
            # Strict: the arguments follow the schema (vLLM leaves a non-strict tool's
            # arguments free, any JSON, even under a named tool_choice).
            "strict": True,
        },
    },
    {
        "type": "function",
        # With a description: vLLM renders a tool without one with "description": null, which
        # interlock (rendering the client's JSON) would not, and the prompt tokens would differ.
        "function": {
            "name": "get_time",
            "description": "The time now.",
            "parameters": {"type": "object", "properties": {}},
        },
    },
]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
# Whitespace is allowed inside the JSON, and a random model may spend its tokens on it: the
# call's name arrives first whatever happens, its arguments may be cut by max_tokens.
MAX_TOKENS = 96


@pytest.fixture(scope="module")
def tool_engine(_engine_tier_session: EngineTier) -> Iterator[VllmEngine]:
    """Engine 4: like the session's engines, plus vLLM's hermes tool-call parser."""
    with _engine_tier_session.running_engine(TOOL_ENGINE_ID, flags=TOOL_PARSER_FLAGS) as engine:
        yield engine


def messages(marker: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": f"{marker}: what is the weather? " + words(11, 8)}]


def serve_args(engine: VllmEngine) -> list[str]:
    return [
        *engine_flag(engine),
        "--postprocessing",
        "engine",
        "--router-mode",
        "round_robin",
    ]


def check_arguments(arguments: Any, finish_reason: str | None) -> None:
    """A call's arguments are a string; complete JSON of the schema when the answer stopped."""
    assert isinstance(arguments, str)
    if finish_reason == "stop":
        assert json.loads(arguments).keys() <= {"unit"}, arguments


def test_a_named_tool_choice_reaches_the_openai_client_as_a_tool_call(
    engine_tier: EngineTier, tool_engine: VllmEngine
) -> None:
    with interlock_serve(engine_tier, *serve_args(tool_engine), name="chat-tools") as url:
        api = client(url)
        whole = api.chat.completions.create(
            model=SERVED_MODEL_NAME,
            messages=messages("chat tools whole"),  # type: ignore[arg-type]
            tools=TOOLS,  # type: ignore[arg-type]
            tool_choice=NAMED,  # type: ignore[arg-type]
            max_tokens=MAX_TOKENS,
            temperature=0,
        )
        stream = api.chat.completions.create(
            model=SERVED_MODEL_NAME,
            messages=messages("chat tools stream"),  # type: ignore[arg-type]
            tools=TOOLS,  # type: ignore[arg-type]
            tool_choice=NAMED,  # type: ignore[arg-type]
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)

    choice = whole.choices[0]
    # A named tool_choice ends with "stop" (OpenAI's convention, which vLLM follows), or
    # "length" when the random model's whitespace used up max_tokens.
    assert choice.finish_reason in ("stop", "length")
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1, choice.message
    assert calls[0].function.name == "get_weather"
    assert calls[0].id and calls[0].type == "function"
    check_arguments(calls[0].function.arguments, choice.finish_reason)
    assert whole.usage is not None and whole.usage.completion_tokens > 0

    with_choices = [c for c in chunks if c.choices]
    deltas = [call for c in with_choices for call in c.choices[0].delta.tool_calls or []]
    assert deltas, "the stream carried no tool-call deltas"
    assert deltas[0].function is not None and deltas[0].function.name == "get_weather"
    assert deltas[0].id and all(d.index == 0 for d in deltas)
    arguments = "".join(d.function.arguments or "" for d in deltas if d.function is not None)
    finish = with_choices[-1].choices[0].finish_reason
    assert finish in ("stop", "length")
    check_arguments(arguments, finish)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_interlock_renders_a_chat_with_tools_into_the_engines_prompt_tokens(
    engine_tier: EngineTier, tool_engine: VllmEngine
) -> None:
    # interlock routes on its own rendering of the chat; the engine reports its own on the
    # first chunk, and interlock warns when they differ (KV-aware routing would be blind).
    name = "chat-tools-prompt"
    with interlock_serve(engine_tier, *serve_args(tool_engine), name=name) as url:
        answer = client(url).chat.completions.create(
            model=SERVED_MODEL_NAME,
            messages=messages("chat tools prompt"),  # type: ignore[arg-type]
            tools=TOOLS,  # type: ignore[arg-type]
            max_tokens=4,
            temperature=0,
        )
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    log = (engine_tier.work_dir / f"{name}.log").read_text(encoding="utf-8", errors="replace")
    assert "renders chats into other prompt tokens" not in log, log[-3000:]


def test_without_a_tool_parser_vllm_refuses_a_forced_tool_call_and_the_client_hears_why(
    engine_tier: EngineTier,
) -> None:
    engine = engine_tier.engine(2)
    with interlock_serve(engine_tier, *serve_args(engine), name="chat-no-parser") as url:
        with pytest.raises(openai.BadRequestError) as info:
            client(url).chat.completions.create(
                model=SERVED_MODEL_NAME,
                messages=messages("chat no parser"),  # type: ignore[arg-type]
                tools=TOOLS,  # type: ignore[arg-type]
                tool_choice=NAMED,  # type: ignore[arg-type]
                max_tokens=8,
                temperature=0,
            )
        # The engine's own words: the chat reached its /v1/chat/completions.
        assert "--tool-call-parser" in str(info.value)
        # A chat without tools runs there as usual.
        answer = client(url).chat.completions.create(
            model=SERVED_MODEL_NAME,
            messages=messages("chat no parser, no tools"),  # type: ignore[arg-type]
            max_tokens=4,
            temperature=0,
        )
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert not answer.choices[0].message.tool_calls
    assert answer.usage is not None and answer.usage.completion_tokens > 0
