"""GAIE's model-name rewrite through the picker (docs/gateway.md#the-model-name-and-its-rewrite):
a request carrying ``x-gateway-model-name-rewrite: NAME`` is picked for NAME and reaches the
model server with ``"model": "NAME"`` (``Content-Length`` updated), and, when the gateway sends
response bodies through the picker, the responses say the name the client sent. Which names
the picker serves is the HTTP frontend's one rule (`Frontend.model_not_found`).

In-process under virtual time with the message sequences Envoy sends; the restorer's chunk
handling as a property over every split of a stream; and end to end through a real Envoy
(GAIE's reference modes) in front of ``interlock worker``s that serve only the rewritten name.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from hypothesis import given
from hypothesis import strategies as st
from test_gateway_envoy import chat, nothing_booked, pool_behind_envoy
from test_gateway_ext_proc import (
    body_back,
    chat_body,
    exchange,
    immediate,
    picking,
    request_body,
    request_headers,
    response_body,
    response_headers,
    set_headers,
)

from interlock.gateway import BODY_CHUNK_BYTES
from interlock.gateway._rewrite import MODEL_REWRITE_HEADER, ModelNameRestorer, rewrite_model
from interlock.http._errors import HttpError
from interlock.http._json import MAX_JSON_DEPTH

TIMEOUT = 30.0
ALIAS = "food-review"


def rewrite(model: str = "mock") -> list[tuple[str, str]]:
    return [(MODEL_REWRITE_HEADER, model)]


# -- the request -----------------------------------------------------------------------------------


async def test_the_body_reaches_the_server_with_the_rewritten_model(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sent = json.loads(chat_body(model=ALIAS))
    sent["max_tokens"] = 7
    sent["messages"][0]["content"] = "Ünïcode stays as it was"
    async with picking() as p:
        answers = await exchange(
            p.picker,
            [request_headers(extra=rewrite()), request_body(json.dumps(sent).encode(), True)],
        )
        headers = set_headers(answers[0], "request_headers")
        body, _, ended = body_back(answers)
        assert ended
        assert json.loads(body) == {**sent, "model": "mock"}
        assert headers["content-length"] == str(len(body))
        assert "x-gateway-destination-endpoint" in headers
        assert await p.pipeline.load() == {}


async def test_a_large_rewritten_body_comes_back_whole_in_chunks(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent = chat_body("y" * 300_000, model=ALIAS)
    trips: list[str] = []
    run_sync = trio.to_thread.run_sync

    async def counted(function: Any, *args: Any, **kwargs: Any) -> Any:
        trips.append(function.__name__)
        return await run_sync(function, *args, **kwargs)

    monkeypatch.setattr(trio.to_thread, "run_sync", counted)
    async with picking() as p:
        assert len(sent) > p.picker.frontend.offload_body_bytes
        halves = [sent[: len(sent) // 2], sent[len(sent) // 2 :]]
        answers = await exchange(
            p.picker,
            [
                request_headers(extra=rewrite()),
                request_body(halves[0]),
                request_body(halves[1], True),
            ],
        )
        body, sizes, ended = body_back(answers)
        assert ended and max(sizes) <= BODY_CHUNK_BYTES
        assert json.loads(body) == {**json.loads(sent), "model": "mock"}
        assert set_headers(answers[0], "request_headers")["content-length"] == str(len(body))
        # Rewritten and tokenized in one trip to a worker thread, not one each.
        assert trips == ["_prepared"]


async def test_a_body_naming_the_target_already_comes_back_byte_for_byte(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sent = b'{ "model" : "mock",  "messages": [{"role": "user", "content": "as sent"}] }'
    async with picking() as p:
        answers = await exchange(
            p.picker, [request_headers(extra=rewrite()), request_body(sent, True)]
        )
        assert body_back(answers)[0] == sent


async def test_the_served_name_is_checked_after_the_rewrite(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with picking() as p:
        # Without the header, a name the pool does not serve is a 404, as on interlock serve.
        status, error = immediate(
            await exchange(
                p.picker, [request_headers(), request_body(chat_body(model=ALIAS), True)]
            )
        )
        assert status == 404
        assert error["error"]["code"] == "model_not_found"
        assert error["error"]["message"] == (
            f"the model {ALIAS!r} does not exist; this pool serves 'mock'"
        )
        # Rewritten to a name the pool does not serve: the 404 names that name.
        status, error = immediate(
            await exchange(
                p.picker,
                [request_headers(extra=rewrite("lora-x")), request_body(chat_body(), True)],
            )
        )
        assert status == 404 and "'lora-x' does not exist" in error["error"]["message"]
        # Not JSON: the rewrite cannot read it, a 400 like any bad body.
        status, error = immediate(
            await exchange(p.picker, [request_headers(extra=rewrite()), request_body(b"{no", True)])
        )
        assert status == 400 and error["error"]["code"] == "invalid_json"
        assert await p.pipeline.load() == {}


def test_rewrite_model_leaves_what_it_cannot_rewrite_to_the_checks() -> None:
    for body in (b'{"messages": []}', b'{"model": 3}', b'{"model": "mock"}'):
        assert rewrite_model(body, "mock") == (body, None)
    body = b'{"model": "a", "n": 1}'
    data = json.loads(body)
    new, incoming = rewrite_model(body, "b", data)
    assert (json.loads(new), incoming) == ({"model": "b", "n": 1}, "a")
    # The decoded object given is changed in place (the picker's checked fields come from it).
    assert data == {"model": "b", "n": 1}
    # A lone surrogate has no UTF-8 and NaN no JSON: refused, naming the field, as without the
    # header (`json_object`), rather than written again.
    for body, field in (
        (b'{"model": "a", "content": "x\\ud800y"}', "content"),
        (b'{"model": "a", "t": NaN}', "t"),
    ):
        with pytest.raises(HttpError) as refused:
            rewrite_model(body, "b")
        assert (refused.value.status, refused.value.param) == (400, field)


async def test_a_buffered_body_comes_back_rewritten_whole_with_its_length(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Envoy's BUFFERED request bodies (another gateway's configuration): the pick rides on the
    # body's answer, which carries the rewritten body whole, with its Content-Length.
    sent = json.loads(chat_body("Ünïcode stays", model=ALIAS))
    async with picking() as p:
        for model, body in ((ALIAS, json.dumps(sent).encode()), ("mock", chat_body())):
            headers = request_headers(extra=rewrite())
            headers.protocol_config.request_body_mode = ProcessingMode.BUFFERED
            answers = await exchange(p.picker, [headers, request_body(body, True)])
            assert [a.WhichOneof("response") for a in answers] == [
                "request_headers",
                "request_body",
            ]
            common = answers[1].request_body.response
            length = int(set_headers(answers[1], "request_body")["content-length"])
            if model == ALIAS:
                forwarded = common.body_mutation.body
                assert json.loads(forwarded) == {**sent, "model": "mock"}
            else:  # nothing to rewrite: Envoy forwards the body it holds, unchanged
                assert not common.HasField("body_mutation")
                forwarded = body
            assert length == len(forwarded)
        assert await p.pipeline.load() == {}


async def test_a_lone_surrogate_is_the_same_400_with_the_rewrite_header_as_without(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # JSON's "\ud800" decodes to a str with no UTF-8: the prompt's checks refuse it (the
    # request's fault), and the rewrite, which writes the body again, must not turn that
    # into a 500.
    sent = b'{"model": "%s", "messages": [{"role": "user", "content": "a\\ud800b"}]}'
    async with picking() as p:
        plain = immediate(
            await exchange(p.picker, [request_headers(), request_body(sent % b"mock", True)])
        )
        rewritten = immediate(
            await exchange(
                p.picker,
                [request_headers(extra=rewrite()), request_body(sent % ALIAS.encode(), True)],
            )
        )
        assert plain[0] == 400, plain
        assert rewritten == plain
        assert await p.pipeline.load() == {}


async def test_a_body_without_a_model_is_the_same_400_with_the_rewrite_header_as_without(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The header names a served model, but the body names none ("" or no key): the body's
    # checks come before the rewrite, so the header cannot make a bad body a good one.
    async with picking() as p:
        for model in ("", None):
            sent = json.loads(chat_body())
            sent["model"] = model
            if model is None:
                del sent["model"]
            body = json.dumps(sent).encode()
            plain = immediate(
                await exchange(p.picker, [request_headers(), request_body(body, True)])
            )
            rewritten = immediate(
                await exchange(
                    p.picker, [request_headers(extra=rewrite()), request_body(body, True)]
                )
            )
            assert plain[0] == 400 and plain[1]["error"]["param"] == "model", plain
            assert rewritten == plain, (model, rewritten)
        assert await p.pipeline.load() == {}


async def test_a_body_at_any_depth_is_picked_or_a_400_never_a_500(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # msgspec parses a few levels deeper than json: bodies nested ~943-984 deep were parsed,
    # and the rewrite's json.dumps of them raised RecursionError, a 500. One limit for both:
    # up to MAX_JSON_DEPTH picked and rewritten, deeper a 400 naming it.
    async with picking() as p:
        for depth in (MAX_JSON_DEPTH, MAX_JSON_DEPTH + 1, 943, 960, 984, 990, 5000):
            inner = depth - 1  # the body's own object is a level
            sent = (
                b'{"model":"%s","messages":[{"role":"user","content":"hi"}],"x":' % ALIAS.encode()
                + b"[" * inner
                + b"]" * inner
                + b"}"
            )
            answers = await exchange(
                p.picker,
                [
                    request_headers(extra=[*rewrite(), ("x-request-id", f"d{depth}")]),
                    request_body(sent, True),
                    response_headers(200, end_of_stream=True),
                ],
            )
            if depth <= MAX_JSON_DEPTH:
                assert json.loads(body_back(answers)[0]) == {**json.loads(sent), "model": "mock"}
                continue
            status, error = immediate(answers[:1])
            assert status == 400, (depth, error)
            assert error["error"]["code"] == "invalid_json"
            assert f"more than {MAX_JSON_DEPTH} levels deep" in error["error"]["message"]
        await trio.testing.wait_all_tasks_blocked()
        assert await p.pipeline.load() == {}


# -- the response ----------------------------------------------------------------------------------


async def test_the_response_names_the_model_the_client_sent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    answer = json.dumps({"id": "c-1", "model": "mock", "choices": [{"text": "mock"}]}).encode()
    cut = answer.index(b"mock") + 2  # inside the field's value
    async with picking() as p:
        answers = await exchange(
            p.picker,
            [
                request_headers(extra=rewrite()),
                request_body(chat_body(model=ALIAS), True),
                response_headers(),
                response_body(answer[:cut]),
                response_body(answer[cut:], True),
            ],
        )
        back = b"".join(
            r.response_body.response.body_mutation.streamed_response.body
            for r in answers
            if r.WhichOneof("response") == "response_body"
        )
        # The field is the client's name; the text that merely says "mock" is left alone.
        assert json.loads(back) == {"id": "c-1", "model": ALIAS, "choices": [{"text": "mock"}]}
        assert await p.pipeline.load() == {}


async def test_what_is_held_back_goes_out_before_the_trailers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from envoy.service.ext_proc.v3.external_processor_pb2 import HttpTrailers, ProcessingRequest

    async with picking() as p:
        answers = await exchange(
            p.picker,
            [
                request_headers(extra=rewrite()),
                request_body(chat_body(model=ALIAS), True),
                response_headers(),
                response_body(b'data: {"model":"mo'),
                ProcessingRequest(response_trailers=HttpTrailers()),
            ],
        )
        phases = [r.WhichOneof("response") for r in answers]
        assert phases[-3:] == ["response_body", "response_body", "response_trailers"]
        tail = answers[-2].response_body.response.body_mutation.streamed_response
        assert answers[-3].response_body.response.body_mutation.streamed_response.body == b"data: {"
        assert tail.body == b'"model":"mo' and not tail.end_of_stream


SSE = (
    b"".join(
        b'data: {"id":"c","object":"chat.completion.chunk","model":"mock","choices":'
        + json.dumps([{"delta": {"content": f"mock {i}"}}]).encode()
        + b"}\n\n"
        for i in range(3)
    )
    + b'data: {"model" :  "mock", "usage": {}}\n\ndata: [DONE]\n\n'
)


@given(
    cuts=st.lists(st.integers(0, len(SSE)), max_size=12),
    incoming=st.sampled_from(["a", ALIAS, 'ü/"x"']),
)
def test_every_split_of_a_stream_is_restored_as_the_whole_would_be(
    cuts: list[int], incoming: str
) -> None:
    restorer = ModelNameRestorer("mock", incoming)
    edges = [0, *sorted(set(cuts)), len(SSE)]
    pieces = [SSE[a:b] for a, b in itertools.pairwise(edges)]
    out = b"".join(restorer.restore(piece) for piece in pieces[:-1])
    out += restorer.restore(pieces[-1], end_of_stream=True)
    expected = SSE.replace(
        b'"model":"mock"', b'"model":' + json.dumps(incoming, ensure_ascii=False).encode()
    )
    expected = expected.replace(
        b'"model" :  "mock"', b'"model" :  ' + json.dumps(incoming, ensure_ascii=False).encode()
    )
    # Only the fields change: the text that says "mock" stays.
    assert out == expected


# -- through a real Envoy ------------------------------------------------------------------------


async def test_through_envoy_the_server_sees_the_rewritten_name_and_the_client_its_own(
    tmp_path: Path,
) -> None:
    # GAIE's reference modes send the response body through the picker; the workers serve
    # "mock" only, so a request reaching one with the client's name would be a 404.
    gaie = {"response_body_mode": "FULL_DUPLEX_STREAMED", "response_trailer_mode": "SEND"}
    flags = ("--router-mode", "round_robin")
    async with pool_behind_envoy(tmp_path, route_flags=flags, processing_mode=gaie) as pool:
        headers = {MODEL_REWRITE_HEADER: "mock"}
        async with httpx.AsyncClient(base_url=pool.envoy.url, timeout=TIMEOUT) as client:
            answer = await client.post(
                "/v1/chat/completions", json={**chat("hello"), "model": ALIAS}, headers=headers
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["model"] == ALIAS
            events: list[dict[str, Any]] = []
            async with client.stream(
                "POST",
                "/v1/chat/completions",
                json={**chat("a stream", stream=True), "model": ALIAS},
                headers=headers,
            ) as stream:
                assert stream.status_code == 200
                async for line in stream.aiter_lines():
                    if line.startswith("data: {"):
                        events.append(json.loads(line[len("data: ") :]))
            assert events and {e["model"] for e in events} == {ALIAS}
            # Without the header the client's name reaches the picker, which serves "mock" only.
            refused = await client.post(
                "/v1/chat/completions", json={**chat("hello"), "model": ALIAS}
            )
            assert refused.status_code == 404
            assert refused.json()["error"]["code"] == "model_not_found"
        await nothing_booked(pool)


async def test_through_envoy_a_buffered_body_reaches_the_server_rewritten(
    tmp_path: Path,
) -> None:
    # Envoy buffering the request body (request_body_mode BUFFERED) hands the picker the
    # body whole; the rewritten one must replace it under its own Content-Length.
    buffered = {"request_body_mode": "BUFFERED"}
    flags = ("--router-mode", "round_robin")
    async with pool_behind_envoy(tmp_path, route_flags=flags, processing_mode=buffered) as pool:
        async with httpx.AsyncClient(base_url=pool.envoy.url, timeout=TIMEOUT) as client:
            for _ in range(2):  # both workers
                answer = await client.post(
                    "/v1/chat/completions",
                    json={**chat("hello, Ünïcode"), "model": ALIAS},
                    headers={MODEL_REWRITE_HEADER: "mock"},
                )
                # The workers serve "mock" only: a 200 is the rewritten body reaching one.
                assert answer.status_code == 200, answer.text
                # No response body goes through the picker here: the server's name stays.
                assert answer.json()["model"] == "mock"
            unchanged = await client.post(
                "/v1/chat/completions", json=chat("hello"), headers={MODEL_REWRITE_HEADER: "mock"}
            )
            assert unchanged.status_code == 200, unchanged.text
        await nothing_booked(pool)
