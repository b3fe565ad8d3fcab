"""The endpoint picker's response phases, answered by the gRPC server's thread without a hop
to trio (but for a booking to move): the response body passes back unchanged, chunk by chunk,
and the OpenAI ``usage`` it reports (a JSON body's, or a stream's last chunks') is counted in
the router's metrics, with a bounded part of the body kept, never the whole; the booking still
closes. In-process (`ExtProcPicker.process`), over grpcio, and through a real Envoy sending
response bodies as GAIE's reference configuration does."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import trio
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    HttpHeaders,
    HttpTrailers,
    ProcessingRequest,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_gateway_envoy import chat, nothing_booked, pool_behind_envoy
from test_gateway_ext_proc import (
    chat_body,
    chunks,
    exchange,
    load_is_zero,
    picking,
    request_body,
    request_headers,
    response_body,
    response_headers,
)
from test_gateway_server import Lockstep, in_thread, picked, server_streams, serving

from interlock.engines.openai import usage_from
from interlock.gateway._picker import USAGE_TAIL_BYTES, ExtProcStream, usage_of
from interlock.gateway._usage import UsageReader
from interlock.testing import InvariantViolation, check_invariants
from interlock.wire import Usage

TIMEOUT = 30.0


def usage_json(prompt: int, completion: int, cached: int | None = None) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if cached is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return usage


def json_body(text: str, usage: dict[str, Any], prompt_ids: int | None = None) -> bytes:
    """A chat answer; with ``prompt_ids``, as vLLM (and the mock engine) send it with
    ``return_token_ids``: ``prompt_logprobs``, ``prompt_token_ids`` (that many) and
    ``kv_transfer_params`` after ``usage``."""
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
        "usage": usage,
    }
    if prompt_ids is not None:
        body["prompt_logprobs"] = None
        body["prompt_token_ids"] = list(range(10_000, 10_000 + prompt_ids))
        body["kv_transfer_params"] = None
    return json.dumps(body).encode()


def sse_body(pieces: list[str], usage: dict[str, Any] | None) -> bytes:
    """A chat stream as vLLM sends it with ``stream_options.include_usage``: every content
    chunk says ``"usage": null``, then one chunk carries the usage, then ``[DONE]``."""
    events = [
        {"id": "c", "choices": [{"index": 0, "delta": {"content": p}}], "usage": None}
        for p in pieces
    ]
    if usage is not None:
        events.append({"id": "c", "choices": [], "usage": usage})
    lines = [f"data: {json.dumps(e)}\n\n" for e in events] + ["data: [DONE]\n\n"]
    return "".join(lines).encode()


# -- reading usage from a body's tail ------------------------------------------------------------


def test_usage_is_read_from_a_json_body_and_from_a_streams_last_chunks() -> None:
    assert usage_of(json_body("hi", usage_json(7, 3, 4))) == Usage(
        prompt_tokens=7, completion_tokens=3, cached_tokens=4
    )
    assert usage_of(sse_body(["a", "b"], usage_json(7, 3))) == Usage(
        prompt_tokens=7, completion_tokens=3, cached_tokens=0
    )


def test_no_usage_a_cut_one_and_usage_quoted_in_text_give_none() -> None:
    assert usage_of(sse_body(["a", "b"], None)) is None
    assert usage_of(b"") is None
    # The tail starts inside the usage object: nothing whole to read.
    assert usage_of(json_body("x", usage_json(7, 3))[-20:]) is None
    # A completion whose text talks about usage: inside a JSON string, quotes are escaped.
    assert (
        usage_of(sse_body(['"usage": {"prompt_tokens": 1, "completion_tokens": 1}'], None)) is None
    )
    assert usage_of(b'{"usage": {"prompt_tokens": 1, "completion_tokens": "two"}}') is None


def test_a_usage_with_a_negative_bool_or_float_count_is_ignored_whole() -> None:
    # A Prometheus counter must never go down, and a bool is no count.
    good = usage_json(5, 2, 1)
    assert usage_from(good) == Usage(prompt_tokens=5, completion_tokens=2, cached_tokens=1)
    for field, bad in [
        ("prompt_tokens", -1),
        ("completion_tokens", -500),
        ("prompt_tokens", True),
        ("completion_tokens", 2.0),
        ("prompt_tokens", None),
    ]:
        assert usage_from({**good, field: bad}) is None, (field, bad)
        assert usage_of(json_body("x", {**good, field: bad})) is None, (field, bad)
    for cached in [-3, False, "1"]:
        assert usage_from({**good, "prompt_tokens_details": {"cached_tokens": cached}}) is None
    # cached_tokens is optional: absent or null counts 0.
    assert usage_from({**good, "prompt_tokens_details": None}) == Usage(
        prompt_tokens=5, completion_tokens=2
    )
    assert usage_from({**good, "prompt_tokens_details": {"cached_tokens": None}}) == Usage(
        prompt_tokens=5, completion_tokens=2
    )


def test_a_deeply_nested_usage_value_is_none_and_raises_nothing() -> None:
    # json's decoder raises RecursionError (not a ValueError) past ~1,000 levels.
    assert usage_of(b'data: {"usage": ' + b"[" * 3000 + b"\n\n") is None
    assert usage_of(b'{"usage": ' + b'{"a": ' * 3000) is None
    assert usage_of(b'{"usage": ' + b'{"a": ' * 3000 + b"1" + b"}" * 3001) is None
    reader = UsageReader()
    reader.feed(b'{"usage": ' + b"[" * 30_000)
    assert reader.usage() is None


@pytest.mark.parametrize("size", [1, 7, 100, 8191, 8192, 8193, 20_000, 100_000])
def test_a_json_bodys_usage_is_found_wherever_it_is_and_little_is_kept(size: int) -> None:
    # vLLM's chat body with return_token_ids and a 2,000-token prompt: its usage is followed by
    # ~14 KB of prompt_token_ids, out of the body's last 8 KiB.
    body = json_body("hi", usage_json(2000, 5, 3), prompt_ids=2000)
    assert usage_of(body[-USAGE_TAIL_BYTES:]) is None
    reader = UsageReader()
    for part in chunks(body, range(0, len(body), size)):
        reader.feed(part)
        assert reader.kept <= USAGE_TAIL_BYTES
    assert reader.usage() == Usage(prompt_tokens=2000, completion_tokens=5, cached_tokens=3)


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet=st.sampled_from('ab\\"{}: usage'), max_size=400),
    counts=st.tuples(*(st.integers(0, 10**6) for _ in range(3))),
    prompt_ids=st.none() | st.integers(0, 3000),
    cuts=st.lists(st.integers(0, 40_000), max_size=200),
)
def test_a_json_bodys_usage_is_read_however_the_body_is_cut(
    text: str, counts: tuple[int, int, int], prompt_ids: int | None, cuts: list[int]
) -> None:
    # The text holds quotes, backslashes, braces and the word usage: only the real key counts.
    body = json_body(text, usage_json(*counts), prompt_ids)
    reader = UsageReader()
    for part in chunks(body, cuts):
        reader.feed(part)
        assert reader.kept <= USAGE_TAIL_BYTES
    prompt, completion, cached = counts
    assert reader.usage() == Usage(
        prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached
    )


def test_a_json_bodys_usage_key_quoted_in_text_or_a_value_is_not_its_usage() -> None:
    fake = '"usage": {"prompt_tokens": 1, "completion_tokens": 1}'
    filler = {"prompt_token_ids": list(range(5000)), "tag": "usage", "list": ["usage"] * 3}
    body = json.dumps({"choices": [{"text": fake}], **filler}).encode()
    reader = UsageReader()
    for part in chunks(body, range(0, len(body), 1000)):
        reader.feed(part)
    assert reader.usage() is None


@settings(
    max_examples=30,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    deadline=None,
)
@given(
    pieces=st.lists(st.text(min_size=0, max_size=300), max_size=60),
    counts=st.tuples(*(st.integers(0, 10**6) for _ in range(3))),
    stream=st.booleans(),
    cuts=st.lists(st.integers(0, 30_000), max_size=12),
    prompt_ids=st.none() | st.integers(0, 3000),
)
async def test_any_response_split_passes_back_unchanged_and_its_usage_is_counted(
    autojump_clock: trio.testing.MockClock,
    pieces: list[str],
    counts: tuple[int, int, int],
    stream: bool,
    cuts: list[int],
    prompt_ids: int | None,
) -> None:
    prompt, completion, cached = counts
    usage = usage_json(prompt, completion, cached)
    body = sse_body(pieces, usage) if stream else json_body("".join(pieces), usage, prompt_ids)
    parts = chunks(body, cuts) or [b""]
    async with picking() as p:
        messages = [request_headers(), request_body(chat_body(), True), response_headers(200)]
        messages += [response_body(c, i == len(parts) - 1) for i, c in enumerate(parts)]
        answers = await exchange(p.picker, messages)
        back = [
            a.response_body.response.body_mutation.streamed_response
            for a in answers
            if a.WhichOneof("response") == "response_body"
        ]
        assert [b.body for b in back] == parts, "each chunk passes back unchanged, in order"
        assert [b.end_of_stream for b in back] == [False] * (len(parts) - 1) + [True]
        tokens = p.picker.frontend.metrics.gateway_usage_tokens
        assert tokens == {"prompt": prompt, "completion": completion, "cached": cached}
        assert await load_is_zero(p.pipeline)


async def test_a_long_stream_keeps_only_a_bounded_tail(
    autojump_clock: trio.testing.MockClock,
) -> None:
    body = sse_body(["token "] * 20_000, usage_json(5, 20_000))
    assert len(body) > 100 * USAGE_TAIL_BYTES
    async with picking() as p:
        stream = p.picker.open_stream()
        messages = [request_headers(), request_body(chat_body(), True), response_headers(200)]
        parts = chunks(body, range(0, len(body), 1000))
        messages += [response_body(c) for c in parts]

        async def requests() -> Any:
            for message in messages:
                yield message
            # Mid-stream, before its end: only the tail is held.
            assert stream._usage.kept <= USAGE_TAIL_BYTES
            yield response_body(b"", True)

        async for _ in p.picker.process(requests(), stream):
            pass
        assert p.picker.frontend.metrics.gateway_usage_tokens["completion"] == 20_000
        assert stream.usage == Usage(prompt_tokens=5, completion_tokens=20_000)


async def test_the_usage_is_noted_after_the_picks_records_and_inspect_shows_it(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    async with picking() as p:
        messages = [
            request_headers(extra=[("x-request-id", "r-usage")]),
            request_body(chat_body(), True),
            response_headers(200),
            response_body(json_body("hello", usage_json(9, 2, 8)), True),
        ]
        await exchange(p.picker, messages)
        records = p.pipeline.transition_log.records("r-usage")
        check_invariants(records)  # a note after done, not a transition
        assert [(r.src, r.trigger, r.dst) for r in records][-2:] == [
            ("routed", "answer", "done"),
            ("done", "usage", "done"),
        ]
        note = records[-1]
        assert note.decision == Usage(prompt_tokens=9, completion_tokens=2, cached_tokens=8)
        assert note.worker_id == records[1].worker_id
        log = tmp_path / "transitions.jsonl"
        log.write_text("".join(json.dumps(r.to_json_dict()) + "\n" for r in records))
    inspect = [sys.executable, "-m", "interlock", "inspect", str(log)]
    shown = await trio.run_process([*inspect, "--request", "r-usage"], capture_stdout=True)
    text = shown.stdout.decode()
    assert "usage" in text and "prompt 9, completion 2, cached 8 tokens" in text
    # --validate exits non-zero on a path its mode's graph does not allow.
    await trio.run_process([*inspect, "--validate"], capture_stdout=True)
    # One usage note is allowed after the request's end, not two.
    second = {**records[-1].to_json_dict(), "seq": len(records)}
    with pytest.raises(InvariantViolation, match="a second usage note"):
        check_invariants([*(r.to_json_dict() for r in records), second])


async def test_a_vllm_chat_bodys_usage_before_its_prompt_token_ids_is_counted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # With return_token_ids and a 2,000-token prompt, ~14 KB of ids follow the usage.
    body = json_body("hi", usage_json(2000, 5, 1024), prompt_ids=2000)
    async with picking() as p:
        messages = [request_headers(), request_body(chat_body(), True), response_headers(200)]
        messages += [response_body(c) for c in chunks(body, range(0, len(body), 4000))]
        await exchange(p.picker, [*messages, response_body(b"", True)])
        tokens = p.picker.frontend.metrics.gateway_usage_tokens
        assert tokens == {"prompt": 2000, "completion": 5, "cached": 1024}


async def test_a_usage_with_a_negative_count_is_not_counted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with picking() as p:
        for prompt, completion in [(7, 3), (-500, 1), (4, -1)]:
            body = json_body("x", usage_json(prompt, completion))
            messages = [request_headers(), request_body(chat_body(), True), response_headers(200)]
            await exchange(p.picker, [*messages, response_body(body, True)])
        tokens = p.picker.frontend.metrics.gateway_usage_tokens
        assert tokens == {"prompt": 7, "completion": 3, "cached": 0}
        notes = [r for r in p.pipeline.transition_log.records() if r.trigger == "usage"]
        assert len(notes) == 1


# -- over grpcio: the server's thread answers the response phases ----------------------------------


async def test_over_grpc_response_chunks_come_back_at_once_and_the_usage_is_counted() -> None:
    body = sse_body(["x"] * 300, usage_json(11, 300, 8))
    parts = chunks(body, range(0, len(body), 700))
    async with serving() as s:
        stream = Lockstep(s.ext_proc)
        try:
            await picked(stream)
            assert len(s.picking.picker.booked) == 1
            stream.send(response_headers(200))
            answer = await in_thread(stream.receive)
            assert answer.WhichOneof("response") == "response_headers"
            for index, part in enumerate(parts):
                # Lockstep: each chunk is answered before the next is sent.
                stream.send(response_body(part, index == len(parts) - 1))
                answer = await in_thread(stream.receive)
                streamed = answer.response_body.response.body_mutation.streamed_response
                assert streamed.body == part
            await s.booked.until_free()
            stream.send(None)
            assert await in_thread(stream.rest) == []
            tokens = s.picking.picker.frontend.metrics.gateway_usage_tokens
            assert tokens == {"prompt": 11, "completion": 300, "cached": 8}
            assert await s.picking.pipeline.load() == {}
        finally:
            stream.close()


# -- through a real Envoy ------------------------------------------------------------------------

_USAGE = re.compile(r'^interlock_gateway_usage_tokens_total\{kind="(\w+)"\} (\S+)$', re.M)


async def usage_counted(route_url: str) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=route_url, timeout=TIMEOUT) as client:
        text = (await client.get("/metrics")).text
    return {kind: float(count) for kind, count in _USAGE.findall(text)}


async def test_through_envoy_with_response_bodies_the_usage_reaches_the_routers_metrics(
    tmp_path: Path,
) -> None:
    flags = ("--router-mode", "round_robin")
    gaie = {"response_body_mode": "FULL_DUPLEX_STREAMED", "response_trailer_mode": "SEND"}
    async with pool_behind_envoy(tmp_path, route_flags=flags, processing_mode=gaie) as pool:
        assert pool.route_url is not None
        client = pool.openai()
        seen = {"prompt": 0, "completion": 0}
        for n in range(2):
            answer = await trio.to_thread.run_sync(
                lambda n=n: client.chat.completions.create(**chat(f"count me {n}"))
            )
            assert answer.usage is not None
            seen["prompt"] += answer.usage.prompt_tokens
            seen["completion"] += answer.usage.completion_tokens

            def streamed(n: int = n) -> Any:
                body = chat(f"stream me {n}", stream=True, stream_options={"include_usage": True})
                return [c for c in client.chat.completions.create(**body) if c.usage]

            (last,) = await trio.to_thread.run_sync(streamed)
            seen["prompt"] += last.usage.prompt_tokens
            seen["completion"] += last.usage.completion_tokens
        # As vLLM's, the mock's chat body puts prompt_token_ids after usage: with a long prompt
        # the usage is far from the body's end.
        long = chat("count me " * 1000, extra_body={"return_token_ids": True})
        answer = await trio.to_thread.run_sync(lambda: client.chat.completions.create(**long))
        assert answer.usage is not None and answer.model_extra is not None
        assert len(json.dumps(answer.model_extra["prompt_token_ids"])) > USAGE_TAIL_BYTES
        seen["prompt"] += answer.usage.prompt_tokens
        seen["completion"] += answer.usage.completion_tokens
        await nothing_booked(pool)
        counted = await usage_counted(pool.route_url)
        assert counted["prompt"] == seen["prompt"] > 0
        assert counted["completion"] == seen["completion"] > 0


def trio_handled(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The phases of the messages the trio thread answers (`ExtProcStream.handle`), as they
    come."""
    handled: list[str] = []
    handle = ExtProcStream.handle

    async def counted(self: ExtProcStream, message: ProcessingRequest) -> Any:
        handled.append(message.WhichOneof("request"))
        return await handle(self, message)

    monkeypatch.setattr(ExtProcStream, "handle", counted)
    return handled


async def test_over_grpc_trailers_free_the_booking_and_the_stream_closes_without_trio(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As Envoy drives a stream with docs/gateway/envoy.yaml: no response body, the trailers on.
    handled = trio_handled(monkeypatch)
    opened = server_streams(monkeypatch)
    async with serving() as s:
        stream = Lockstep(s.ext_proc)
        try:
            await picked(stream)
            assert handled == ["request_body"], "the pick, in trio"
            stream.send(response_headers(200))
            answer = await in_thread(stream.receive)
            assert answer.WhichOneof("response") == "response_headers"
            stream.send(ProcessingRequest(response_trailers=HttpTrailers()))
            answer = await in_thread(stream.receive)
            assert answer.WhichOneof("response") == "response_trailers"
            stream.send(None)
            assert await in_thread(stream.rest) == []
            assert stream.call.code() == grpc.StatusCode.OK
            # The response phases were answered at once (`answer_now`), with no task of
            # their own; the stream's end freed the booking.
            assert handled == ["request_body"]
            (server_stream,) = opened
            assert server_stream.state.finished
            await s.booked.until_free()
            assert await s.picking.pipeline.load() == {}
        finally:
            stream.close()


async def test_over_grpc_a_half_close_before_the_response_ends_the_call_without_trio(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The gateway half-closes after the pick and the response headers, before any response end
    # (as bench_epp.py's lockstep client does): every message given to the stream's task is
    # answered, so the call ends at once and the task frees the booking as it takes the end.
    handled = trio_handled(monkeypatch)
    opened = server_streams(monkeypatch)
    async with serving() as s:
        stream = Lockstep(s.ext_proc)
        try:
            await picked(stream)
            stream.send(response_headers(200))
            answer = await in_thread(stream.receive)
            assert answer.WhichOneof("response") == "response_headers"
            stream.send(None)
            assert await in_thread(stream.rest) == []
            assert stream.call.code() == grpc.StatusCode.OK
            assert handled == ["request_body"], "only the pick, in trio"
            (server_stream,) = opened
            assert server_stream.state.finished and not server_stream.state.response_ended
            await s.booked.until_free()
            assert await s.picking.pipeline.load() == {}
        finally:
            stream.close()


# -- over grpcio: a failure or an odd message in the gRPC thread ends or passes, never hangs -------

#: A client deadline far below the 30 s of the other tests: a stream that hangs fails fast.
SHORT = 10.0


async def ended(stream: Lockstep) -> grpc.StatusCode:
    """Half-close ``stream``; the status it ends with (before its short deadline)."""
    stream.send(None)
    try:
        await in_thread(stream.rest)
    except grpc.RpcError as error:
        code: grpc.StatusCode = error.code()
        return code
    return grpc.StatusCode.OK


@pytest.mark.parametrize("after_pick", [False, True])
async def test_over_grpc_a_failure_answering_in_the_grpc_thread_ends_the_stream_internal(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, after_pick: bool
) -> None:
    def broken(self: ExtProcStream, message: ProcessingRequest) -> Any:
        raise RuntimeError("injected failure")

    # Answered in the gRPC thread: the request headers before the pick, the response's after.
    phase = "_response_headers" if after_pick else "_record_headers"
    monkeypatch.setattr(ExtProcStream, phase, broken)
    async with serving() as s:
        stream = Lockstep(s.ext_proc, timeout=SHORT)
        try:
            if after_pick:
                await picked(stream)
                assert len(s.booked) == 1
                stream.send(response_headers(200))
            else:
                stream.send(request_headers())
            assert await ended(stream) == grpc.StatusCode.INTERNAL
            assert "injected failure" in stream.call.details()
            await s.booked.until_free()
            assert await s.picking.pipeline.load() == {}
        finally:
            stream.close()
    assert "injected failure" in caplog.text


async def test_over_grpc_a_status_of_non_ascii_digits_is_no_status_and_the_stream_ends() -> None:
    # "\xb2".isdigit() is true but int() refuses it: read as no status (not a 5xx).
    odd = ProcessingRequest(
        response_headers=HttpHeaders(
            headers=HeaderMap(headers=[HeaderValue(key=":status", raw_value=b"\xb2")])
        )
    )
    async with serving() as s:
        stream = Lockstep(s.ext_proc, timeout=SHORT)
        try:
            await picked(stream)
            stream.send(odd)
            answer = await in_thread(stream.receive)
            assert answer.WhichOneof("response") == "response_headers"
            stream.send(ProcessingRequest(response_trailers=HttpTrailers()))
            await in_thread(stream.receive)
            assert await ended(stream) == grpc.StatusCode.OK
            await s.booked.until_free()
        finally:
            stream.close()


async def test_over_grpc_a_deeply_nested_usage_counts_nothing_and_the_stream_ends() -> None:
    nested = b'data: {"usage": ' + b"[" * 3000 + b"\n\n"
    async with serving() as s:
        stream = Lockstep(s.ext_proc, timeout=SHORT)
        try:
            await picked(stream)
            stream.send(response_headers(200))
            await in_thread(stream.receive)
            stream.send(response_body(nested, True))
            back = await in_thread(stream.receive)
            assert back.response_body.response.body_mutation.streamed_response.body == nested
            assert await ended(stream) == grpc.StatusCode.OK
            await s.booked.until_free()
            tokens = s.picking.picker.frontend.metrics.gateway_usage_tokens
            assert tokens == {"prompt": 0, "completion": 0, "cached": 0}
        finally:
            stream.close()


async def test_over_grpc_a_fallback_that_served_gets_the_booking_through_trio() -> None:
    # The one response phase that needs the router: the served worker is not the pick.
    async with serving() as s:
        stream = Lockstep(s.ext_proc)
        try:
            stream.send(request_headers(extra=[("x-request-id", "r-1")]))
            stream.send(request_body(chat_body(), True))
            answer = await in_thread(stream.receive)
            endpoints = answer.request_headers.response.header_mutation.set_headers
            (destination,) = [
                h.header.raw_value.decode()
                for h in endpoints
                if h.header.key == "x-gateway-destination-endpoint"
            ]
            fallback = destination.split(",")[1]
            await in_thread(stream.receive)  # the body, back
            stream.send(response_headers(200, served=fallback))
            answer = await in_thread(stream.receive)
            assert answer.WhichOneof("response") == "response_headers"
            assert s.picking.picker.booked == {"r-1-served"}
            load = await s.picking.pipeline.load()
            fallback_id = int(fallback.split(".")[3].split(":")[0])
            assert set(load) == {fallback_id}
            stream.send(ProcessingRequest(response_trailers=HttpTrailers()))
            await in_thread(stream.receive)
            stream.send(None)
            assert await in_thread(stream.rest) == []
            await s.booked.until_free()
            assert await s.picking.pipeline.load() == {}
        finally:
            stream.close()
