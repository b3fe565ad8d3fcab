"""Chats the engine runs: with ``postprocessing='engine'`` a chat request reaches an
`OpenAIEngine`'s ``/v1/chat/completions`` and its text, tool calls and reasoning pass through to
the client untouched (issue 12, item 1).

The engines are stand-ins on loopback (a Starlette app behind interlock's own HTTP server) that
answer as vLLM 0.32 does: a role chunk carrying ``prompt_token_ids``, then one chunk per delta
with its ``token_ids``, the finish reason on the last, a usage chunk and ``[DONE]``. The
frontend in front of them is the real one (pipeline, app, HTTP server); clients are httpx and
the official openai client.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import httpx
import openai
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from test_http_harness import serving

from interlock import Components, PipelineConfig, RequestError, WorkerGone, build_pipeline
from interlock.engines.openai import OpenAIEngine
from interlock.engines.openai._stream import ChunkReader
from interlock.http import Preprocessor, build_app, serve_http
from interlock.http._openai import ChatDeltas
from interlock.wire import ChatRequest, EngineOutput, PreprocessedRequest, decode_body, encode_frame
from interlock.wire._frames import Output, Start

PRE = Preprocessor.default()
MODEL = "tiny"
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    },
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
#: What a vLLM with a tool-call and a reasoning parser streams: reasoning, narration, two tool
#: calls (the first one's arguments in pieces), and an empty last delta with the finish reason.
DELTAS: list[dict[str, Any]] = [
    {"reasoning_content": "The user wants "},
    {"reasoning_content": "the weather."},
    {"content": "Let me check. ", "reasoning_content": None},
    {
        "tool_calls": [
            {
                "index": 0,
                "id": "chatcmpl-tool-a1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": ""},
            }
        ]
    },
    {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]},
    {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]},
    {
        "tool_calls": [
            {
                "index": 1,
                "id": "chatcmpl-tool-b2",
                "type": "function",
                "function": {"name": "get_time", "arguments": "{}"},
            }
        ]
    },
    {},
]
TOOL_CALLS = [
    {
        "id": "chatcmpl-tool-a1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    },
    {
        "id": "chatcmpl-tool-b2",
        "type": "function",
        "function": {"name": "get_time", "arguments": "{}"},
    },
]
#: What a stand-in answers on /v1/completions (a migrated continuation).
CONTINUATION = ["It is ", "sunny."]


def delta_tokens(delta: dict[str, Any]) -> list[int]:
    """The token ids a stand-in sends with ``delta``: its text's bytes (one token when none)."""
    text = (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    for call in delta.get("tool_calls", []):
        function = call.get("function", {})
        text += function.get("name", "") + function.get("arguments", "")
    return PRE.tokenizer.encode(text or "\n", add_special_tokens=False)


ALL_TOKENS = [t for d in DELTAS for t in delta_tokens(d)]


@attrs.define
class Script:
    """How the stand-ins of a test answer chats (shared by all of them)."""

    deltas: list[dict[str, Any]] = attrs.field(factory=lambda: list(DELTAS))
    finish_reason: str = "tool_calls"
    #: The first ``break_chats`` chat requests (over all engines) end with a clean EOF, without
    #: a finish reason, after ``break_after`` deltas.
    break_chats: int = 0
    break_after: int = 0
    #: Added to every prompt token id the stand-ins report (another chat template).
    prompt_shift: int = 0
    #: Answer every chat with this 400 message (as vLLM refuses tools without a parser).
    refuse: str | None = None


@attrs.define
class Seen:
    path: str
    body: dict[str, Any]
    request_id: str | None


@attrs.define(eq=False)
class StandIn:
    """One stand-in vLLM: /health, /v1/models, /metrics, /tokenize, /v1/chat/completions and
    /v1/completions, recording every generation request."""

    instance_id: int
    script: Script
    block_size: int
    seen: list[Seen] = attrs.field(factory=list)
    url: str = ""

    def app(self) -> Starlette:
        async def health(request: Request) -> Response:
            return Response(status_code=200)

        async def models(request: Request) -> Response:
            return JSONResponse({"data": [{"id": MODEL, "object": "model", "max_model_len": 4096}]})

        async def metrics(request: Request) -> Response:
            labels = f'engine="0",model_name="{MODEL}"'
            return PlainTextResponse(
                f"vllm:num_requests_running{{{labels}}} 0.0\n"
                f"vllm:num_requests_waiting{{{labels}}} 0.0\n"
                f'vllm:cache_config_info{{block_size="{self.block_size}",{labels}}} 1.0\n'
            )

        async def tokenize(request: Request) -> Response:
            body = await request.json()
            tokens = PRE.tokenizer.encode(body["prompt"], add_special_tokens=False)
            return JSONResponse({"tokens": tokens, "count": len(tokens)})

        async def chat(request: Request) -> Response:
            body = await request.json()
            self.seen.append(Seen("chat", body, request.headers.get("x-request-id")))
            if self.script.refuse is not None:
                error = {"message": self.script.refuse, "type": "BadRequestError", "code": 400}
                return JSONResponse({"error": error}, status_code=400)
            return StreamingResponse(self._chat(body), media_type="text/event-stream")

        async def completions(request: Request) -> Response:
            body = await request.json()
            self.seen.append(Seen("completions", body, request.headers.get("x-request-id")))
            return StreamingResponse(self._completion(body), media_type="text/event-stream")

        return Starlette(
            routes=[
                Route("/health", health),
                Route("/v1/models", models),
                Route("/metrics", metrics),
                Route("/tokenize", tokenize, methods=["POST"]),
                Route("/v1/chat/completions", chat, methods=["POST"]),
                Route("/v1/completions", completions, methods=["POST"]),
            ]
        )

    async def _chat(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        script = self.script
        breaking = script.break_chats > 0
        if breaking:
            script.break_chats -= 1
        prompt = PRE.encode_chat(body["messages"], tools=body.get("tools"))
        head = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0, "model": MODEL}
        role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        reported = [t + script.prompt_shift for t in prompt]
        yield _event(head | {"choices": [role], "prompt_token_ids": reported})
        completion = 0
        for n, delta in enumerate(script.deltas):
            if breaking and n == script.break_after:
                return  # a clean EOF without a finish reason: a broken stream
            last = n == len(script.deltas) - 1
            ids = delta_tokens(delta)
            completion += len(ids)
            choice = {
                "index": 0,
                "delta": delta,
                "logprobs": None,
                "finish_reason": script.finish_reason if last else None,
                "token_ids": ids,
            }
            yield _event(head | {"choices": [choice]})
        usage = {
            "prompt_tokens": len(prompt),
            "completion_tokens": completion,
            "total_tokens": len(prompt) + completion,
        }
        yield _event(head | {"choices": [], "usage": usage})
        yield b"data: [DONE]\n\n"

    async def _completion(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        head = {"id": "cmpl-x", "object": "text_completion", "created": 0, "model": MODEL}
        completion = 0
        for n, piece in enumerate(CONTINUATION):
            ids = PRE.tokenizer.encode(piece, add_special_tokens=False)
            completion += len(ids)
            last = n == len(CONTINUATION) - 1
            choice = {
                "index": 0,
                "text": piece,
                "token_ids": ids,
                "finish_reason": "stop" if last else None,
            }
            yield _event(head | {"choices": [choice]})
        usage = {
            "prompt_tokens": len(body["prompt"]),
            "completion_tokens": completion,
            "total_tokens": len(body["prompt"]) + completion,
        }
        yield _event(head | {"choices": [], "usage": usage})
        yield b"data: [DONE]\n\n"


def _event(value: Any) -> bytes:
    return b"data: " + json.dumps(value).encode() + b"\n\n"


@attrs.frozen
class Served:
    url: str
    stand_ins: list[StandIn]

    def seen(self) -> list[tuple[int, Seen]]:
        return [(s.instance_id, seen) for s in self.stand_ins for seen in s.seen]

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=30)

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0)


@asynccontextmanager
async def serving_stand_ins(
    script: Script | None = None,
    *,
    postprocessing: str = "engine",
    engines: int = 2,
    migration_limit: int = 0,
) -> AsyncIterator[Served]:
    """Stand-in engines 1..``engines``, a pipeline over OpenAIEngines, and interlock's app."""
    script = script or Script()
    config = PipelineConfig(
        postprocessing=postprocessing,
        router_mode="round_robin",
        migration_limit=migration_limit,
    )
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            stand_ins = []
            for index in range(1, engines + 1):
                stand_in = StandIn(index, script, config.kv_block_size)
                stand_in.url = await nursery.start(serve_http, stand_in.app(), "127.0.0.1", 0)
                stand_ins.append(stand_in)
            workers = [
                OpenAIEngine(
                    s.url,
                    instance_id=s.instance_id,
                    block_size=config.kv_block_size,
                    tokenizer=PRE.tokenizer,
                    health_interval=0.05,
                )
                for s in stand_ins
            ]
            components = Components(workers=workers, tokenizer=PRE.tokenizer)
            async with build_pipeline(config, components) as pipeline:
                app = build_app(pipeline, model=MODEL, preprocessor=PRE)
                url = await nursery.start(serve_http, app, "127.0.0.1", 0)
                yield Served(url, stand_ins)
            nursery.cancel_scope.cancel()


def chat_body(**changes: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": MESSAGES, "tools": TOOLS, "max_tokens": 64} | changes


# -- what the engine receives ------------------------------------------------------------------


async def test_a_chat_goes_to_the_engines_chat_endpoint_with_its_tool_fields() -> None:
    async with serving_stand_ins() as served, served.client() as client:
        response = await client.post(
            "/v1/chat/completions",
            json=chat_body(
                tool_choice=NAMED,
                parallel_tool_calls=False,
                response_format={"type": "text"},
                chat_template_kwargs={"enable_thinking": True},
                temperature=0.5,
                seed=7,
                stop=["\n\n"],
            ),
        )
        assert response.status_code == 200, response.text
    [(_, seen)] = served.seen()
    assert seen.path == "chat"
    body = seen.body
    assert "prompt" not in body
    assert body["model"] == MODEL
    assert body["messages"] == MESSAGES and body["tools"] == TOOLS
    assert body["tool_choice"] == NAMED and body["parallel_tool_calls"] is False
    assert body["response_format"] == {"type": "text"}
    assert body["chat_template_kwargs"] == {"enable_thinking": True}
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["return_token_ids"] is True
    assert body["max_tokens"] == 64
    assert body["temperature"] == 0.5 and body["seed"] == 7
    assert body["stop"] == ["\n\n"]
    assert "add_generation_prompt" not in body  # the default, left to the engine
    assert seen.request_id == response.json()["id"]


async def test_under_frontend_postprocessing_a_chat_still_goes_as_token_ids() -> None:
    async with (
        serving_stand_ins(postprocessing="frontend") as served,
        served.client() as client,
    ):
        response = await client.post(
            "/v1/chat/completions", json=chat_body(tool_choice="auto", max_tokens=4)
        )
        assert response.status_code == 200, response.text
    [(_, seen)] = served.seen()
    assert seen.path == "completions"
    assert seen.body["prompt"] == PRE.encode_chat(MESSAGES, tools=TOOLS)


async def test_a_completions_request_under_engine_postprocessing_stays_on_completions() -> None:
    async with serving_stand_ins() as served, served.client() as client:
        response = await client.post(
            "/v1/completions", json={"model": MODEL, "prompt": "Once", "max_tokens": 8}
        )
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == "".join(CONTINUATION)
    assert [seen.path for _, seen in served.seen()] == ["completions"]


# -- what the client receives ------------------------------------------------------------------


async def test_the_openai_client_reads_the_tool_calls_and_reasoning_of_a_whole_answer() -> None:
    async with serving_stand_ins() as served:

        def call() -> Any:
            with served.openai() as client:
                return client.chat.completions.create(
                    model=MODEL,
                    messages=MESSAGES,
                    tools=TOOLS,
                    max_tokens=64,  # type: ignore[arg-type]
                )

        completion = await trio.to_thread.run_sync(call)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    message = choice.message
    assert message.content == "Let me check. "
    assert message.model_extra["reasoning_content"] == "The user wants the weather."
    assert message.tool_calls is not None
    assert [c.model_dump(exclude_none=True) for c in message.tool_calls] == TOOL_CALLS
    assert completion.usage is not None
    assert completion.usage.completion_tokens == len(ALL_TOKENS)
    assert completion.usage.prompt_tokens == len(PRE.encode_chat(MESSAGES, tools=TOOLS))


async def test_the_openai_client_streams_the_deltas_as_the_engine_sent_them() -> None:
    async with serving_stand_ins() as served:

        def call() -> list[Any]:
            with served.openai() as client:
                stream = client.chat.completions.create(
                    model=MODEL,
                    messages=MESSAGES,  # type: ignore[arg-type]
                    tools=TOOLS,  # type: ignore[arg-type]
                    max_tokens=64,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                return list(stream)

        chunks = await trio.to_thread.run_sync(call)
    with_choices = [c for c in chunks if c.choices]
    deltas = [c.choices[0].delta for c in with_choices]
    assert deltas[0].role == "assistant"
    sent_calls = [call for d in DELTAS for call in d.get("tool_calls", [])]
    got_calls = [c.model_dump(exclude_none=True) for d in deltas for c in d.tool_calls or []]
    assert got_calls == sent_calls
    reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    assert reasoning == "The user wants the weather."
    assert "".join(d.content or "" for d in deltas) == "Let me check. "
    assert with_choices[-1].choices[0].finish_reason == "tool_calls"
    assert [c.choices[0].finish_reason for c in with_choices[:-1]] == [None] * (
        len(with_choices) - 1
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(ALL_TOKENS)


async def test_a_reasoning_field_keeps_the_name_the_engine_gave_it() -> None:
    # vLLM 0.32 says "reasoning"; older versions "reasoning_content": neither is renamed.
    script = Script(deltas=[{"reasoning": "Hm."}, {"content": "Yes."}], finish_reason="stop")
    async with serving_stand_ins(script) as served, served.client() as client:
        whole = (await client.post("/v1/chat/completions", json=chat_body())).json()
        async with client.stream(
            "POST", "/v1/chat/completions", json=chat_body(stream=True)
        ) as response:
            lines = [line async for line in response.aiter_lines() if line.startswith("data: {")]
    message = whole["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "Yes.", "reasoning": "Hm."}
    assert whole["choices"][0]["finish_reason"] == "stop"
    streamed = [json.loads(line[6:])["choices"][0]["delta"] for line in lines]
    assert streamed[0] == {"role": "assistant", "reasoning": "Hm."}
    assert streamed[1] == {"content": "Yes."}


async def test_tool_calls_without_text_answer_with_null_content() -> None:
    script = Script(deltas=DELTAS[3:])
    async with serving_stand_ins(script) as served, served.client() as client:
        whole = (await client.post("/v1/chat/completions", json=chat_body())).json()
    message = whole["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"] == TOOL_CALLS


# -- refused requests --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "param"),
    [
        ({"tool_choice": NAMED}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
    ],
)
async def test_frontend_postprocessing_refuses_forced_tool_calls_and_says_what_to_do(
    changes: dict[str, Any], param: str
) -> None:
    async with serving() as served, served.client() as client:
        body = {"model": "mock", "messages": MESSAGES, "tools": TOOLS} | changes
        response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param
    assert "cannot parse tool calls" in error["message"]
    assert "--postprocessing engine" in error["message"]


#: Bodies a server that lets the engine run chats refuses, and the field each 400 names.
MALFORMED: list[tuple[dict[str, Any], str]] = [
    (
        {"tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice.function.name",
    ),
    ({"tool_choice": {"type": "function", "function": {}}}, "tool_choice.function.name"),
    ({"tool_choice": {"type": "tool"}}, "tool_choice"),
    ({"tool_choice": "always"}, "tool_choice"),
    ({"tool_choice": "required", "tools": None}, "tool_choice"),
    ({"response_format": {"schema": {}}}, "response_format.type"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    # token_data names the prompt tokens, so the engine could not run the chat.
    ({"tool_choice": NAMED, "nvext": {"token_data": [1, 2, 3]}}, "tool_choice"),
]


async def test_engine_postprocessing_refuses_malformed_tool_fields() -> None:
    # One server answers every case (a server per case would cost a second each).
    async with serving_stand_ins(engines=1) as served, served.client() as client:
        for changes, param in MALFORMED:
            response = await client.post("/v1/chat/completions", json=chat_body(**changes))
            assert response.status_code == 400, (changes, response.text)
            assert response.json()["error"]["param"] == param, (changes, response.text)
    assert served.seen() == []


#: Bodies (as raw JSON: NaN and lone surrogate escapes, which no JSON encoder writes) whose
#: fields go on to the engine holding a value with no JSON or no UTF-8 there, and the field
#: each 400 names. The engine's request bodies are written by msgspec (completions) and by
#: json with allow_nan=False (chats): a UnicodeEncodeError or ValueError there was a 500.
UNSENDABLE = [
    ("completions", '"prompt": "Once", "stop": ["\\ud800"]', "stop[0]"),
    ("completions", '"prompt": "Once", "stop": ["end", "x\\udfff"]', "stop[1]"),
    ("completions", '"prompt": "Once", "user": "\\ud800"', "user"),
    ("completions", '"prompt": "Once", "temperature": NaN', "temperature"),
    ("chat", '"chat_template_kwargs": {"x": NaN}', "chat_template_kwargs.x"),
    ("chat", '"chat_template_kwargs": {"x": [1, -Infinity]}', "chat_template_kwargs.x[1]"),
    ("chat", '"chat_template_kwargs": {"x\\ud800": 1}', "chat_template_kwargs"),
    (
        "chat",
        '"response_format": {"type": "json_schema", "json_schema": {"name": "n", '
        '"schema": {"maximum": Infinity}}}',
        "response_format.json_schema.schema.maximum",
    ),
    ("chat", '"response_format": {"type": "json_object", "x": 1e999}', "response_format.x"),
    ("chat", '"stop": ["\\udc00"]', "stop[0]"),
]


async def test_a_field_with_nan_or_a_lone_surrogate_is_a_400_naming_it() -> None:
    messages = [{"role": "user", "content": "Hi", "name": "\ud800"}, *MESSAGES]
    cases = [
        *UNSENDABLE,
        # Fields of a message or a tool that the chat template may not render (so no
        # tokenizer sees them): the engine gets them verbatim.
        ("chat", '"messages": ' + json.dumps(messages), "messages[0].name"),
        (
            "chat",
            '"tools": [{"type": "function", "function": {"name": "f", "description": '
            '"\\udbff", "parameters": {"type": "object"}}}]',
            "tools[0].function.description",
        ),
    ]
    async with serving_stand_ins(engines=1) as served, served.client() as client:
        for path, fields, param in cases:
            if path == "chat" and '"messages"' not in fields:
                fields = f'"messages": {json.dumps(MESSAGES)}, {fields}'
            body = f'{{"model": "{MODEL}", "max_tokens": 4, {fields}}}'
            response = await client.post(
                f"/v1/{path.replace('chat', 'chat/completions')}",
                content=body.encode(),
                headers={"content-type": "application/json"},
            )
            assert response.status_code == 400, (body, response.text)
            error = response.json()["error"]
            assert error["param"] == param, (body, error)
            assert error["code"] in ("invalid_json", "invalid_unicode"), (body, error)
        # The fields that can be sent go as they came: characters past U+FFFF escaped as
        # their pair of surrogates, and line separators json writes unescaped.
        response = await client.post(
            "/v1/completions",
            content=b'{"model": "%s", "prompt": "Once", "max_tokens": 4, '
            b'"stop": ["\\ud83d\\ude82", "\\u00e9\\u2028 end"]}' % MODEL.encode(),
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 200, response.text
    [(_, seen)] = served.seen()
    assert seen.body["stop"] == ["\U0001f682", "\u00e9\u2028 end"]


async def test_an_engine_refusing_the_chat_is_a_400_with_the_engines_words() -> None:
    refusal = 'tool_choice=function "get_weather" requires --tool-call-parser to be set'
    async with serving_stand_ins(Script(refuse=refusal), engines=1) as served:

        def call() -> openai.BadRequestError:
            with served.openai() as client, pytest.raises(openai.BadRequestError) as info:
                client.chat.completions.create(
                    model=MODEL,
                    messages=MESSAGES,  # type: ignore[arg-type]
                    tools=TOOLS,  # type: ignore[arg-type]
                    tool_choice=NAMED,  # type: ignore[arg-type]
                )
            return info.value

        error = await trio.to_thread.run_sync(call)
    assert refusal in str(error)
    assert error.body["param"] == "messages"  # type: ignore[index]


# -- migration ---------------------------------------------------------------------------------


async def test_a_chat_that_broke_after_tokens_continues_as_token_ids() -> None:
    script = Script(break_chats=1, break_after=2)
    async with (
        serving_stand_ins(script, migration_limit=1) as served,
        served.client() as client,
    ):
        whole = (await client.post("/v1/chat/completions", json=chat_body())).json()
    [(first, chat), (second, continuation)] = sorted(served.seen(), key=lambda item: item[1].path)
    assert (chat.path, continuation.path) == ("chat", "completions")
    assert first != second
    generated = delta_tokens(DELTAS[0]) + delta_tokens(DELTAS[1])
    assert continuation.body["prompt"] == PRE.encode_chat(MESSAGES, tools=TOOLS) + generated
    assert continuation.body["max_tokens"] == 64 - len(generated)
    assert continuation.request_id == chat.request_id
    message = whole["choices"][0]["message"]
    # What came before the break passed through; the continuation is the engine's plain text.
    assert message["reasoning_content"] == "The user wants the weather."
    assert message["content"] == "".join(CONTINUATION)
    assert whole["choices"][0]["finish_reason"] == "stop"


async def test_a_chat_that_broke_before_any_token_is_sent_again_as_the_same_chat() -> None:
    script = Script(break_chats=1, break_after=0)
    async with (
        serving_stand_ins(script, migration_limit=1) as served,
        served.client() as client,
    ):
        whole = (
            await client.post("/v1/chat/completions", json=chat_body(tool_choice=NAMED))
        ).json()
    [(first, broken), (second, again)] = served.seen()
    assert first != second
    assert broken.path == again.path == "chat"
    assert again.body == broken.body
    assert whole["choices"][0]["message"]["tool_calls"] == TOOL_CALLS


# -- the engine's prompt tokens ----------------------------------------------------------------


async def test_an_engine_that_renders_chats_differently_is_reported_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="interlock.engines.openai")
    async with (
        serving_stand_ins(Script(prompt_shift=1), engines=1) as served,
        served.client() as client,
    ):
        for _ in range(2):
            response = await client.post("/v1/chat/completions", json=chat_body())
            assert response.status_code == 200
    warnings = [r.getMessage() for r in caplog.records if "renders chats" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "KV-aware routing" in warnings[0]


async def test_an_engine_that_renders_chats_alike_is_not_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="interlock.engines.openai")
    async with serving_stand_ins(engines=1) as served, served.client() as client:
        assert (await client.post("/v1/chat/completions", json=chat_body())).status_code == 200
    assert not [r for r in caplog.records if "renders chats" in r.getMessage()]


# -- the parts -----------------------------------------------------------------------------------


def test_chat_deltas_merge_tool_calls_by_index_and_concatenate_text_fields() -> None:
    deltas = ChatDeltas()
    for delta in DELTAS:
        passed = {k: v for k, v in delta.items() if k != "content" and v is not None}
        if passed:
            deltas.add(passed)
    assert deltas.fields() == {
        "reasoning_content": "The user wants the weather.",
        "tool_calls": TOOL_CALLS,
    }


def test_chat_deltas_keep_interleaved_calls_apart_and_default_their_type() -> None:
    deltas = ChatDeltas()
    deltas.add(
        {"tool_calls": [{"index": 1, "id": "b", "function": {"name": "g", "arguments": "["}}]}
    )
    deltas.add({"tool_calls": [{"index": 0, "id": "a", "function": {"name": "f"}}]})
    deltas.add({"tool_calls": [{"index": 1, "function": {"arguments": "]"}}]})
    assert deltas.fields()["tool_calls"] == [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": ""}},
        {"id": "b", "type": "function", "function": {"name": "g", "arguments": "[]"}},
    ]


@st.composite
def split_calls(draw: st.DrawFn) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Tool calls, and deltas that carry them: each call's arguments cut into pieces, the
    calls' deltas interleaved (each call's in order), as a parser streams them."""
    names = draw(st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=3))
    calls, streams = [], []
    for index, name in enumerate(names):
        arguments = draw(st.text(max_size=20))
        cuts = sorted(draw(st.lists(st.integers(0, len(arguments)), max_size=4)))
        pieces = [arguments[a:b] for a, b in zip([0, *cuts], [*cuts, len(arguments)], strict=True)]
        head = {"index": index, "id": f"call-{index}", "type": "function"}
        deltas = [head | {"function": {"name": name, "arguments": pieces[0]}}]
        deltas += [{"index": index, "function": {"arguments": piece}} for piece in pieces[1:]]
        streams.append(deltas)
        calls.append(
            {
                "id": f"call-{index}",
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
        )
    order = draw(st.permutations([i for i, deltas in enumerate(streams) for _ in deltas]))
    position = [0] * len(streams)
    merged = []
    for index in order:
        merged.append({"tool_calls": [streams[index][position[index]]]})
        position[index] += 1
    return calls, merged


@given(split_calls())
def test_chat_deltas_rebuild_every_call_however_its_arguments_were_cut(
    case: tuple[list[dict[str, Any]], list[dict[str, Any]]],
) -> None:
    calls, deltas = case
    merged = ChatDeltas()
    for delta in deltas:
        merged.add(delta)
    assert merged.fields() == {"tool_calls": calls}


def _reader() -> ChunkReader:
    return ChunkReader(7, text=True, describe="http://engine", chat=True)


def _chunk(delta: Any, *, finish: str | None = None, ids: list[int] | None = None) -> str:
    choice = {
        "index": 0,
        "delta": delta,
        "finish_reason": finish,
        "token_ids": [1] if ids is None else ids,
    }
    return json.dumps({"choices": [choice]})


def test_the_chunk_reader_splits_a_chat_delta_into_text_and_passed_fields() -> None:
    reader = _reader()
    out = reader.feed(_chunk({"content": "a", "reasoning": "b", "tool_calls": [], "x": None}))
    assert out == EngineOutput(token_ids=(1,), text="a", chat_delta={"reasoning": "b"})
    assert reader.feed(_chunk({"role": "assistant", "content": ""}, ids=[])) is None
    call = {"index": 0, "function": {"arguments": "{"}}
    assert reader.feed(_chunk({"tool_calls": [call]}, finish="tool_calls")) is None
    assert reader.feed("[DONE]") == EngineOutput(
        token_ids=(1,), finish_reason="tool_calls", chat_delta={"tool_calls": [call]}
    )


@pytest.mark.parametrize(
    "delta",
    [
        {"tool_calls": [{"function": {"arguments": "{"}}]},
        {"tool_calls": {"index": 0}},
        {"content": 3},
        "text",
    ],
)
def test_the_chunk_reader_breaks_on_a_malformed_chat_delta(delta: Any) -> None:
    with pytest.raises(WorkerGone, match="engine 7"):
        _reader().feed(_chunk(delta))


def test_the_chunk_reader_keeps_the_engines_prompt_token_ids_of_a_chat() -> None:
    reader = _reader()
    role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
    reader.feed(json.dumps({"choices": [role], "prompt_token_ids": [5, 6]}))
    assert reader.prompt_token_ids == [5, 6]


def test_chat_and_chat_delta_cross_the_worker_protocol_and_are_left_out_while_unset() -> None:
    chat = ChatRequest(messages=MESSAGES, tools=TOOLS, tool_choice=NAMED)
    start = Start(
        stream=3, request=PreprocessedRequest(token_ids=[1, 2], detokenize=True, chat=chat)
    )
    assert decode_body(encode_frame(start)[4:]) == start
    output = Output(
        stream=3,
        output=EngineOutput(token_ids=(4,), finish_reason="tool_calls", chat_delta=DELTAS[3]),
    )
    assert decode_body(encode_frame(output)[4:]) == output
    # Unset, they are not sent: a peer from before them decodes these frames.
    plain = Start(stream=3, request=PreprocessedRequest(token_ids=[1, 2]))
    assert b"chat" not in encode_frame(plain)
    assert b"chat_delta" not in encode_frame(Output(stream=3, output=EngineOutput(text="a")))


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"messages": [{"role": "user"}, "hi"]}, "chat.messages"),
        ({"tools": [1]}, "chat.tools"),
        ({"tool_choice": "always"}, "chat.tool_choice"),
        ({"tool_choice": {"type": "function", "function": {}}}, "chat.tool_choice"),
        ({"parallel_tool_calls": 1}, "chat.parallel_tool_calls"),
        ({"response_format": "json"}, "chat.response_format"),
        ({"chat_template_kwargs": []}, "chat.chat_template_kwargs"),
        ({"add_generation_prompt": None}, "chat.add_generation_prompt"),
    ],
)
def test_a_chat_request_checks_its_fields(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(RequestError) as info:
        ChatRequest(**({"messages": MESSAGES} | changes))
    assert info.value.field == field
