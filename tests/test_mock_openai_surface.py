"""The mock engine behind vLLM's HTTP surface: what a client of a real vLLM 0.32 sees
(reference/vllm-cpu.md), driven over loopback with httpx and the official ``openai`` client.

Completions and chat, stream and not, token ids back, the usage chunk, /tokenize, /metrics
parsed with prometheus_client, bad input answered 4xx, and a client that goes away freeing its
engine slot. Faults, KV events and disaggregation have their own files.
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import openai
import pytest
import trio
from helpers import wait_until
from prometheus_client.parser import text_string_to_metric_families

from interlock.engines.mock import (
    MockEngine,
    MockFault,
    MockOpenAIServer,
    MockTiming,
    mock_continuation,
    mock_token_pool,
    serve_mock_openai,
)
from interlock.processing import ByteTokenizer

TIMEOUT = 20
PROMPT = list(range(100, 140))


@asynccontextmanager
async def mock_vllm(
    *, tokenizer: bool = False, faults: tuple[MockFault, ...] = (), **engine_options: Any
) -> AsyncIterator[tuple[MockOpenAIServer, httpx.AsyncClient]]:
    """A zero-time `MockEngine` served on a free loopback port (with ``faults`` for every
    request), and a client for it."""
    options: dict[str, Any] = {"timing": MockTiming.zero(), "block_size": 16} | engine_options
    if tokenizer:
        tok = ByteTokenizer()
        options |= {
            "tokenizer": tok,
            "token_pool": mock_token_pool(tok),
            "vocab_size": tok.vocab_size,
        }
    engine = MockEngine(1, **options)
    async with trio.open_nursery() as nursery:
        server: MockOpenAIServer = await nursery.start(
            functools.partial(serve_mock_openai, engine, faults=faults)
        )
        async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as client:
            yield server, client
        nursery.cancel_scope.cancel()


async def sse_lines(response: httpx.Response) -> list[str]:
    """The ``data:`` payloads of a stream, in order."""
    return [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]


async def next_events(lines: AsyncIterator[str], n: int) -> list[str]:
    """The next ``n`` ``data:`` payloads. Keep ``lines`` referenced meanwhile: an abandoned
    ``aiter_lines`` generator is finalized, which closes the response (the client leaves)."""
    events: list[str] = []
    while len(events) < n:
        line = await lines.__anext__()
        if line.startswith("data: "):
            events.append(line[6:])
    return events


async def test_completion_with_token_ids_is_vllms_shape() -> None:
    async with mock_vllm() as (_, client):
        response = await client.post(
            "/v1/completions",
            json={"model": "mock", "prompt": PROMPT, "max_tokens": 6, "return_token_ids": True},
            headers={"X-Request-Id": "req-7"},
        )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["id"] == "cmpl-req-7" and body["object"] == "text_completion"
    assert body["model"] == "mock" and body["system_fingerprint"].startswith("vllm-")
    (choice,) = body["choices"]
    assert choice["token_ids"] == mock_continuation(PROMPT, 6)
    assert choice["prompt_token_ids"] == PROMPT
    assert choice["finish_reason"] == "length" and choice["stop_reason"] is None
    assert choice["text"] == "".join(f" t{t}" for t in choice["token_ids"])
    for key in ("logprobs", "prompt_logprobs", "routed_experts"):
        assert key in choice and choice[key] is None
    for key in ("kv_transfer_params", "ec_transfer_params", "metrics", "service_tier"):
        assert key in body and body[key] is None
    assert body["usage"] == {
        "prompt_tokens": 40,
        "total_tokens": 46,
        "completion_tokens": 6,
        "prompt_tokens_details": {
            "cached_tokens": 0,
            "created_cache_tokens": None,
            "multimodal_tokens": None,
        },
        "completion_tokens_details": None,
    }


async def test_without_return_token_ids_the_keys_are_null() -> None:
    async with mock_vllm() as (_, client):
        body = (await client.post("/v1/completions", json={"prompt": PROMPT})).json()
    (choice,) = body["choices"]
    assert choice["token_ids"] is None and choice["prompt_token_ids"] is None
    assert body["usage"]["completion_tokens"] == 16  # vLLM's default max_tokens


async def test_stream_carries_one_token_per_chunk_then_usage_then_done() -> None:
    request = {
        "prompt": PROMPT,
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
    }
    async with (
        mock_vllm() as (_, client),
        client.stream("POST", "/v1/completions", json=request) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert response.headers["transfer-encoding"] == "chunked"
        lines = await sse_lines(response)
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    usage_chunk = chunks.pop()
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 5
    assert usage_chunk["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert [c["choices"][0]["token_ids"] for c in chunks] == [
        [t] for t in mock_continuation(PROMPT, 5)
    ]
    assert chunks[0]["choices"][0]["prompt_token_ids"] == PROMPT
    assert all(c["choices"][0]["prompt_token_ids"] is None for c in chunks[1:])
    assert all("usage" not in c for c in chunks)
    assert usage_chunk["system_fingerprint"].startswith("vllm-0.32.0")
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 4 + ["length"]
    assert len({c["id"] for c in [*chunks, usage_chunk]}) == 1


async def test_a_repeated_prompt_reports_its_cached_tokens() -> None:
    async with mock_vllm() as (_, client):
        request = {"prompt": PROMPT, "max_tokens": 2}
        first = (await client.post("/v1/completions", json=request)).json()
        second = (await client.post("/v1/completions", json=request)).json()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    # Two full blocks of 16 are cached; the partial third one never is.
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 32


async def test_text_prompts_and_tokenize_use_the_workers_tokenizer() -> None:
    async with mock_vllm(tokenizer=True) as (_, client):
        tokenized = (await client.post("/tokenize", json={"prompt": "hello"})).json()
        body = (
            await client.post(
                "/v1/completions",
                json={"prompt": "hello", "max_tokens": 3, "return_token_ids": True},
            )
        ).json()
        text = (await client.post("/detokenize", json={"tokens": [104, 105]})).json()
    assert tokenized == {
        "count": 5,
        "max_model_len": 32_768,
        "tokens": list(b"hello"),
        "token_strs": None,
    }
    assert body["choices"][0]["prompt_token_ids"] == list(b"hello")
    assert text == {"prompt": "hi"}


async def test_chat_renders_the_template_and_answers_text() -> None:
    messages = [{"role": "user", "content": "Say something."}]
    async with mock_vllm(tokenizer=True) as (_, client):
        tokenized = (await client.post("/tokenize", json={"messages": messages})).json()
        body = (
            await client.post(
                "/v1/chat/completions",
                json={"messages": messages, "max_tokens": 4, "return_token_ids": True},
            )
        ).json()
    rendered = "<|im_start|>user\nSay something.<|im_end|>\n<|im_start|>assistant\n"
    assert tokenized["tokens"] == ByteTokenizer().encode(rendered)
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["prompt_token_ids"] == tokenized["tokens"]
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == ByteTokenizer().decode(choice["token_ids"])


async def test_models_and_health() -> None:
    async with mock_vllm() as (_, client):
        models = (await client.get("/v1/models")).json()
        health = await client.get("/health")
    assert models["object"] == "list" and models["data"][0]["id"] == "mock"
    assert health.status_code == 200 and health.content == b""


def _openai_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


async def test_the_official_openai_client_streams_and_completes() -> None:
    async with mock_vllm(tokenizer=True) as (server, _):

        def call() -> tuple[Any, list[Any], Any]:
            with _openai_client(server.url) as client:
                chat = client.chat.completions.create(
                    model="mock",
                    messages=[{"role": "user", "content": "Hi"}],
                    max_tokens=5,
                    extra_body={"ignore_eos": True},
                )
                chunks = list(
                    client.chat.completions.create(
                        model="mock",
                        messages=[{"role": "user", "content": "Hi"}],
                        max_tokens=5,
                        stream=True,
                        stream_options={"include_usage": True},
                        extra_body={"ignore_eos": True},
                    )
                )
                completion = client.completions.create(
                    model="mock",
                    prompt=[1, 2, 3],
                    max_tokens=3,
                    extra_body={"return_token_ids": True, "ignore_eos": True},
                )
                return chat, chunks, completion

        chat, chunks, completion = await trio.to_thread.run_sync(call)
    assert chat.choices[0].finish_reason == "length" and chat.choices[0].message.content
    assert chat.usage.completion_tokens == 5
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == chat.choices[0].message.content  # same prompt, same seed
    ids = completion.choices[0].model_extra["token_ids"]
    assert len(ids) == 3 and completion.choices[0].text == ByteTokenizer().decode(ids)


def _metrics(text: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def _value(families: dict[str, Any], name: str, **labels: str) -> float:
    for family in families.values():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"no sample {name} {labels}")


async def test_metrics_have_vllms_names_and_labels() -> None:
    async with mock_vllm() as (server, client):
        request = {"prompt": PROMPT, "max_tokens": 3}
        await client.post("/v1/completions", json=request)
        await client.post("/v1/completions", json=request)
        idle = _metrics((await client.get("/metrics")).text)
        # The engine freezes after the stream's first chunk: it stays running, and a second
        # request waits.
        held = {"prompt": PROMPT, "max_tokens": 1000, "stream": True}
        headers = {"x-interlock-mock-fault": "freeze:after=1"}
        async with (
            client.stream("POST", "/v1/completions", json=held, headers=headers) as response,
            trio.open_nursery() as nursery,
        ):
            lines = response.aiter_lines()
            await next_events(lines, 1)
            waiter = functools.partial(client.post, json={"prompt": [7, 8, 9]})
            nursery.start_soon(waiter, "/v1/completions")
            await wait_until(lambda: server.engine.waiting_requests == 1)
            busy = _metrics((await client.get("/metrics")).text)
            nursery.cancel_scope.cancel()
    labels = {"engine": "0", "model_name": "mock"}
    assert _value(idle, "vllm:num_requests_running", **labels) == 0
    assert _value(busy, "vllm:num_requests_running", **labels) == 1
    assert _value(busy, "vllm:num_requests_waiting", **labels) == 1
    assert _value(busy, "vllm:kv_cache_usage_perc", **labels) > 0
    assert _value(idle, "vllm:num_requests_waiting", **labels) == 0
    assert _value(idle, "vllm:prefix_cache_queries_total", **labels) == 80
    assert _value(idle, "vllm:prefix_cache_hits_total", **labels) == 32
    assert _value(idle, "vllm:prompt_tokens_total", **labels) == 80
    assert _value(idle, "vllm:generation_tokens_total", **labels) == 6
    assert _value(idle, "vllm:request_success_total", finished_reason="length", **labels) == 2
    assert _value(idle, "vllm:external_prefix_cache_hits_total", **labels) == 0
    assert _value(idle, "vllm:cache_config_info", block_size="16", num_gpu_blocks="16384") == 1


async def test_a_client_that_leaves_aborts_its_request_and_frees_the_slot() -> None:
    async with mock_vllm() as (server, client):
        request = {"prompt": PROMPT, "max_tokens": 1000, "stream": True}
        headers = {"x-interlock-mock-fault": "freeze:after=2"}
        async with client.stream(
            "POST", "/v1/completions", json=request, headers=headers
        ) as response:
            lines = response.aiter_lines()
            await next_events(lines, 2)
            assert server.engine.active_requests == 1
        await wait_until(lambda: server.engine.active_requests == 0)
        state = (await client.get("/mock/state")).json()
    assert state["requests_cancelled"] == 1 and state["aborted"] == 1
    assert server.engine.kv_cache.active_blocks == 0
    assert server.stats.finished["abort"] == 1


async def test_a_client_gone_mid_stream_is_no_error_in_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A zero-time engine writes as fast as it can when the client leaves: whether the server
    # notices on its watch or in the middle of a write, it takes it quietly.
    async with mock_vllm() as (server, client):
        for _ in range(5):
            request = {"prompt": PROMPT, "max_tokens": 20_000, "stream": True}
            async with client.stream("POST", "/v1/completions", json=request) as response:
                lines = response.aiter_lines()
                await next_events(lines, 2)
            await wait_until(lambda: server.engine.active_requests == 0)
        assert (await client.get("/health")).status_code == 200
    errors = [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert errors == [], [r.getMessage() for r in errors]


async def test_a_handler_that_loses_its_client_ends_the_connection_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # What a send to a client that has gone raises inside the handler: it passes through the
    # nursery that watches the client, and must not be taken for the handler's own bug.
    import h11
    from trio.testing import memory_stream_pair

    from interlock.engines.mock._h11 import ConnectionLost, HttpRequest, HttpResponder, _handle

    async def handler(request: HttpRequest, responder: HttpResponder) -> None:
        raise ConnectionLost("the client went away")

    server, _client = memory_stream_pair()
    conn = h11.Connection(h11.SERVER)
    request = HttpRequest("POST", "/v1/completions", "", {}, b"{}")
    reusable = await _handle(handler, request, HttpResponder(server, conn), server, conn)  # type: ignore[arg-type]
    assert reusable is False
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []


#: (body, status, error type, param): what vLLM 0.32 answers (measured against the engine
#: tier; tests/engines/test_mock_matches_vllm.py keeps the two in step). "Bad Request" with
#: "body.<field>" is FastAPI's schema validation; "BadRequestError" is vLLM's own checks.
_SCHEMA = "Bad Request"
_CHECK = "BadRequestError"


def _json(value: object) -> bytes:
    return json.dumps(value).encode()


@pytest.mark.parametrize(
    ("body", "status", "kind", "param"),
    [
        (b"{not json", 400, _SCHEMA, None),
        (b"[1, 2]", 400, _SCHEMA, None),
        (_json({"prompt": 12}), 400, _SCHEMA, "body.prompt"),
        (_json({"prompt": [1, "a"]}), 400, _SCHEMA, "body.prompt"),
        (_json({"prompt": []}), 400, _CHECK, None),
        (_json({"prompt": [1, -2]}), 400, _CHECK, None),
        (_json({"prompt": [1, 40_000]}), 400, _CHECK, None),
        (_json({"prompt": [[1], [2]]}), 400, _CHECK, "prompt"),
        (_json({"prompt": [1], "model": "other"}), 404, "NotFoundError", "model"),
        (_json({"prompt": [1], "max_tokens": "many"}), 400, _SCHEMA, "body.max_tokens"),
        (_json({"prompt": [1], "max_tokens": 0}), 400, _CHECK, "max_tokens"),
        (_json({"prompt": [1], "max_tokens": 40_000}), 400, _CHECK, "max_tokens"),
        (_json({"prompt": [1] * 32_760, "max_tokens": 10}), 400, _CHECK, "max_tokens"),
        (_json({"prompt": [1], "min_tokens": 9, "max_tokens": 2}), 400, _CHECK, None),
        (_json({"prompt": [1], "n": 2}), 400, _CHECK, "n"),
        (_json({"prompt": [1], "logprobs": 2}), 400, _CHECK, "logprobs"),
        (
            _json({"prompt": [1], "stream_options": {"include_usage": True}}),
            400,
            _CHECK,
            "stream_options",
        ),
        (_json({"prompt": [1], "stop": [""]}), 400, _SCHEMA, "body.stop"),
        (_json({"prompt": [1], "temperature": "hot"}), 400, _SCHEMA, "body.temperature"),
        (_json({"prompt": [1], "temperature": -1}), 400, _CHECK, "temperature"),
        (_json({"prompt": [1], "stream": "yes"}), 400, _SCHEMA, "body.stream"),
        (
            _json({"prompt": [1], "kv_transfer_params": [1]}),
            400,
            _SCHEMA,
            "body.kv_transfer_params",
        ),
    ],
)
async def test_bad_input_is_a_4xx_with_vllms_error_body(
    body: bytes, status: int, kind: str, param: str | None
) -> None:
    async with mock_vllm() as (server, client):
        response = await client.post("/v1/completions", content=body)
        # The server carries on.
        assert (await client.get("/health")).status_code == 200
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == status and error["param"] == param and error["message"]
    assert error["type"] == kind
    assert server.engine.requests_started == 0


async def test_vllms_error_messages() -> None:
    async with mock_vllm() as (_, client):
        answers = [
            (await client.post("/v1/completions", json=body)).json()["error"]["message"]
            for body in (
                {"prompt": [1, 40_000]},
                {"prompt": []},
                {"prompt": [1], "model": "other"},
                {"prompt": [1], "max_tokens": 40_000},
                {"prompt": [1], "min_tokens": 9, "max_tokens": 2},
                {"prompt": [1], "stream_options": {"include_usage": True}},
            )
        ]
    assert answers == [
        "Token id 40000 is out of vocabulary",
        "You must pass at least one prompt",
        "The model `other` does not exist. Valid aliases: mock.",
        "max_tokens=40000 cannot be greater than max_model_len=32768. Please request fewer "
        "output tokens. (parameter=max_tokens, value=40000)",
        "min_tokens must be less than or equal to max_tokens=2, got 9.",
        "Stream options can only be defined when `stream=True`. (parameter=stream_options)",
    ]


async def test_bad_chat_messages_and_unknown_routes() -> None:
    async with mock_vllm() as (_, client):
        empty = await client.post("/v1/chat/completions", json={"messages": []})
        wrong = await client.post("/v1/chat/completions", json={"messages": [{"role": 3}]})
        route = await client.get("/v1/nothing")
        method = await client.get("/v1/completions")
        fault = await client.post(
            "/v1/completions",
            json={"prompt": [1]},
            headers={"x-interlock-mock-fault": "explode"},
        )
    assert empty.status_code == 400 and empty.json()["error"]["message"] == (
        "Cannot apply chat template to an empty conversation. Provide at least one message."
    )
    assert wrong.status_code == 400
    assert route.status_code == 404 and route.json() == {"detail": "Not Found"}
    assert method.status_code == 405
    assert fault.status_code == 400 and "explode" in fault.json()["error"]["message"]


async def test_sampling_options_pass_through_to_the_engine() -> None:
    async with mock_vllm() as (_, client):
        seeded = {"prompt": PROMPT, "max_tokens": 4, "seed": 5, "return_token_ids": True}
        a = (await client.post("/v1/completions", json=seeded)).json()
        b = (await client.post("/v1/completions", json={**seeded, "temperature": 0.7})).json()
        unseeded = (
            await client.post(
                "/v1/completions",
                json={"prompt": PROMPT, "max_tokens": 4, "return_token_ids": True},
            )
        ).json()
    expected = mock_continuation(PROMPT, 4, request_seed=5)
    assert a["choices"][0]["token_ids"] == b["choices"][0]["token_ids"] == expected
    assert unseeded["choices"][0]["token_ids"] != expected


async def test_stop_token_ids_and_min_tokens() -> None:
    continuation = mock_continuation(PROMPT, 6)
    stop = continuation[2]
    async with mock_vllm() as (_, client):
        stopped = (
            await client.post(
                "/v1/completions",
                json={
                    "prompt": PROMPT,
                    "max_tokens": 6,
                    "stop_token_ids": [stop],
                    "return_token_ids": True,
                },
            )
        ).json()
    (choice,) = stopped["choices"]
    assert choice["finish_reason"] == "stop"
    assert choice["token_ids"] == continuation[:2]
