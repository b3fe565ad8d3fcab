"""The mock's vLLM surface fails the way a real vLLM does on the wire (reference/vllm-cpu.md
section 5), chosen per request with the ``x-interlock-mock-fault`` header or for every request:
a 500 before the stream, a TCP reset mid-stream, vLLM's in-band error then ``[DONE]`` (a dead
EngineCore), a clean EOF without a terminating chunk (a killed API server), a stall while
``/health`` stays 200, slow tokens, and several tokens in one chunk (after a stall).

Byte-level facts are checked with a raw socket client; the rest with httpx.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import attrs
import httpx
import pytest
import trio
from helpers import wait_until
from test_mock_openai_surface import PROMPT, TIMEOUT, mock_vllm, next_events, sse_lines

from interlock.engines.mock import (
    FAULT_HEADER,
    FaultSpecError,
    MockFault,
    mock_continuation,
    parse_faults,
)
from interlock.engines.mock._http import ENGINE_DEAD_MESSAGE

STREAM = {"prompt": PROMPT, "max_tokens": 8, "stream": True, "return_token_ids": True}
_TERMINATING_CHUNK = b"0\r\n\r\n"


@attrs.frozen
class RawResponse:
    """Everything a raw client read until the connection ended, and how it ended."""

    data: bytes
    reset: bool

    @property
    def status(self) -> int:
        return int(self.data.split(b" ", 2)[1])


async def raw_post(url: str, path: str, body: dict[str, Any], fault: str) -> RawResponse:
    """POST with ``Connection: close`` and read until EOF or a reset."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(payload)}\r\n{FAULT_HEADER}: {fault}\r\nconnection: close\r\n\r\n"
    )
    stream = await trio.open_tcp_stream(host, int(port))
    received = bytearray()
    reset = False
    with trio.fail_after(TIMEOUT):
        await stream.send_all(head.encode() + payload)
        while True:
            try:
                data = await stream.receive_some()
            except trio.BrokenResourceError:
                reset = True
                break
            if not data:
                break
            received += data
    await stream.aclose()
    return RawResponse(bytes(received), reset)


def _sse_events(data: bytes) -> list[str]:
    """The ``data:`` payloads of a chunked SSE body read raw."""
    text = data.split(b"\r\n\r\n", 1)[1]
    return [line[6:].decode() for line in text.split(b"\n") if line.startswith(b"data: ")]


def _token_chunks(events: list[str]) -> list[dict[str, Any]]:
    return [json.loads(e) for e in events if e != "[DONE]" and "choices" in json.loads(e)]


async def test_a_normal_stream_ends_with_done_and_the_terminating_chunk() -> None:
    async with mock_vllm() as (server, _):
        raw = await raw_post(server.url, "/v1/completions", STREAM, "none")
    assert raw.status == 200 and not raw.reset
    assert raw.data.endswith(b"data: [DONE]\n\n\r\n" + _TERMINATING_CHUNK)
    events = _sse_events(raw.data)
    assert events[-1] == "[DONE]"
    assert _token_chunks(events)[-1]["choices"][0]["finish_reason"] == "length"


async def test_http500_before_the_stream_has_vllms_engine_dead_body() -> None:
    async with mock_vllm() as (server, client):
        streamed = await client.post(
            "/v1/completions", json=STREAM, headers={FAULT_HEADER: "http500"}
        )
        whole = await client.post(
            "/v1/completions", json={"prompt": PROMPT}, headers={FAULT_HEADER: "http500"}
        )
        assert (await client.get("/health")).status_code == 200
    for response in (streamed, whole):
        assert response.status_code == 500
        assert response.json() == {
            "error": {
                "message": ENGINE_DEAD_MESSAGE,
                "type": "InternalServerError",
                "param": None,
                "code": 500,
            }
        }
    assert server.engine.requests_started == 0


async def test_reset_mid_stream_is_a_tcp_reset_after_the_chunks_sent() -> None:
    async with mock_vllm() as (server, client):
        raw = await raw_post(server.url, "/v1/completions", STREAM, "reset:after=2")
        with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
            await client.post("/v1/completions", json=STREAM, headers={FAULT_HEADER: "reset"})
        await wait_until(lambda: server.engine.active_requests == 0)
    assert raw.reset and b"[DONE]" not in raw.data
    assert len(_token_chunks(_sse_events(raw.data))) <= 2
    assert server.engine.kv_cache.active_blocks == 0


async def test_in_band_error_then_done_like_a_dead_engine_core() -> None:
    async with mock_vllm() as (server, _):
        raw = await raw_post(server.url, "/v1/completions", STREAM, "error:after=3")
    assert raw.status == 200 and not raw.reset
    assert raw.data.endswith(_TERMINATING_CHUNK)
    events = _sse_events(raw.data)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2]) == {
        "error": {
            "message": ENGINE_DEAD_MESSAGE,
            "type": "InternalServerError",
            "param": None,
            "code": 500,
        }
    }
    # vLLM writes this one with json.dumps' default separators.
    assert events[-2].startswith('{"error": {"message": ')
    chunks = _token_chunks(events[:-2])
    assert len(chunks) == 3
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)


async def test_eof_is_a_clean_close_without_finish_done_or_terminating_chunk() -> None:
    async with mock_vllm() as (server, client):
        raw = await raw_post(server.url, "/v1/completions", STREAM, "eof:after=2")
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post(
                "/v1/completions", json={"prompt": PROMPT}, headers={FAULT_HEADER: "eof"}
            )
    assert raw.status == 200 and not raw.reset
    assert not raw.data.endswith(_TERMINATING_CHUNK)
    events = _sse_events(raw.data)
    assert "[DONE]" not in events
    chunks = _token_chunks(events)
    assert len(chunks) == 2
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)


async def test_a_stalled_stream_sends_nothing_while_health_stays_200() -> None:
    async with (
        mock_vllm() as (server, client),
        client.stream(
            "POST", "/v1/completions", json=STREAM, headers={FAULT_HEADER: "stall:after=1"}
        ) as response,
    ):
        lines = response.aiter_lines()
        await next_events(lines, 1)
        # The engine finished the request meanwhile; its answer is held back.
        await wait_until(lambda: server.engine.requests_finished == 1)
        assert (await client.get("/health")).status_code == 200
        with trio.move_on_after(0):
            await next_events(lines, 1)
            raise AssertionError("a stalled stream sent more")


async def test_after_a_stall_the_backlog_arrives_in_one_chunk() -> None:
    async with mock_vllm() as (_, client):
        request = {**STREAM, "max_tokens": 8}
        headers = {FAULT_HEADER: "stall:after=1,seconds=0.2"}
        async with client.stream(
            "POST", "/v1/completions", json=request, headers=headers
        ) as response:
            events = await sse_lines(response)
    chunks = _token_chunks(events)
    assert [len(c["choices"][0]["token_ids"]) for c in chunks] == [1, 7]
    ids = [t for c in chunks for t in c["choices"][0]["token_ids"]]
    assert ids == mock_continuation(PROMPT, 8)
    assert events[-1] == "[DONE]"


async def test_burst_puts_several_tokens_in_each_chunk() -> None:
    async with mock_vllm() as (_, client):
        headers = {FAULT_HEADER: "burst:after=1,tokens=3"}
        request = {**STREAM, "max_tokens": 7}
        async with client.stream(
            "POST", "/v1/completions", json=request, headers=headers
        ) as response:
            events = await sse_lines(response)
    chunks = _token_chunks(events)
    assert [len(c["choices"][0]["token_ids"]) for c in chunks] == [1, 3, 3]
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == mock_continuation(PROMPT, 7)
    assert "".join(c["choices"][0]["text"] for c in chunks) == "".join(
        f" t{t}" for t in mock_continuation(PROMPT, 7)
    )


async def test_slow_tokens_arrive_complete() -> None:
    async with mock_vllm() as (_, client):
        headers = {FAULT_HEADER: "slow:seconds=0.001"}
        async with client.stream(
            "POST", "/v1/completions", json=STREAM, headers=headers
        ) as response:
            events = await sse_lines(response)
    chunks = _token_chunks(events)
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == mock_continuation(PROMPT, 8)


async def test_a_frozen_engine_holds_every_request_and_health_stays_200() -> None:
    async with (
        mock_vllm() as (server, client),
        client.stream(
            "POST",
            "/v1/completions",
            json={**STREAM, "max_tokens": 1000},
            headers={FAULT_HEADER: "freeze:after=1"},
        ) as response,
    ):
        lines = response.aiter_lines()
        await next_events(lines, 1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(client.post, json={"prompt": [5, 6], "max_tokens": 2}),
                "/v1/completions",
            )
            await wait_until(lambda: server.engine.waiting_requests == 1)
            assert (await client.get("/health")).status_code == 200
            nursery.cancel_scope.cancel()
        assert server.engine.running_requests == 1


async def test_command_line_faults_apply_to_the_first_requests_only() -> None:
    faults = parse_faults("http500:times=2")
    async with mock_vllm(faults=faults) as (_, client):
        statuses = [
            (await client.post("/v1/completions", json={"prompt": [1, 2]})).status_code
            for _ in range(3)
        ]
        overridden = await client.post(
            "/v1/completions", json={"prompt": [1, 2]}, headers={FAULT_HEADER: "http500"}
        )
    assert statuses == [500, 500, 200]
    assert overridden.status_code == 500


async def test_a_header_of_none_turns_the_command_line_faults_off() -> None:
    async with mock_vllm(faults=parse_faults("eof")) as (_, client):
        response = await client.post(
            "/v1/completions", json={"prompt": [1, 2]}, headers={FAULT_HEADER: "none"}
        )
    assert response.status_code == 200


async def test_an_engine_crash_mid_stream_is_vllms_engine_death() -> None:
    async with mock_vllm(crash_after_tokens=3) as (server, client):
        async with client.stream("POST", "/v1/completions", json=STREAM) as response:
            events = await sse_lines(response)
        health = await client.get("/health")
        after = await client.post("/v1/completions", json={"prompt": [1, 2]})
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == 500
    assert all(c["choices"][0]["finish_reason"] is None for c in _token_chunks(events[:-2]))
    assert health.status_code == 503
    assert after.status_code == 500 and after.json()["error"]["message"] == ENGINE_DEAD_MESSAGE
    assert server.engine.is_down


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("none", ()),
        ("reset:after=3", (MockFault("reset", after=3),)),
        ("stall:after=2,seconds=1.5", (MockFault("stall", after=2, seconds=1.5),)),
        (
            "slow:seconds=0.1; eof:after=4,times=2",
            (MockFault("slow", seconds=0.1), MockFault("eof", after=4, times=2)),
        ),
        ("burst:tokens=4", (MockFault("burst", tokens=4),)),
    ],
)
def test_fault_specs_parse(spec: str, expected: tuple[MockFault, ...]) -> None:
    assert parse_faults(spec) == expected


@pytest.mark.parametrize(
    ("spec", "names"),
    [
        ("explode", "unknown fault 'explode'"),
        ("reset:after=-1", "after must be an integer >= 0"),
        ("slow", "needs seconds"),
        ("slow:seconds=nan", "seconds must be a number"),
        ("reset:seconds=1", "takes after, times"),
        ("reset;eof", "more than one fault that ends the stream"),
    ],
)
def test_bad_fault_specs_say_what_to_fix(spec: str, names: str) -> None:
    with pytest.raises(FaultSpecError, match=names):
        parse_faults(spec)
