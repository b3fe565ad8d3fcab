"""The official ``openai`` client (sync, async, streaming) against a served instance.

The sync client blocks, so it runs in a worker thread; the async client is asyncio-based, so it
runs in a worker thread with its own event loop. The server runs in the test's trio run.
"""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest
import trio
from helpers import qwen3
from test_http_harness import serving

from interlock.engines.mock import MockTiming


def _sync_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


async def test_sync_chat_completion() -> None:
    async with serving() as served:

        def call() -> Any:
            with _sync_client(served.url) as client:
                return client.chat.completions.create(
                    model="mock",
                    messages=[{"role": "user", "content": "Say something."}],
                    max_tokens=12,
                    extra_body={"ignore_eos": True},
                )

        completion = await trio.to_thread.run_sync(call)
    choice = completion.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.role == "assistant" and choice.message.content
    assert completion.usage is not None and completion.usage.completion_tokens == 12
    assert completion.model == "mock" and completion.object == "chat.completion"


async def test_sync_streaming_chat_with_usage() -> None:
    async with serving() as served:

        def call() -> list[Any]:
            with _sync_client(served.url) as client:
                stream = client.chat.completions.create(
                    model="mock",
                    messages=[{"role": "user", "content": "Stream please."}],
                    max_tokens=10,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_body={"ignore_eos": True},
                )
                return list(stream)

        chunks = await trio.to_thread.run_sync(call)
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text, "the stream carried no text"
    assert with_choices[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 10


async def test_async_client_chat_and_completions_streaming_and_not() -> None:
    async with serving() as served:

        async def calls() -> tuple[Any, str, Any, str]:
            client = openai.AsyncOpenAI(
                base_url=served.url + "/v1", api_key="unused", max_retries=0
            )
            async with client:
                chat = await client.chat.completions.create(
                    model="mock", messages=[{"role": "user", "content": "Hi"}], max_tokens=5
                )
                streamed = ""
                async for chunk in await client.chat.completions.create(
                    model="mock",
                    messages=[{"role": "user", "content": "Hi"}],
                    max_tokens=5,
                    stream=True,
                ):
                    if chunk.choices:
                        streamed += chunk.choices[0].delta.content or ""
                completion = await client.completions.create(
                    model="mock", prompt="Once upon a time", max_tokens=6
                )
                text = ""
                async for piece in await client.completions.create(
                    model="mock", prompt="Once upon a time", max_tokens=6, stream=True
                ):
                    text += piece.choices[0].text
                return chat, streamed, completion, text

        chat, streamed, completion, text = await trio.to_thread.run_sync(
            lambda: asyncio.run(calls())
        )
    # The mock is deterministic: the same prompt gives the same answer, streamed or not.
    assert chat.choices[0].message.content == streamed
    assert completion.choices[0].text == text
    assert completion.object == "text_completion"


async def test_client_errors_are_typed() -> None:
    async with serving() as served:

        def call() -> list[type[Exception]]:
            errors: list[type[Exception]] = []
            with _sync_client(served.url) as client:
                for kwargs in (
                    {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]},
                    {"model": "mock", "messages": []},
                    {
                        "model": "mock",
                        "messages": [{"role": "user", "content": "x"}],
                        "max_tokens": -1,
                    },
                ):
                    try:
                        client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
                    except openai.APIStatusError as exc:
                        errors.append(type(exc))
            return errors

        errors = await trio.to_thread.run_sync(call)
    assert errors == [openai.NotFoundError, openai.BadRequestError, openai.BadRequestError]


async def test_stop_strings_through_the_client_with_a_real_tokenizer() -> None:
    preprocessor = qwen3()
    async with serving(preprocessor=preprocessor) as served:

        def call(stop: list[str] | None) -> Any:
            with _sync_client(served.url) as client:
                return client.chat.completions.create(
                    model="mock",
                    messages=[{"role": "user", "content": "Tell me about the river."}],
                    max_tokens=40,
                    stop=stop,
                    extra_body={"ignore_eos": True},
                )

        full = await trio.to_thread.run_sync(call, None)
        text = full.choices[0].message.content
        words = text.split()
        assert len(words) > 5, f"the mock should answer in words of the Qwen3 vocabulary: {text!r}"
        stop = " " + words[4]
        cut = await trio.to_thread.run_sync(call, [stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert stop not in cut.choices[0].message.content


@pytest.mark.parametrize("stream", [False, True])
async def test_engine_postprocessing_passes_the_engines_text_through(stream: bool) -> None:
    from interlock import PipelineConfig

    config = PipelineConfig(postprocessing="engine")
    async with serving(config, timing=MockTiming.zero()) as served, served.client() as client:
        body = {
            "model": "mock",
            "prompt": "abc",
            "max_tokens": 4,
            "ignore_eos": True,
            "stream": stream,
            "stream_options": {"include_usage": True} if stream else None,
        }
        answer = await client.post("/v1/completions", json=body)
    assert answer.status_code == 200
    if stream:
        assert answer.text.endswith(
            '"completion_tokens":4,"total_tokens":7,'
            '"prompt_tokens_details":{"cached_tokens":0}}}\n\ndata: [DONE]\n\n'
        )
    else:
        assert answer.json()["usage"]["completion_tokens"] == 4
        assert answer.json()["choices"][0]["text"]


@pytest.mark.parametrize("tokenizer", ["bytes", "qwen3"])
async def test_whole_answers_read_the_same_as_streamed_ones(tokenizer: str) -> None:
    # A whole answer is decoded once at the end, a stream piece by piece; the text must agree,
    # also when multi-byte characters span tokens (the byte pool below splits every one).
    import json

    from interlock.http import Preprocessor

    if tokenizer == "qwen3":
        preprocessor, kwargs = qwen3(), {}
    else:
        preprocessor = Preprocessor.default()
        kwargs = {"token_pool": list("héllo wörld ✓ naïve — ok".encode())}
    cluster = serving(preprocessor=preprocessor, engine_kwargs=kwargs)
    async with cluster as served, served.client() as client:
        for seed in range(6):
            body = {
                "model": "mock",
                "messages": [{"role": "user", "content": f"Story {seed}, please."}],
                "max_tokens": 30,
                "ignore_eos": True,
                "seed": seed,
            }
            whole = (await client.post("/v1/chat/completions", json=body)).json()
            streamed = await client.post("/v1/chat/completions", json={**body, "stream": True})
            text = ""
            for event in streamed.text.split("\n\n"):
                if event.startswith("data: {"):
                    for choice in json.loads(event[6:])["choices"]:
                        text += choice["delta"].get("content") or ""
            assert whole["choices"][0]["message"]["content"] == text, seed
