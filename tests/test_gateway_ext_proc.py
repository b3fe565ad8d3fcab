"""interlock as a GAIE endpoint picker: the ext_proc handler driven with the message sequences
Envoy sends (xds-protos classes), in-process, under virtual time, over mock workers that stand
for HTTP engines (each has the ``base_url`` an OpenAI-compatible engine has)."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue, Metadata
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    HttpBody,
    HttpHeaders,
    HttpTrailers,
    ProcessingRequest,
    ProcessingResponse,
    ProtocolConfiguration,
)
from google.protobuf.struct_pb2 import Struct
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interlock import Components, PipelineConfig, build_pipeline
from interlock.engines.mock import MockEngine, MockTiming, mock_token_pool
from interlock.gateway import BODY_CHUNK_BYTES, ExtProcPicker
from interlock.http import HttpLimits, HttpMetrics, ModelRewrites, Preprocessor, build_app

KV = PipelineConfig(routing="query_only", router_mode="kv")


class HttpMock(MockEngine):
    """A mock worker with an HTTP endpoint, as an OpenAI-compatible engine has."""

    base_url: str | None = None


@attrs.define
class Picking:
    picker: ExtProcPicker
    pipeline: Any
    workers: list[HttpMock]
    preprocessor: Preprocessor

    def endpoint(self, worker_id: int) -> str:
        return f"10.0.0.{worker_id}:8000"


@asynccontextmanager
async def picking(
    config: PipelineConfig = KV,
    *,
    workers: int = 3,
    prefill_workers: int = 0,
    http: bool = True,
    limits: HttpLimits | None = None,
    model_rewrites: ModelRewrites | None = None,
) -> AsyncIterator[Picking]:
    preprocessor = Preprocessor.default()
    tokenizer = preprocessor.tokenizer
    common: dict[str, Any] = {
        "timing": MockTiming.zero(),
        "token_pool": mock_token_pool(tokenizer),
        "tokenizer": tokenizer,
        "block_size": config.kv_block_size,
    }
    role = "decode" if prefill_workers else "agg"
    engines = [HttpMock(i, role, **common) for i in range(1, workers + 1)]
    prefill = [
        HttpMock(i, "prefill", **common) for i in range(workers + 1, workers + prefill_workers + 1)
    ]
    for engine in engines + prefill:
        if http:
            engine.base_url = f"http://10.0.0.{engine.instance_id}:8000"
    metrics = HttpMetrics()
    components = Components(
        workers=engines, prefill_workers=prefill, tokenizer=tokenizer, transition_sinks=[metrics]
    )
    async with build_pipeline(config, components) as pipeline:
        app = build_app(
            pipeline,
            model="mock",
            preprocessor=preprocessor,
            metrics=metrics,
            limits=limits,
            model_rewrites=model_rewrites,
        )
        yield Picking(ExtProcPicker(app.state.frontend), pipeline, engines + prefill, preprocessor)


# -- what Envoy sends -------------------------------------------------------------------------


def request_headers(
    path: str = "/v1/chat/completions",
    *,
    method: str = "POST",
    extra: Iterable[tuple[str, str]] = (),
    end_of_stream: bool = False,
    subset: Sequence[str] | None = None,
    response_body_mode: ProcessingMode.ValueType = ProcessingMode.FULL_DUPLEX_STREAMED,
) -> ProcessingRequest:
    headers = [(":method", method), (":path", path), (":authority", "gw"), *extra]
    message = ProcessingRequest(
        request_headers=HttpHeaders(
            headers=HeaderMap(
                headers=[HeaderValue(key=k, raw_value=v.encode()) for k, v in headers]
            ),
            end_of_stream=end_of_stream,
        ),
        protocol_config=ProtocolConfiguration(
            request_body_mode=ProcessingMode.FULL_DUPLEX_STREAMED,
            response_body_mode=response_body_mode,
        ),
    )
    if subset is not None:
        hint = Struct()
        hint.update({"x-gateway-destination-endpoint-subset": list(subset)})
        message.metadata_context.CopyFrom(Metadata(filter_metadata={"envoy.lb.subset_hint": hint}))
    return message


def request_body(chunk: bytes, end_of_stream: bool = False) -> ProcessingRequest:
    return ProcessingRequest(request_body=HttpBody(body=chunk, end_of_stream=end_of_stream))


def response_headers(
    status: int = 200, *, served: str | None = None, end_of_stream: bool = False
) -> ProcessingRequest:
    message = ProcessingRequest(
        response_headers=HttpHeaders(
            headers=HeaderMap(headers=[HeaderValue(key=":status", raw_value=str(status).encode())]),
            end_of_stream=end_of_stream,
        )
    )
    if served is not None:
        lb = Struct()
        lb.update({"x-gateway-destination-endpoint-served": served})
        message.metadata_context.CopyFrom(Metadata(filter_metadata={"envoy.lb": lb}))
    return message


def response_body(chunk: bytes, end_of_stream: bool = False) -> ProcessingRequest:
    return ProcessingRequest(response_body=HttpBody(body=chunk, end_of_stream=end_of_stream))


def chat_body(text: str = "Route me, please.", model: str = "mock") -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": text}]}).encode()


def chunks(body: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(body)})
    edges = [0, *points, len(body)]
    return [body[a:b] for a, b in itertools.pairwise(edges)]


async def exchange(
    picker: ExtProcPicker, messages: Sequence[ProcessingRequest]
) -> list[ProcessingResponse]:
    """Every response to ``messages``, sent one after the other (the stream ends after)."""

    async def requests() -> AsyncIterator[ProcessingRequest]:
        for message in messages:
            yield message

    return [response async for response in picker.process(requests())]


def set_headers(response: ProcessingResponse, phase: str) -> dict[str, str]:
    common = getattr(response, phase).response
    return {h.header.key: h.header.raw_value.decode() for h in common.header_mutation.set_headers}


def body_back(responses: Iterable[ProcessingResponse]) -> tuple[bytes, list[int], bool]:
    """The request body the picker sent back, its chunk sizes, and whether the last ended it."""
    parts = [
        r.request_body.response.body_mutation.streamed_response
        for r in responses
        if r.WhichOneof("response") == "request_body"
    ]
    return b"".join(p.body for p in parts), [len(p.body) for p in parts], parts[-1].end_of_stream


def immediate(responses: list[ProcessingResponse]) -> tuple[int, dict[str, Any]]:
    assert len(responses) == 1, responses
    answer = responses[-1].immediate_response
    return answer.status.code, json.loads(answer.body)


async def load_is_zero(pipeline: Any) -> bool:
    await trio.testing.wait_all_tasks_blocked()
    return await pipeline.load() == {}


# -- the request path -------------------------------------------------------------------------


async def test_headers_then_body_in_chunks_picks_and_streams_the_body_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with picking() as p:
        body = chat_body("Hello " * 50)
        sent = [request_headers(extra=[("x-request-id", "envoy-1")])]
        sent += [request_body(c) for c in chunks(body, [10, 100, 200])]
        sent.append(request_body(b"", end_of_stream=True))
        send, receive = trio.open_memory_channel[ProcessingRequest](0)
        answers: list[ProcessingResponse] = []

        async def drive() -> None:
            async with receive:
                async for response in p.picker.process(receive):
                    answers.append(response)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drive)
            async with send:
                for message in sent:
                    await send.send(message)
                await trio.testing.wait_all_tasks_blocked()
                # The headers response and the body came back at the body's end, in order.
                assert [a.WhichOneof("response") for a in answers] == [
                    "request_headers",
                    "request_body",
                ]
                headers = set_headers(answers[0], "request_headers")
                destination = headers["x-gateway-destination-endpoint"]
                assert answers[0].request_headers.response.clear_route_cache
                lb = answers[0].dynamic_metadata.fields["envoy.lb"].struct_value
                assert lb.fields["x-gateway-destination-endpoint"].string_value == destination
                assert headers["content-length"] == str(len(body))
                endpoints = destination.split(",")
                assert sorted(endpoints) == sorted(p.endpoint(i) for i in (1, 2, 3))
                assert body_back(answers) == (body, [len(body)], True)
                # Booked on the pick until the response ends.
                picked = int(endpoints[0].split(".")[3].split(":")[0])
                load = await p.pipeline.load()
                assert set(load) == {picked} and load[picked].active_requests == 1
                assert p.picker.booked == {"envoy-1"}

                await send.send(response_headers(200))
                await trio.testing.wait_all_tasks_blocked()
                # No conformance selection header: the served endpoint is not echoed.
                assert set_headers(answers[-1], "response_headers") == {}
                await send.send(response_body(b'data: {"x": 1}\n\n'))
                await send.send(response_body(b"data: [DONE]\n\n", end_of_stream=True))
                await trio.testing.wait_all_tasks_blocked()
                passed = [
                    a.response_body.response.body_mutation.streamed_response for a in answers[-2:]
                ]
                assert [s.body for s in passed] == [b'data: {"x": 1}\n\n', b"data: [DONE]\n\n"]
                assert [s.end_of_stream for s in passed] == [False, True]
                assert await load_is_zero(p.pipeline)
        assert p.picker.booked == set()
        # The pick is a query in the transition log, with its decision.
        records = [r for r in p.pipeline.transition_log.records() if r.request_id == "envoy-1"]
        assert [r.dst for r in records][-1] == "done"
        assert any(r.decision is not None for r in records)


async def test_a_request_without_a_body_is_picked_at_once_and_not_booked(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with picking() as p:
        answers = await exchange(
            p.picker, [request_headers("/v1/models", method="GET", end_of_stream=True)]
        )
        assert [a.WhichOneof("response") for a in answers] == ["request_headers"]
        headers = set_headers(answers[0], "request_headers")
        assert headers["x-gateway-destination-endpoint"].split(",")[0] in {
            p.endpoint(i) for i in (1, 2, 3)
        }
        assert "content-length" not in headers
        assert await load_is_zero(p.pipeline)


async def test_a_body_over_the_limit_is_413_and_books_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with picking(limits=HttpLimits(max_body_bytes=2048)) as p:
        answers = await exchange(
            p.picker, [request_headers(), request_body(b"x" * 2000), request_body(b"y" * 100)]
        )
        status, error = immediate(answers)
        assert status == 413 and error["error"]["code"] == "request_too_large"
        assert await load_is_zero(p.pipeline)


async def test_bad_json_and_a_missing_model_are_400_with_openai_bodies(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with picking() as p:
        bad = await exchange(p.picker, [request_headers(), request_body(b"{nope", True)])
        status, error = immediate(bad)
        assert status == 400 and error["error"]["code"] == "invalid_json"
        assert set(error["error"]) == {"message", "type", "param", "code"}
        no_model = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
        missing = await exchange(p.picker, [request_headers(), request_body(no_model, True)])
        status, error = immediate(missing)
        assert status == 400 and error["error"]["param"] == "model"
        assert "model" in error["error"]["message"]
        other = await exchange(
            p.picker, [request_headers(), request_body(chat_body(model="gpt-4"), True)]
        )
        status, error = immediate(other)
        assert status == 404 and error["error"]["code"] == "model_not_found"
        bad_messages = json.dumps({"model": "mock", "messages": "hi"}).encode()
        status, error = immediate(
            await exchange(p.picker, [request_headers(), request_body(bad_messages, True)])
        )
        assert status == 400 and error["error"]["param"] == "messages"
        assert await load_is_zero(p.pipeline)


async def test_the_engine_checks_fields_the_prompt_does_not_need(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with picking() as p:
        body = json.dumps(
            {
                "model": "mock",
                "messages": [{"role": "user", "content": "hi"}],
                "logprobs": True,
                "top_logprobs": 5,
                "some_engine_extension": {"x": 1},
            }
        ).encode()
        answers = await exchange(p.picker, [request_headers(), request_body(body, True)])
        assert answers[0].WhichOneof("response") == "request_headers"
        assert body_back(answers)[0] == body


async def test_the_subset_hint_restricts_the_pick_and_its_fallbacks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with picking() as p:
        subset = [p.endpoint(2), p.endpoint(3)]
        for _ in range(4):
            answers = await exchange(
                p.picker,
                [request_headers(subset=subset), request_body(chat_body(), True)],
            )
            destination = set_headers(answers[0], "request_headers")[
                "x-gateway-destination-endpoint"
            ]
            assert sorted(destination.split(",")) == sorted(subset)
        nowhere = await exchange(
            p.picker, [request_headers(subset=["10.9.9.9:8000"]), request_body(chat_body(), True)]
        )
        status, error = immediate(nowhere)
        assert status == 503 and "subset hint" in error["error"]["message"]
        empty = await exchange(
            p.picker, [request_headers(subset=[]), request_body(chat_body(), True)]
        )
        assert immediate(empty)[0] == 503
        assert await load_is_zero(p.pipeline)


async def test_the_conformance_selection_header_picks_and_the_served_endpoint_is_echoed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with picking() as p:
        for worker in (3, 1, 2):
            selection = [("test-epp-endpoint-selection", p.endpoint(worker))]
            answers = await exchange(
                p.picker,
                [
                    request_headers(extra=selection),
                    request_body(chat_body(), True),
                    response_headers(200, end_of_stream=True),
                ],
            )
            headers = set_headers(answers[0], "request_headers")
            assert headers["x-gateway-destination-endpoint"] == p.endpoint(worker)
            echoed = set_headers(answers[-1], "response_headers")
            assert echoed == {"x-conformance-test-served-endpoint": p.endpoint(worker)}
        # A bare IP names every endpoint on that host (the conformance suite lists pod IPs).
        answers = await exchange(
            p.picker,
            [
                request_headers(extra=[("test-epp-endpoint-selection", "10.0.0.2")]),
                request_body(chat_body(), True),
            ],
        )
        headers = set_headers(answers[0], "request_headers")
        assert headers["x-gateway-destination-endpoint"] == p.endpoint(2)
        assert await load_is_zero(p.pipeline)


async def test_a_fallback_that_served_gets_the_load_and_a_5xx_counts_for_ejection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with picking() as p:
        sent = [
            request_headers(extra=[("x-request-id", "r-1")]),
            request_body(chat_body(), True),
        ]
        send, receive = trio.open_memory_channel[ProcessingRequest](0)
        answers: list[ProcessingResponse] = []

        async def drive() -> None:
            async with receive:
                async for response in p.picker.process(receive):
                    answers.append(response)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drive)
            async with send:
                for message in sent:
                    await send.send(message)
                await trio.testing.wait_all_tasks_blocked()
                endpoints = set_headers(answers[0], "request_headers")[
                    "x-gateway-destination-endpoint"
                ].split(",")
                fallback = endpoints[1]
                fallback_id = int(fallback.split(".")[3].split(":")[0])
                await send.send(response_headers(503, served=fallback))
                await trio.testing.wait_all_tasks_blocked()
                assert set_headers(answers[-1], "response_headers") == {}
                load = await p.pipeline.load()
                assert set(load) == {fallback_id} and load[fallback_id].active_requests == 1
                assert p.picker.booked == {"r-1-served"}
        assert await load_is_zero(p.pipeline)
        moved = [r for r in p.pipeline.transition_log.records() if r.request_id == "r-1-served"]
        assert moved and moved[-1].dst == "done"


async def test_without_response_bodies_prefill_ends_at_the_headers_and_the_booking_at_the_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # docs/gateway/envoy.yaml's mode: Envoy sends no response body, and keeps the stream open
    # (response trailers on) until the HTTP stream ends.
    async with picking() as p:
        send, receive = trio.open_memory_channel[ProcessingRequest](0)
        answers: list[ProcessingResponse] = []

        async def drive() -> None:
            async with receive:
                async for response in p.picker.process(receive):
                    answers.append(response)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drive)
            async with send:
                await send.send(
                    request_headers(
                        extra=[("x-request-id", "r-none")],
                        response_body_mode=ProcessingMode.NONE,
                    )
                )
                await send.send(request_body(chat_body("Hello " * 40), True))
                await trio.testing.wait_all_tasks_blocked()
                (load,) = (await p.pipeline.load()).values()
                assert load.active_requests == 1 and load.prefill_tokens > 0
                await send.send(response_headers(200))
                await trio.testing.wait_all_tasks_blocked()
                assert answers[-1].WhichOneof("response") == "response_headers"
                # The first output is on its way: prefill is done, the request still runs.
                (load,) = (await p.pipeline.load()).values()
                assert load.active_requests == 1 and load.prefill_tokens == 0
                assert p.picker.booked == {"r-none"}
            # The stream ends with the HTTP stream: the booking goes.
        assert await load_is_zero(p.pipeline)
        assert p.picker.booked == set()


async def test_a_dropped_stream_frees_its_booking_mid_body_and_mid_response(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with picking() as p:
        body = chat_body()
        mid_body = await exchange(p.picker, [request_headers(), request_body(body[:20])])
        assert mid_body == []
        mid_response = await exchange(
            p.picker,
            [
                request_headers(),
                request_body(body, True),
                response_headers(200),
                response_body(b"data: {}\n\n"),
            ],
        )
        assert len(mid_response) == 4
        assert await load_is_zero(p.pipeline)
        assert p.picker.booked == set()

        # Cancelled while its consumer waits (Envoy gone): the finally frees the booking.
        send, receive = trio.open_memory_channel[ProcessingRequest](0)
        with trio.move_on_after(5):
            async with trio.open_nursery() as nursery:

                async def drive() -> None:
                    async for _ in p.picker.process(receive):
                        pass

                nursery.start_soon(drive)
                await send.send(request_headers())
                await send.send(request_body(body, True))
                await trio.testing.wait_all_tasks_blocked()
                assert (await p.pipeline.load()) != {}
                nursery.cancel_scope.cancel()
        assert await load_is_zero(p.pipeline)


async def test_no_worker_with_an_http_endpoint_is_503(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with picking(http=False) as p:
        answers = await exchange(p.picker, [request_headers(), request_body(chat_body(), True)])
        status, error = immediate(answers)
        assert status == 503 and error["error"]["code"] == "no_workers_available"
        assert "HTTP endpoint" in error["error"]["message"]


async def test_a_saturated_pool_is_429(autojump_clock: trio.testing.MockClock) -> None:
    config = attrs.evolve(KV, max_inflight_per_worker=1, max_queued_requests=0)
    async with picking(config, workers=2) as p:
        send_a, receive_a = trio.open_memory_channel[ProcessingRequest](0)
        send_b, receive_b = trio.open_memory_channel[ProcessingRequest](0)
        async with trio.open_nursery() as nursery:
            for receive in (receive_a, receive_b):

                async def hold(receive: Any = receive) -> None:
                    async for _ in p.picker.process(receive):
                        pass

                nursery.start_soon(hold)
            for send in (send_a, send_b):
                await send.send(request_headers())
                await send.send(request_body(chat_body(), True))
            await trio.testing.wait_all_tasks_blocked()
            assert len(await p.pipeline.load()) == 2
            third = await exchange(p.picker, [request_headers(), request_body(chat_body(), True)])
            status, error = immediate(third)
            assert status == 429 and error["error"]["code"] == "overloaded"
            assert any(
                h.header.key == "retry-after"
                for h in third[0].immediate_response.headers.set_headers
            )
            await send_a.aclose()
            await send_b.aclose()
        assert await load_is_zero(p.pipeline)


async def test_while_draining_new_streams_get_503(autojump_clock: trio.testing.MockClock) -> None:
    async with picking() as p:
        assert p.picker.ready
        p.picker.frontend.drain.start()
        assert not p.picker.ready
        answers = await exchange(p.picker, [request_headers(), request_body(chat_body(), True)])
        status, error = immediate(answers)
        assert status == 503 and error["error"]["code"] == "shutting_down"


async def test_a_disaggregated_pick_names_the_prefill_endpoint(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with picking(workers=2, prefill_workers=1) as p:
        answers = await exchange(p.picker, [request_headers(), request_body(chat_body(), True)])
        headers = set_headers(answers[0], "request_headers")
        assert headers["x-prefiller-host-port"] == p.endpoint(3)
        assert headers["x-gateway-destination-endpoint"].split(",")[0] in {
            p.endpoint(1),
            p.endpoint(2),
        }
        assert p.endpoint(3) not in headers["x-gateway-destination-endpoint"]
        assert await load_is_zero(p.pipeline)


async def test_a_large_body_comes_back_in_chunks_of_at_most_62000_bytes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with picking(limits=HttpLimits(max_body_bytes=1 << 20)) as p:
        body = chat_body("lorem ipsum " * 20_000)
        sent = [request_headers()]
        sent += [request_body(c) for c in chunks(body, range(16_384, len(body), 16_384))]
        sent.append(request_body(b"", end_of_stream=True))
        answers = await exchange(p.picker, sent)
        back, sizes, ended = body_back(answers)
        assert back == body and ended
        assert max(sizes) == BODY_CHUNK_BYTES and len(sizes) == -(-len(body) // BODY_CHUNK_BYTES)


# -- any split of a body --------------------------------------------------------------------


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    text=st.text(min_size=1, max_size=400),
    cuts=st.lists(st.integers(min_value=1, max_value=2000), max_size=8),
    drop_after=st.none() | st.integers(min_value=0, max_value=12),
)
async def test_any_split_gives_the_same_pick_and_bytes_and_no_load_is_left(
    autojump_clock: trio.testing.MockClock, text: str, cuts: list[int], drop_after: int | None
) -> None:
    async with picking() as p:
        body = chat_body(text)
        whole = await exchange(p.picker, [request_headers(), request_body(body, True)])
        split = [request_headers()]
        split += [request_body(c) for c in chunks(body, cuts)]
        split[-1].request_body.end_of_stream = True
        split += [
            response_headers(200),
            response_body(b"data: 1\n\n"),
            response_body(b"", end_of_stream=True),
        ]
        body_sent = len(split) - 3  # the headers and every body chunk
        if drop_after is not None:
            split = split[:drop_after]
        answers = await exchange(p.picker, split)
        if len(split) >= body_sent:
            # Dropped (if at all) after the body: the pick was made, as for the whole body.
            assert set_headers(answers[0], "request_headers") == set_headers(
                whole[0], "request_headers"
            )
            assert body_back(answers)[0] == body_back(whole)[0] == body
        else:
            assert answers == []
        assert await load_is_zero(p.pipeline)
        assert p.picker.booked == set()


async def test_a_buffered_body_gets_the_pick_on_its_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with picking() as p:
        headers = request_headers()
        headers.protocol_config.request_body_mode = ProcessingMode.BUFFERED
        headers.protocol_config.response_body_mode = ProcessingMode.BUFFERED
        body = chat_body()
        answers = await exchange(
            p.picker,
            [
                headers,
                request_body(body, True),
                response_headers(200),
                response_body(b"{}", end_of_stream=True),
            ],
        )
        phases = [a.WhichOneof("response") for a in answers]
        assert phases == ["request_headers", "request_body", "response_headers", "response_body"]
        assert not answers[0].request_headers.response.HasField("header_mutation")
        picked = set_headers(answers[1], "request_body")
        assert picked["x-gateway-destination-endpoint"].split(",")[0] in {
            p.endpoint(i) for i in (1, 2, 3)
        }
        assert answers[1].request_body.response.clear_route_cache
        assert "envoy.lb" in answers[1].dynamic_metadata.fields
        assert not answers[3].response_body.response.HasField("body_mutation")
        assert await load_is_zero(p.pipeline)


async def test_a_body_ended_by_trailers_is_picked_at_the_trailers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with picking() as p:
        body = chat_body()
        answers = await exchange(
            p.picker,
            [
                request_headers(),
                request_body(body),
                ProcessingRequest(request_trailers=HttpTrailers()),
                response_headers(200, end_of_stream=True),
            ],
        )
        phases = [a.WhichOneof("response") for a in answers]
        assert phases == ["request_headers", "request_body", "request_trailers", "response_headers"]
        back, _, ended = body_back(answers)
        assert back == body and not ended
        assert await load_is_zero(p.pipeline)


async def test_two_streams_with_one_request_id_are_both_picked(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Envoy forwards a client's x-request-id as it came: two clients may send the same one.
    async with picking() as p:
        messages = [
            request_headers(extra=[("x-request-id", "same")]),
            request_body(chat_body(), True),
        ]
        answers: list[list[ProcessingResponse]] = []

        async def one() -> None:
            answers.append(await exchange(p.picker, messages))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one)
            nursery.start_soon(one)
        for responses in answers:
            assert [r.WhichOneof("response") for r in responses][:1] == ["request_headers"]
        assert await load_is_zero(p.pipeline)
        assert p.picker.booked == set()
