"""Stalls of streams the pipeline watches without a cancel scope per wait (`StallWatch`): those
of `interlock worker` connections (`RemoteEngine`, whose streams offer ``fail_waiting``).

The deadlines hold as with a scope: a stall is raised when the deadline passes (first token,
then idle), with the same message, and migrates (a prefill leg falls back to aggregated); a
consumer that keeps an output longer than ``engine_idle_timeout`` while the worker goes on is
not taken for a stalled worker, and one that keeps it while the worker is frozen gets the
stall at its next wait; the deadline never cancels the consumer's own awaits (and a property
over consumer pauses and freeze points: a stall iff the worker froze before the answer was
whole). In-process, on
virtual time (`MockEngine`s behind worker connections over in-memory streams:
test_remote_workers_heartbeat's `Worker`, test_whole_answers's `pipeline_over`).
"""

from __future__ import annotations

import re
from contextlib import AsyncExitStack

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_remote_workers_heartbeat import Worker
from test_whole_answers import PROMPT, first_worker, pipeline_over, request, timed, tokens_of

from interlock import Components, EngineError, PipelineConfig, WorkerStalled, build_pipeline
from interlock._stalls import RECHECK_GRACE, StallWatch
from interlock.engines.mock import MockEngine, mock_continuation
from interlock.engines.remote import RemoteEngine
from interlock.testing import check_invariants
from interlock.wire import PreprocessedRequest

TIMEOUTS = {"first_token_timeout": 3.0, "engine_idle_timeout": 2.0}
STALLED = r"worker 1 made no progress for .*\(first_token_timeout=3\.0, engine_idle_timeout=2\.0\)"


async def test_a_worker_frozen_before_its_first_token_is_a_stall_at_first_token_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    frozen = timed(1)
    frozen.stall(86_400)
    async with pipeline_over(frozen, migration_limit=0, **TIMEOUTS) as pipeline:
        started = trio.current_time()
        with pytest.raises(WorkerStalled, match=r"made no progress for 3s \(first_token_"):
            async for _ in pipeline.generate(request(), progress=False):
                pass
        assert trio.current_time() - started == pytest.approx(3.0)
        assert pipeline.stats.stalls == 1


async def test_a_worker_frozen_mid_stream_is_a_stall_and_migrates_with_every_token_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engines = {1: timed(1), 2: timed(2)}
    async with pipeline_over(
        *engines.values(), router_mode="round_robin", migration_limit=1, **TIMEOUTS
    ) as pipeline:
        outputs = []
        frozen = False
        async for output in pipeline.generate(request(), progress=True):
            outputs.append(output)
            if not frozen and len(tokens_of(outputs)) >= 5:
                engines[first_worker(pipeline.transition_log.records("r"))].stall(86_400)
                frozen = True
        assert pipeline.stats.stalls == 1 and pipeline.stats.migrations == 1
        records = pipeline.transition_log.records()
    assert tokens_of(outputs) == mock_continuation(PROMPT, len(tokens_of(outputs)))
    assert outputs[-1].finish_reason == "length"
    migrated = [r for r in records if r.trigger == "migrate"]
    assert len(migrated) == 1 and "no progress for" in (migrated[0].detail or "")
    check_invariants(records)


async def test_a_consumer_slower_than_the_idle_timeout_is_not_a_stalled_worker(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with pipeline_over(timed(1), migration_limit=0, **TIMEOUTS) as pipeline:
        outputs = []
        async for output in pipeline.generate(request(), progress=True):
            outputs.append(output)
            if len(outputs) in (1, 50):
                # Kept past engine_idle_timeout while the worker goes on producing.
                await trio.sleep(5)
        assert pipeline.stats.stalls == 0
    assert tokens_of(outputs) == mock_continuation(PROMPT, len(tokens_of(outputs)))
    assert outputs[-1].finish_reason == "length"


async def test_a_stall_while_the_consumer_holds_an_output_is_raised_at_its_next_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    frozen = timed(1)
    async with pipeline_over(frozen, migration_limit=0, **TIMEOUTS) as pipeline:
        slept = None
        with pytest.raises(WorkerStalled, match=STALLED):
            async for output in pipeline.generate(request(), progress=True):
                if output.token_ids and slept is None:
                    frozen.stall(86_400)
                    began = trio.current_time()
                    # The deadline passes during this await: it must not cancel it.
                    await trio.sleep(5)
                    slept = trio.current_time() - began
        assert slept == pytest.approx(5.0)
        assert pipeline.stats.stalls == 1


async def test_legs_that_end_leave_nothing_watched(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = MockEngine(1)
    async with pipeline_over(engine, **TIMEOUTS) as pipeline:
        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(_drain, pipeline, f"r{i}", i % 2 == 0)
        stalls = pipeline._stalls
        assert not stalls._first and not stalls._idle
        await trio.sleep(60)  # past every deadline those legs had: nothing fires
        assert pipeline.stats.stalls == 0


async def _drain(pipeline: object, request_id: str, progress: bool) -> None:
    async for _ in pipeline.generate(request(request_id), progress=progress):  # type: ignore[attr-defined]
        pass


async def test_a_prefill_worker_frozen_falls_back_to_aggregated_at_first_token_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    prefill, decode = MockEngine(1, role="prefill"), MockEngine(2, role="decode")
    prefill.stall(86_400)
    async with pipeline_over(prefill, decode, **TIMEOUTS) as pipeline:
        started = trio.current_time()
        outputs = [output async for output in pipeline.generate(request(), progress=False)]
        took = trio.current_time() - started
        assert pipeline.stats.stalls == 1 and pipeline.stats.fallbacks == 1
        records = pipeline.transition_log.records()
    assert took >= 3.0
    assert tokens_of(outputs) == mock_continuation(PROMPT, len(tokens_of(outputs)))
    fell_back = [r for r in records if r.trigger == "fall_back"]
    assert len(fell_back) == 1 and "made no progress for 3s" in (fell_back[0].detail or "")
    check_invariants(records)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(
    pauses=st.dictionaries(st.integers(0, 40), st.sampled_from((0.5, 1.9, 2.0, 2.1, 5.0))),
    freeze_after=st.none() | st.integers(1, 40),
    progress=st.booleans(),
)
async def test_a_stall_is_raised_iff_the_worker_froze_and_never_cuts_the_consumers_awaits(
    autojump_clock: trio.testing.MockClock,
    pauses: dict[int, float],
    freeze_after: int | None,
    progress: bool,
) -> None:
    engine = timed(1)
    req = PreprocessedRequest(token_ids=PROMPT, max_tokens=100, request_id="p")
    froze = False
    async with pipeline_over(engine, migration_limit=0, **TIMEOUTS) as pipeline:
        started = trio.current_time()
        outputs = []
        try:
            async for output in pipeline.generate(req, progress=progress):
                outputs.append(output)
                if not froze and freeze_after is not None:
                    froze = len(tokens_of(outputs)) >= freeze_after
                    if froze:
                        # Long past every deadline, short enough that waiting it out (a
                        # missed stall) fails fast: the worker's heartbeat runs meanwhile.
                        engine.stall(60)
                pause = pauses.get(len(outputs) - 1)
                if pause is not None:
                    began = trio.current_time()
                    await trio.sleep(pause)  # a slow client's write, past the deadline or not
                    assert trio.current_time() - began == pytest.approx(pause)
            stalled = False
        except WorkerStalled:
            stalled = True
        # The freeze is never waited out: either the answer was whole before it, or a stall.
        assert trio.current_time() - started < 60
        assert stalled == (len(tokens_of(outputs)) < 100)
        assert froze or not stalled, "a slow consumer was taken for a stalled worker"
        assert pipeline.stats.stalls == int(stalled)
        assert not pipeline._stalls._first and not pipeline._stalls._idle
    assert tokens_of(outputs) == mock_continuation(PROMPT, len(tokens_of(outputs)))
    if not stalled:
        assert outputs[-1].finish_reason == "length"


# -- the stall's message: how long the worker made no progress ----------------------------------


def _silence_in(exc: WorkerStalled) -> float:
    """The seconds of "made no progress for Xs" in a stall's message."""
    found = re.search(r"made no progress for (-?[0-9.e+-]+)s", str(exc))
    assert found is not None, str(exc)
    return float(found.group(1))


async def test_a_stall_seen_at_the_next_wait_reports_a_positive_silence(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The worker freezes after its first token while the consumer keeps that output 5 s
    # (past engine_idle_timeout=2): the stall is raised at the next wait, its deadline long
    # passed. The worker was silent 5 s; the message must not say a negative figure.
    frozen = timed(1)
    async with pipeline_over(frozen, migration_limit=0, **TIMEOUTS) as pipeline:
        with pytest.raises(WorkerStalled) as caught:
            async for output in pipeline.generate(request(), progress=True):
                if output.token_ids:
                    frozen.stall(86_400)
                    await trio.sleep(5)
    silence = _silence_in(caught.value)
    assert silence > 0, str(caught.value)
    assert silence >= TIMEOUTS["engine_idle_timeout"], str(caught.value)


async def test_a_stall_after_a_slow_consumer_reports_the_workers_whole_silence(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The consumer keeps the output 1.5 s (under engine_idle_timeout=2), then waits 0.5 s
    # more for an output that never comes: the worker made no progress for 2 s, at least
    # engine_idle_timeout, which the message names as the limit it broke.
    frozen = timed(1)
    async with pipeline_over(frozen, migration_limit=0, **TIMEOUTS) as pipeline:
        with pytest.raises(WorkerStalled) as caught:
            async for output in pipeline.generate(request(), progress=True):
                if output.token_ids:
                    frozen.stall(86_400)
                    await trio.sleep(1.5)
    assert _silence_in(caught.value) >= TIMEOUTS["engine_idle_timeout"], str(caught.value)


# -- a stall is counted iff a leg raises it ------------------------------------------------------


async def test_a_consumer_that_gives_up_as_the_deadline_passes_counts_no_stall(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The caller cancels its request at the very instant of first_token_timeout (a client's
    # own timeout, a disconnect): the request ends cancelled, no leg raises WorkerStalled and
    # the router hears of no stall, so pipeline.stats.stalls (interlock_stalls_total) must not
    # count one. With a scope per wait the caller's cancellation wins and nothing is counted;
    # the watch's task may run first in that batch, fail the wait and count it. Several
    # requests: trio orders the two wake-ups of one instant by its seeded shuffle.
    counted = []
    for i in range(8):
        frozen = timed(1)
        frozen.stall(86_400)
        async with pipeline_over(frozen, migration_limit=0, **TIMEOUTS) as pipeline:
            with trio.move_on_after(TIMEOUTS["first_token_timeout"]) as gave_up:
                async for _ in pipeline.generate(request(f"r{i}"), progress=True):
                    pass
            assert gave_up.cancelled_caught
            assert pipeline.stats.cancelled == 1
            counted.append(pipeline.stats.stalls)
    assert counted == [0] * 8


# -- an engine of the Engine protocol's fail_waiting whose stream takes time to open -------------


class _SlowOpen:
    """A `RemoteEngine` stream that first waits ``delay`` seconds (a connection to set up, as
    an engine's ``__aenter__`` may), then opens as usual."""

    def __init__(self, inner: object, delay: float) -> None:
        self._inner = inner
        self._delay = delay

    async def __aenter__(self) -> object:
        await trio.sleep(self._delay)
        return await self._inner.__aenter__()  # type: ignore[attr-defined]

    async def __aexit__(self, *exc: object) -> None:
        await self._inner.__aexit__(*exc)  # type: ignore[attr-defined]


async def test_a_leg_whose_stream_took_time_to_open_stalls_at_its_own_first_token_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The Engine protocol lets any engine's stream offer fail_waiting, and an engine's
    # __aenter__ may wait (connect, send). Request "slow" starts at 0 and its stream takes
    # 1 s to open; request "quick" starts at 0.5 and opens at once. Both workers are frozen:
    # "slow" must stall at 0 + first_token_timeout = 3, as with a scope; the watch keeps its
    # first-token deadlines in insertion order, so it finds "slow" (3.0) only behind "quick"
    # (3.5), and stalls it half a second late.
    class SlowOpening(RemoteEngine):
        delay = 0.0

        def open_stream(self, request: PreprocessedRequest) -> object:  # type: ignore[override]
            return _SlowOpen(super().open_stream(request), self.delay)

    engines = {1: timed(1), 2: timed(2)}
    ended: dict[str, float] = {}
    async with AsyncExitStack() as stack:
        remotes = []
        for engine in engines.values():
            engine.stall(86_400)
            worker = await stack.enter_async_context(Worker(engine).running())
            remotes.append(
                SlowOpening(
                    "worker", 1, instance_id=engine.instance_id, open_connection=worker.connect
                )
            )
        remotes[0].delay = 1.0
        config = PipelineConfig(router_mode="round_robin", migration_limit=0, **TIMEOUTS)
        pipeline = await stack.enter_async_context(
            build_pipeline(config, Components(workers=remotes))
        )
        started = trio.current_time()

        async def run(request_id: str) -> None:
            req = PreprocessedRequest(token_ids=PROMPT, max_tokens=10, request_id=request_id)
            with pytest.raises(WorkerStalled):
                async for _ in pipeline.generate(req, progress=True):
                    pass
            ended[request_id] = trio.current_time() - started

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "slow")
            await trio.sleep(0.5)
            nursery.start_soon(run, "quick")
        records = pipeline.transition_log.records()
    assert {first_worker([r for r in records if r.request_id == "slow"])} == {1}
    assert ended["quick"] == pytest.approx(3.5)
    assert ended["slow"] == pytest.approx(3.0)


class _Waiting:
    """A stream whose reader is always waiting: notes when the watch ended that wait."""

    def __init__(self) -> None:
        self.failed_at: float | None = None

    def fail_waiting(self, exc: EngineError) -> bool:
        self.failed_at = trio.current_time()
        return True


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(legs=st.lists(st.tuples(st.integers(0, 10), st.integers(0, 29)), min_size=1, max_size=12))
async def test_first_token_deadlines_watched_in_any_order_each_fail_at_their_own(
    autojump_clock: trio.testing.MockClock, legs: list[tuple[int, int]]
) -> None:
    # Each leg is watched ``gap`` tenths after the one before, its stream having taken
    # ``opening`` tenths to open: its deadline (its start + 3 s) may come before those of legs
    # watched earlier. Every wait must end at its own deadline, none later.
    watched: list[tuple[_Waiting, float]] = []
    async with trio.open_nursery() as nursery:
        watch = StallWatch(
            nursery, lambda worker_id, since: WorkerStalled("stalled", worker_id=worker_id)
        )
        for gap, opening in legs:
            await trio.sleep(gap / 10)
            since = trio.current_time() - opening / 10
            stream = _Waiting()
            leg = watch.watch(stream, 1, since, since + 3.0)
            assert leg is not None
            leg.waiting = True
            watched.append((stream, since + 3.0))
        await trio.sleep(60)
        assert not watch._first
        nursery.cancel_scope.cancel()
    assert [stream.failed_at for stream, _ in watched] == pytest.approx([d for _, d in watched])


class _SparedOnce:
    """A stream whose reader waits, and whose first `fail_waiting` finds bytes arrived (says
    False): part of an output, so the wait goes on unless the test moves the leg."""

    def __init__(self) -> None:
        self.asked_at: list[float] = []

    def fail_waiting(self, exc: EngineError) -> bool:
        self.asked_at.append(trio.current_time())
        return len(self.asked_at) > 1


async def test_a_wait_the_watch_spared_for_arrived_bytes_still_stalls_after_the_grace(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # fail_waiting says False when bytes reached the waiting reader (they may hold the final
    # output). If they were only part of an output the wait goes on: the watch must look
    # again, RECHECK_GRACE later, reporting the silence from the same ``since``; a leg whose
    # reader got an output meanwhile (moved) is not failed by that re-check.
    sinces: list[float] = []

    def stalled(worker_id: int, since: float) -> WorkerStalled:
        sinces.append(since)
        return WorkerStalled("stalled", worker_id=worker_id)

    frozen, flowing = _SparedOnce(), _SparedOnce()
    async with trio.open_nursery() as nursery:
        watch = StallWatch(nursery, stalled)
        legs = [watch.watch(stream, 1, 0.0, 3.0) for stream in (frozen, flowing)]
        for leg in legs:
            assert leg is not None
            leg.waiting = True
        await trio.sleep(3.0 + RECHECK_GRACE / 2)
        assert frozen.asked_at == flowing.asked_at == [3.0]
        assert legs[1] is not None
        watch.moved(legs[1], trio.current_time(), trio.current_time() + 60)
        await trio.sleep(30)
        nursery.cancel_scope.cancel()
    assert frozen.asked_at == [3.0, 3.0 + RECHECK_GRACE]
    assert flowing.asked_at == [3.0]
    assert sinces == [0.0, 0.0, 0.0]
    assert not watch._first and watch._idle
