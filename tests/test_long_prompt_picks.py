"""Picks of long prompts (issue 14's 100k-token pick): the tokenizer's ids go to the router
as they are (no u32 conversion to check them, the decision records the same tuple), and the
built-in byte tokenizer's prompts are preprocessed on the event loop up to where a thread
would pay off."""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import tokenizers
import trio
from test_gateway_ext_proc import (
    chat_body,
    exchange,
    immediate,
    picking,
    request_body,
    request_headers,
    response_headers,
    set_headers,
)

from interlock import Components, PipelineConfig, build_pipeline
from interlock.engines.mock import MockEngine
from interlock.http import HttpLimits, Preprocessor, build_app
from interlock.kv._hashing import known_u32
from interlock.processing import ByteTokenizer, ChatTemplate, HFTokenizer

#: About a 100k-token prompt with the byte tokenizer (one token per byte).
LONG_TEXT = "signal lever route switch " * 4_000


@attrs.frozen
class _ThreadRecordingPreprocessor(Preprocessor):
    """The built-in preprocessor, remembering which thread rendered each chat."""

    threads: list[threading.Thread] = attrs.field(factory=list)

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, object]],
        *,
        tools: Sequence[Mapping[str, object]] | None = None,
        add_generation_prompt: bool = True,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[int]:
        self.threads.append(threading.current_thread())
        return super().encode_chat(
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            template_kwargs=template_kwargs,
        )


async def _pick(picker: Any, body: bytes, request_id: str) -> str:
    """One pick of ``body`` through ``picker``'s ext_proc stream; the destination."""
    answers = await exchange(
        picker,
        [
            request_headers(extra=[("x-request-id", request_id)]),
            request_body(body, end_of_stream=True),
            response_headers(200, end_of_stream=True),
        ],
    )
    assert answers[0].WhichOneof("response") == "request_headers", answers[0]
    return set_headers(answers[0], "request_headers")["x-gateway-destination-endpoint"]


async def test_a_long_prompt_is_picked_with_the_tokenizers_ids_as_they_are(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limits = HttpLimits(max_model_len=200_000)
    async with picking(limits=limits) as p:
        body = chat_body(LONG_TEXT)
        await _pick(p.picker, body, "long-1")
        expected = p.preprocessor.encode_chat(json.loads(body)["messages"])
        (decision,) = [
            r.decision
            for r in p.pipeline.transition_log.records()
            if r.request_id == "long-1" and r.decision is not None
        ]
        assert decision.token_ids == tuple(expected)
        # The tokenizer made them: trusted, so neither the request's check nor the router's
        # lookup converted the whole prompt; the record holds the prompt itself, not a copy.
        assert known_u32(decision.token_ids)
        # Another pick of the same prompt is booked under its own id, with the same prompt.
        await _pick(p.picker, body, "long-2")
        assert await p.pipeline.load() == {}


async def test_the_builtin_tokenizers_long_prompts_are_preprocessed_on_the_event_loop(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tokenizer = ByteTokenizer()
    recording = _ThreadRecordingPreprocessor(tokenizer, tokenizer.chat_template)
    for limits, body, inline in (
        # ~100 KB: cheaper inline (~0.7 ms) than through a thread.
        (HttpLimits(max_model_len=200_000), chat_body(LONG_TEXT), True),
        # Over 256 KiB: a thread, so the event loop gets turns meanwhile.
        (HttpLimits(max_model_len=400_000), chat_body(LONG_TEXT * 3), False),
        # A limit given is the limit.
        (HttpLimits(max_model_len=200_000, offload_body_bytes=4096), chat_body(LONG_TEXT), False),
    ):
        recording.threads.clear()
        async with picking(limits=limits) as p:
            frontend = p.picker.frontend
            frontend.preprocessor = recording
            await _pick(p.picker, body, "long")
        (thread,) = recording.threads
        assert (thread is threading.main_thread()) == inline


async def test_the_offload_threshold_follows_the_tokenizer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    model = tokenizers.models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")
    hf = HFTokenizer(tokenizers.Tokenizer(model))
    for preprocessor, limits, expected in (
        (Preprocessor.default(), HttpLimits(), 256 * 1024),
        (Preprocessor(hf, ChatTemplate.chatml()), HttpLimits(), 64 * 1024),
        (Preprocessor.default(), HttpLimits(offload_body_bytes=1000), 1000),
    ):
        components = Components(workers=[MockEngine(1)], tokenizer=preprocessor.tokenizer)
        async with build_pipeline(PipelineConfig(), components) as pipeline:
            app = build_app(pipeline, preprocessor=preprocessor, limits=limits)
            assert app.state.frontend.offload_body_bytes == expected


class _AddingPreprocessor(Preprocessor):
    """An application's preprocessor that appends an id of its own, past u32."""

    def encode_chat(self, *args: Any, **kwargs: Any) -> list[int]:
        return [*super().encode_chat(*args, **kwargs), 2**40]


class _WideTokenizer:
    """A tokenizer of the application's own (not interlock's): one id per character, its code
    point times 2**32, so every id overflows u32 (a broken tokenizer the check must catch)."""

    vocab_size = 2**60
    eos_token_ids = (0,)
    chat_template = None

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) << 32 for c in text]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return "".join(chr(i >> 32) for i in ids)


async def test_only_interlocks_own_tokenizers_are_trusted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limits = HttpLimits(max_model_len=200_000)
    model = tokenizers.models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")
    raw = tokenizers.Tokenizer(model)
    raw.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    hf = Preprocessor(HFTokenizer(raw), ChatTemplate.chatml())
    wide = Preprocessor(_WideTokenizer(), ChatTemplate.chatml())  # type: ignore[arg-type]
    # An application's own preprocessor over a trusted tokenizer may still add ids of its own.
    adding = _AddingPreprocessor(HFTokenizer(raw), ChatTemplate.chatml())
    async with picking(limits=limits) as p:
        frontend = p.picker.frontend
        parsed_text = "a " * 5_000
        for preprocessor, trusted in ((hf, True), (wide, False), (adding, False)):
            frontend.preprocessor = preprocessor
            answers = await exchange(
                p.picker,
                [
                    request_headers(extra=[("x-request-id", "other")]),
                    request_body(chat_body(parsed_text), end_of_stream=True),
                ],
            )
            if trusted:
                assert answers[0].WhichOneof("response") == "request_headers"
            else:
                # Its ids are checked as a client's would be: 400, naming the field.
                status, body = immediate(answers)
                assert status == 400 and body["error"]["param"] == "token_ids", body
        assert await p.pipeline.load() == {}
