"""The mock engine's scheduler: reference timing, prefix caching, chunked prefill, sequence
and KV limits, preemption, and no KV block leaked whatever happens to a stream."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from interlock import RequestError
from interlock.engines.mock import MockEngine, mock_continuation
from interlock.wire import PreprocessedRequest


def _request(prompt: Sequence[int], max_tokens: int, **fields: object) -> PreprocessedRequest:
    return PreprocessedRequest(token_ids=list(prompt), max_tokens=max_tokens, **fields)  # type: ignore[arg-type]


class _Run:
    """One request's stream as it arrived: token ids, arrival times, final output."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.times: list[float] = []
        self.cached: int | None = None
        self.finish: str | None = None

    @property
    def ttft(self) -> float:
        return self.times[0]


async def _stream(engine: MockEngine, request: PreprocessedRequest, run: _Run) -> None:
    async with engine.open_stream(request) as stream:
        async for output in stream:
            if output.token_ids:
                run.tokens.extend(output.token_ids)
                run.times.append(trio.current_time())
            if output.finish_reason is not None:
                run.finish = output.finish_reason
                assert output.usage is not None
                run.cached = output.usage.cached_tokens


async def _serve(
    engine: MockEngine, requests: Sequence[tuple[float, PreprocessedRequest]]
) -> list[_Run]:
    """Start each request at its time (from now); return when all have ended."""
    runs = [_Run() for _ in requests]
    start = trio.current_time()

    async def one(at: float, request: PreprocessedRequest, run: _Run) -> None:
        await trio.sleep_until(start + at)
        await _stream(engine, request, run)

    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        async with trio.open_nursery() as clients:
            for (at, request), run in zip(requests, runs, strict=True):
                clients.start_soon(one, at, request, run)
        nursery.cancel_scope.cancel()
    return [_shift(run, start) for run in runs]


def _shift(run: _Run, start: float) -> _Run:
    run.times = [t - start for t in run.times]
    return run


def _ms(seconds: float) -> float:
    return seconds * 1000.0


# -- timing --------------------------------------------------------------------------------------


async def test_a_lone_request_takes_one_prefill_then_one_decode_step_a_token(
    autojump_clock: object,
) -> None:
    engine = MockEngine(0, block_size=16, num_gpu_blocks=1024)
    timing = engine.timing
    (run,) = await _serve(engine, [(0.0, _request(range(1, 101), 3))])
    # 100 prompt tokens (7 blocks with the tail) and then 101, 102: the cache is 7/1024 full.
    decode = timing.decode_seconds(7 / 1024)
    expected = [timing.prefill_seconds(100)]
    expected += [expected[-1] + decode, expected[-1] + 2 * decode]
    assert run.times == pytest.approx(expected)
    assert run.tokens == mock_continuation(list(range(1, 101)), 3)
    assert run.finish == "length"


async def test_a_cached_prefix_is_not_prefilled_again(autojump_clock: object) -> None:
    engine = MockEngine(0, block_size=16, num_gpu_blocks=1024)
    prompt = list(range(1, 101))
    first, second = await _serve(engine, [(0.0, _request(prompt, 2)), (5.0, _request(prompt, 2))])
    assert first.cached == 0
    assert second.cached == 96  # six full blocks; the tail is recomputed
    assert second.ttft - 5.0 == pytest.approx(engine.timing.prefill_seconds(4))
    assert second.tokens == first.tokens


# -- chunked prefill -----------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [True, False])
async def test_a_prompt_over_the_budget_is_prefilled_a_chunk_per_step(
    autojump_clock: object, chunked: bool
) -> None:
    engine = MockEngine(
        0,
        block_size=16,
        num_gpu_blocks=1024,
        max_num_batched_tokens=64,
        enable_chunked_prefill=chunked,
    )
    (run,) = await _serve(engine, [(0.0, _request(range(1, 201), 1))])
    prefill = engine.timing.prefill_seconds
    expected = 3 * prefill(64) + prefill(8) if chunked else prefill(200)
    assert run.ttft == pytest.approx(expected)


async def test_a_prompt_prefilled_over_several_steps_holds_its_blocks_once(
    autojump_clock: object,
) -> None:
    engine = MockEngine(0, block_size=16, num_gpu_blocks=1024, max_num_batched_tokens=64)
    held: list[int] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        async with engine.open_stream(_request(range(1, 193), 3)) as stream:
            async for output in stream:
                if output.finish_reason is None:  # the last one frees them
                    held.append(engine.kv_cache.active_blocks)
        nursery.cancel_scope.cancel()
    # 192 prompt tokens fill 12 blocks; the tokens after them go in a 13th.
    assert held == [13, 13]
    assert engine.kv_cache.active_blocks == 0


async def test_with_chunked_prefill_a_long_prompt_runs_beside_decoding_requests(
    autojump_clock: object,
) -> None:
    engine = MockEngine(0, block_size=16, num_gpu_blocks=4096, max_num_batched_tokens=256)
    short, long = await _serve(
        engine, [(0.0, _request(range(1, 33), 200)), (0.1, _request(range(100, 3100), 1))]
    )
    # The long prompt's 12 chunks interleave with the short request's decode steps ...
    assert long.ttft < short.times[-1]
    gaps = [b - a for a, b in zip(short.times, short.times[1:], strict=False)]
    chunk_step = engine.timing.prefill_seconds(256) + engine.timing.decode_seconds(1.0)
    assert max(gaps) <= chunk_step
    # ... and it takes no longer than its chunks and the decode steps beside them.
    assert long.ttft - 0.1 <= 12 * chunk_step + chunk_step


async def test_prefills_finish_in_arrival_order_even_behind_a_chunked_one(
    autojump_clock: object,
) -> None:
    engine = MockEngine(0, block_size=16, num_gpu_blocks=4096, max_num_batched_tokens=64)
    cached_prompt = list(range(1, 65))
    runs = await _serve(
        engine,
        [
            (0.0, _request(cached_prompt, 1)),  # leaves its four blocks cached
            (0.0, _request(range(5000, 5010), 400)),  # keeps the engine stepping
            (1.0, _request(range(10_000, 10_640), 2)),  # ten chunks of prefill
            (1.0001, _request(cached_prompt, 2)),  # nothing to prefill, but it came second
        ],
    )
    long, cached = runs[2], runs[3]
    assert cached.cached == 64
    assert cached.ttft >= long.ttft
    assert cached.tokens == mock_continuation(cached_prompt, 2)


async def test_without_chunked_prefill_a_long_prompt_waits_for_an_empty_batch(
    autojump_clock: object,
) -> None:
    engine = MockEngine(
        0,
        block_size=16,
        num_gpu_blocks=4096,
        max_num_batched_tokens=256,
        enable_chunked_prefill=False,
    )
    short, long = await _serve(
        engine, [(0.0, _request(range(1, 33), 200)), (0.1, _request(range(100, 3100), 1))]
    )
    assert long.ttft > short.times[-1]


# -- limits ----------------------------------------------------------------------------------------


async def test_at_most_max_num_seqs_run_and_the_rest_wait_in_order(autojump_clock: object) -> None:
    engine = MockEngine(0, block_size=16, num_gpu_blocks=1024, max_num_seqs=2)
    runs = await _serve(
        engine,
        [(i * 0.001, _request(range(i * 50 + 1, i * 50 + 40), 10 + i)) for i in range(5)],
    )
    assert all(len(r.tokens) == 10 + i for i, r in enumerate(runs))
    assert [r.ttft for r in runs] == sorted(r.ttft for r in runs)  # first come, first served
    for r in runs:  # never more than two streams between their first and last token
        assert sum(1 for o in runs if o.ttft <= r.ttft <= o.times[-1]) <= 2


async def test_a_prompt_that_fills_the_context_is_refused_not_queued(
    autojump_clock: object,
) -> None:
    engine = MockEngine(0, block_size=16, num_gpu_blocks=8)  # 128 tokens of KV in all
    assert engine.max_model_len == 128
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        with pytest.raises(RequestError, match=r"prompt of 128 tokens.*context is 128") as info:
            await _stream(engine, _request(range(1, 129), 4), _Run())
        assert info.value.field == "token_ids"
        run = _Run()
        await _stream(engine, _request(range(1, 100), 100), run)
        assert run.finish == "length" and len(run.tokens) == 128 - 99
        nursery.cancel_scope.cancel()


async def test_a_full_cache_preempts_the_newest_and_every_stream_still_completes(
    autojump_clock: object,
) -> None:
    engine = MockEngine(0, block_size=4, num_gpu_blocks=40, watermark=0.0)
    prompts = [list(range(i * 100 + 1, i * 100 + 21)) for i in range(4)]
    runs = await _serve(engine, [(0.0, _request(p, 30)) for p in prompts])
    assert engine.preemptions > 0
    for prompt, run in zip(prompts, runs, strict=True):
        assert run.tokens == mock_continuation(prompt, 30)
    assert engine.kv_cache.active_blocks == 0


# -- no leaks ----------------------------------------------------------------------------------


@st.composite
def _engine_loads(
    draw: st.DrawFn,
) -> tuple[dict[str, object], list[tuple[float, int, int, int, int]]]:
    block_size = draw(st.sampled_from([1, 4, 16]))
    shape: dict[str, object] = {
        "block_size": block_size,
        "num_gpu_blocks": draw(st.integers(8, 200)),
        "max_num_seqs": draw(st.integers(1, 6)),
        "max_num_batched_tokens": draw(st.integers(8, 300)),
        "enable_chunked_prefill": draw(st.booleans()),
        "watermark": draw(st.sampled_from([0.0, 0.01, 0.2])),
    }
    loads = draw(
        st.lists(
            st.tuples(
                st.floats(0, 2, allow_nan=False),  # arrival
                st.integers(0, 2),  # prompt family: equal prompts share all their blocks
                st.sampled_from([16, 64, 128]) | st.integers(1, 400),  # prompt length
                st.integers(1, 40),  # max tokens
                st.integers(0, 50),  # tokens read before leaving (50: read to the end)
            ),
            min_size=1,
            max_size=8,
        )
    )
    return shape, loads


@given(_engine_loads())
async def test_every_stream_ends_exactly_and_no_block_is_leaked(
    autojump_clock: object,
    engine_load: tuple[dict[str, object], list[tuple[float, int, int, int, int]]],
) -> None:
    shape, loads = engine_load
    engine = MockEngine(0, **shape)  # type: ignore[arg-type]
    start = trio.current_time()
    outcomes: list[str] = []

    async def one(at: float, family: int, length: int, max_tokens: int, read: int) -> None:
        await trio.sleep_until(start + at)
        prompt = list(range(family * 1000 + 1, family * 1000 + 1 + length))
        request = _request(prompt, max_tokens)
        tokens: list[int] = []
        try:
            async with engine.open_stream(request) as stream:
                async for output in stream:
                    tokens.extend(output.token_ids)
                    if len(tokens) >= read:
                        outcomes.append("left")
                        return
        except RequestError:
            assert len(prompt) >= engine.max_model_len
            outcomes.append("refused")
            return
        room = engine.max_model_len - len(prompt)
        assert tokens == mock_continuation(prompt, min(max_tokens, room))
        outcomes.append("done")

    with trio.fail_after(3600):
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            async with trio.open_nursery() as clients:
                for load in loads:
                    clients.start_soon(one, *load)
            nursery.cancel_scope.cancel()
    assert len(outcomes) == len(loads)
    assert engine.active_requests == 0
    assert engine.kv_cache.active_blocks == 0
    assert engine.kv_cache.used_blocks <= engine.num_gpu_blocks
