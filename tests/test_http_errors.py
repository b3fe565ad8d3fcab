"""Bad inputs get the right 4xx with an OpenAI-style body; nothing a client sends is a 5xx."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_http_harness import CHAT, serving

from interlock.http import HttpLimits

MSG = [{"role": "user", "content": "x"}]


def _check_error(answer: httpx.Response, status: int, param: str | None) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert error["message"]
    return error


CASES: list[tuple[str, Any, int, str | None]] = [
    ("chat", {"model": "mock"}, 400, "messages"),
    ("chat", {"messages": MSG}, 400, "model"),
    ("chat", {"model": 7, "messages": MSG}, 400, "model"),
    ("chat", {"model": "gpt-4o", "messages": MSG}, 404, "model"),
    ("chat", {"model": "mock", "messages": []}, 400, "messages"),
    ("chat", {"model": "mock", "messages": "hi"}, 400, "messages"),
    ("chat", {"model": "mock", "messages": [{"role": "user"}]}, 400, "messages[0].content"),
    (
        "chat",
        {"model": "mock", "messages": [{"role": "wizard", "content": "x"}]},
        400,
        "messages[0].role",
    ),
    (
        "chat",
        {"model": "mock", "messages": [{"role": "user", "content": 5}]},
        400,
        "messages[0].content",
    ),
    (
        "chat",
        {"model": "mock", "messages": [{"role": "user", "content": "x", "nmae": "a"}]},
        400,
        "messages[0].nmae",
    ),
    ("chat", {"model": "mock", "messages": MSG, "max_tokens": -1}, 400, "max_tokens"),
    ("chat", {"model": "mock", "messages": MSG, "max_tokens": 0}, 400, "max_tokens"),
    ("chat", {"model": "mock", "messages": MSG, "max_tokens": 10**12}, 400, "max_tokens"),
    ("chat", {"model": "mock", "messages": MSG, "max_tokens": "10"}, 400, "max_tokens"),
    ("chat", {"model": "mock", "messages": MSG, "max_tokens": 1.5}, 400, "max_tokens"),
    ("chat", {"model": "mock", "messages": MSG, "max_tokens": True}, 400, "max_tokens"),
    ("chat", {"model": "mock", "messages": MSG, "max_tokens": 32_760}, 400, "messages"),
    (
        "chat",
        {"model": "mock", "messages": MSG, "max_completion_tokens": -5},
        400,
        "max_completion_tokens",
    ),
    ("chat", {"model": "mock", "messages": MSG, "temperature": 3}, 400, "temperature"),
    ("chat", {"model": "mock", "messages": MSG, "temperature": "hot"}, 400, "temperature"),
    ("chat", {"model": "mock", "messages": MSG, "top_p": -0.1}, 400, "top_p"),
    ("chat", {"model": "mock", "messages": MSG, "seed": -1}, 400, "seed"),
    ("chat", {"model": "mock", "messages": MSG, "stream": "yes"}, 400, "stream"),
    (
        "chat",
        {"model": "mock", "messages": MSG, "stream_options": {"include_usage": True}},
        400,
        "stream_options",
    ),
    (
        "chat",
        {"model": "mock", "messages": MSG, "stream": True, "stream_options": {"x": 1}},
        400,
        "stream_options.x",
    ),
    ("chat", {"model": "mock", "messages": MSG, "stop": ""}, 400, "stop[0]"),
    ("chat", {"model": "mock", "messages": MSG, "stop": ["a", 3]}, 400, "stop[1]"),
    ("chat", {"model": "mock", "messages": MSG, "stop": {"a": 1}}, 400, "stop"),
    (
        "chat",
        {"model": "mock", "messages": MSG, "stop_token_ids": [1, -1]},
        400,
        "stop_token_ids[1]",
    ),
    ("chat", {"model": "mock", "messages": MSG, "n": 2}, 400, "n"),
    ("chat", {"model": "mock", "messages": MSG, "logprobs": True}, 400, "logprobs"),
    ("chat", {"model": "mock", "messages": MSG, "presence_penalty": 1}, 400, "presence_penalty"),
    (
        "chat",
        {"model": "mock", "messages": MSG, "response_format": {"type": "json_object"}},
        400,
        "response_format",
    ),
    ("chat", {"model": "mock", "messages": MSG, "tool_choice": "required"}, 400, "tool_choice"),
    (
        "chat",
        {"model": "mock", "messages": MSG, "min_tokens": 5, "max_tokens": 2},
        400,
        "min_tokens",
    ),
    ("chat", {"model": "mock", "messages": MSG, "temprature": 1}, 400, "temprature"),
    (
        "chat",
        {"model": "mock", "messages": MSG, "chat_template_kwargs": []},
        400,
        "chat_template_kwargs",
    ),
    (
        "chat",
        {"model": "mock", "messages": MSG, "chat_template_kwargs": {"raise_exception": 1}},
        400,
        "messages",
    ),
    (
        "chat",
        {"model": "mock", "messages": [{"role": "user", "content": "\ud800"}]},
        400,
        "messages[0].content",
    ),
    ("chat", [1, 2], 400, None),
    ("chat", "hello", 400, None),
    ("completion", {"model": "mock"}, 400, "prompt"),
    ("completion", {"model": "mock", "prompt": ""}, 400, "prompt"),
    ("completion", {"model": "mock", "prompt": []}, 400, "prompt"),
    ("completion", {"model": "mock", "prompt": ["a", "b"]}, 400, "prompt"),
    ("completion", {"model": "mock", "prompt": [[1], [2]]}, 400, "prompt"),
    ("completion", {"model": "mock", "prompt": [1, "a"]}, 400, "prompt[1]"),
    ("completion", {"model": "mock", "prompt": [1, 10**6]}, 400, "prompt[1]"),
    ("completion", {"model": "mock", "prompt": "x", "echo": True}, 400, "echo"),
    ("completion", {"model": "mock", "prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("completion", {"model": "mock", "prompt": "x", "messages": MSG}, 400, "messages"),
]


@pytest.mark.parametrize(
    ("kind", "body", "status", "param"),
    CASES,
    ids=[f"{k}-{i}" for i, (k, *_rest) in enumerate(CASES)],
)
async def test_bad_bodies_get_the_right_4xx(
    kind: str, body: Any, status: int, param: str | None
) -> None:
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    async with serving() as served, served.client() as client:
        answer = await client.post(path, content=json.dumps(body))
        _check_error(answer, status, param)
        # The server is still fine afterwards.
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b"{'model': 1}",
        b"\xff\xfe{",
        b"[" * 100_000 + b"]" * 100_000,
        b"1e999999",
        b"NaN",
    ],
    ids=["empty", "truncated", "single-quotes", "bad-utf8", "deep", "huge-number", "nan"],
)
async def test_malformed_json_is_400(raw: bytes) -> None:
    async with serving() as served, served.client() as client:
        answer = await client.post(
            "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
        )
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["type"] == "invalid_request_error"


async def test_oversized_bodies_are_413_declared_or_streamed() -> None:
    limits = HttpLimits(max_body_bytes=64 * 1024)
    async with serving(limits=limits) as served, served.client() as client:
        big = {"model": "mock", "messages": [{"role": "user", "content": "x" * 100_000}]}
        declared = await client.post("/v1/chat/completions", json=big)
        _check_error(declared, 413, None)

        async def chunks() -> Any:
            for _ in range(20):
                yield b"x" * 8192

        streamed = await client.post("/v1/chat/completions", content=chunks())
        _check_error(streamed, 413, None)
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200


async def test_a_long_prompt_over_the_context_is_400() -> None:
    limits = HttpLimits(max_model_len=64)
    async with serving(limits=limits) as served, served.client() as client:
        body = {"model": "mock", "prompt": "y" * 100}
        error = _check_error(await client.post("/v1/completions", json=body), 400, "prompt")
    assert error["code"] == "context_length_exceeded"


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)
_fields = st.sampled_from(
    [
        "model", "messages", "prompt", "max_tokens", "stream", "stop", "temperature", "top_p",
        "seed", "n", "nvext", "stream_options", "min_tokens", "stop_token_ids", "ignore_eos",
        "tools", "chat_template_kwargs", "logprobs", "max_completion_tokens", "response_format",
    ]
)  # fmt: skip
_BASE = {"model": "mock", "messages": MSG, "prompt": "x", "max_tokens": 4}
_bodies = st.dictionaries(_fields, _json_values, max_size=4)


async def test_no_body_a_client_sends_is_a_server_error() -> None:
    # Hypothesis drives the bodies; one server answers them all, and must answer each with a
    # status below 500 (503 only if it had no worker, which it always has here).
    async with serving() as served, served.client() as client:
        answers: list[tuple[Any, int, str]] = []

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
        @given(kind=st.sampled_from(["chat", "completion"]), body=_bodies)
        def collect(kind: str, body: dict[str, Any]) -> None:
            bodies.append((kind, body))

        bodies: list[tuple[str, dict[str, Any]]] = []
        collect()
        with trio.fail_after(60):
            for kind, body in bodies:
                path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
                base = {
                    k: v
                    for k, v in _BASE.items()
                    if k != ("prompt" if kind == "chat" else "messages")
                }
                body = {**base, **body}
                if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 64:
                    body["max_tokens"] = 64  # keep the suite fast; validity is unchanged
                answer = await client.post(path, content=json.dumps(body))
                answers.append((body, answer.status_code, answer.text[:200]))
        await served.wait_idle()
    bad = [a for a in answers if a[1] >= 500]
    assert not bad, f"server errors for client input: {bad[:3]}"
    assert any(a[1] == 200 for a in answers) and any(a[1] == 400 for a in answers)


@pytest.mark.parametrize("stream", [False, True])
async def test_tokens_the_tokenizer_cannot_decode_are_a_502_not_a_client_error(
    stream: bool,
) -> None:
    # Workers that draw from a 32k vocabulary, in front of the 259-token byte tokenizer: a
    # server misconfiguration, which must not be blamed on the client.
    async with serving(engine_kwargs={"token_pool": None}) as served:
        async with served.client() as client:
            body = {**CHAT, "stream": stream, "ignore_eos": True}
            answer = await client.post("/v1/chat/completions", json=body)
        await served.wait_idle()
    if stream and answer.status_code == 200:
        assert '"code":"detokenization_failed"' in answer.text
        assert answer.text.endswith("data: [DONE]\n\n")
    else:
        assert answer.status_code == 502, answer.text
        assert answer.json()["error"]["code"] == "detokenization_failed"
