"""`SimulationClock`: virtual time that keeps the same time as trio's MockClock with
autojump, and the cheap timers mock engines step with."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

from interlock import PipelineConfig
from interlock.engines.mock import MockEngine, mock_continuation
from interlock.testing import (
    MockWorkerSpec,
    SimulationClock,
    WorkloadReport,
    open_simulated_cluster,
    run_simulation,
    shared_prefix_workload,
)
from interlock.wire import PreprocessedRequest


async def _sleepers(use_timers: bool) -> list[tuple[str, float]]:
    """Tasks sleeping through trio deadlines and (optionally) the clock's timers, interleaved."""
    woke: list[tuple[str, float]] = []
    clock = trio.lowlevel.current_clock()

    async def sleeper(name: str, gaps: list[float], timer: bool) -> None:
        for gap in gaps:
            if timer and isinstance(clock, SimulationClock):
                await clock.sleep_until(trio.current_time() + gap)
            else:
                await trio.sleep(gap)
            woke.append((name, trio.current_time()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sleeper, "a", [0.5, 0.25, 2.0], use_timers)
        nursery.start_soon(sleeper, "b", [0.1, 1.0, 0.3], False)
        nursery.start_soon(sleeper, "c", [3.0], use_timers)
    return woke


@pytest.mark.parametrize("use_timers", [False, True])
def test_time_advances_exactly_as_under_the_mock_clock(use_timers: bool) -> None:
    mock = trio.run(_sleepers, use_timers, clock=trio.testing.MockClock(autojump_threshold=0))
    ours = trio.run(_sleepers, use_timers, clock=SimulationClock())
    assert sorted(ours, key=lambda e: (e[1], e[0])) == sorted(mock, key=lambda e: (e[1], e[0]))
    assert [t for _, t in ours] == sorted(t for _, t in ours)  # nobody woke before their time


def test_time_starts_where_asked_and_stands_still_while_tasks_run() -> None:
    async def main() -> tuple[float, float, float]:
        before = trio.current_time()
        for _ in range(1000):
            await trio.lowlevel.checkpoint()
        during = trio.current_time()
        await trio.sleep(5)
        return before, during, trio.current_time()

    assert trio.run(main, clock=SimulationClock(start=100.0)) == (100.0, 100.0, 105.0)


def test_a_cancelled_timer_wakes_its_task_at_once_and_never_fires() -> None:
    clock = SimulationClock()

    async def main() -> tuple[float, float, int]:
        with trio.move_on_after(1.0):
            await clock.sleep_until(10.0)
        cancelled_at = trio.current_time()
        await trio.sleep(20.0)  # past the dead timer: it must not reschedule anyone
        checkpoints = 0
        for _ in range(3):
            await trio.lowlevel.checkpoint()
            checkpoints += 1
        return cancelled_at, trio.current_time(), checkpoints

    assert trio.run(main, clock=clock) == (1.0, 21.0, 3)


def test_a_deadline_already_passed_is_a_checkpoint() -> None:
    clock = SimulationClock(start=5.0)

    async def main() -> float:
        await clock.sleep_until(1.0)
        with trio.CancelScope() as scope:
            scope.cancel()
            await clock.sleep_until(0.0)  # still a checkpoint: the cancel is delivered
        assert scope.cancelled_caught
        return trio.current_time()

    assert trio.run(main, clock=clock) == 5.0


def test_timers_of_a_clock_not_running_are_refused() -> None:
    stray = SimulationClock()

    async def main() -> None:
        await stray.sleep_until(1.0)

    with pytest.raises(RuntimeError, match=r"clock=SimulationClock\(\) to trio\.run"):
        trio.run(main, clock=SimulationClock())


def test_jumps_go_forward_only() -> None:
    clock = SimulationClock()
    clock.jump(2.5)
    assert clock.current_time() == 2.5
    with pytest.raises(ValueError, match="only jump forward"):
        clock.jump(-1)


def test_with_nothing_scheduled_trio_blocks_rather_than_spinning() -> None:
    assert SimulationClock().deadline_to_sleep_time(math.inf) > 3600


def test_a_mock_engine_steps_on_the_clock_s_timers_with_the_reference_timing() -> None:
    """The same request takes the same virtual time on either clock, token for token."""

    async def main() -> list[float]:
        engine = MockEngine(0)
        stamps: list[float] = []
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            request = PreprocessedRequest(token_ids=list(range(1, 200)), max_tokens=20)
            async with engine.open_stream(request) as stream:
                tokens = []
                async for output in stream:
                    tokens.extend(output.token_ids)
                    stamps.append(trio.current_time())
            assert tokens == mock_continuation(request.token_ids, 20)
            nursery.cancel_scope.cancel()
        return stamps

    ours = trio.run(main, clock=SimulationClock())
    mock = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert ours == pytest.approx(mock, abs=1e-9)
    assert len(ours) == 20 and ours[0] > 0


def _cluster_report(clock: SimulationClock | trio.testing.MockClock) -> WorkloadReport:
    async def main() -> WorkloadReport:
        workload = shared_prefix_workload(seed=5, requests=40, rate=30)
        spec = MockWorkerSpec(num_gpu_blocks=1024)
        config = PipelineConfig(router_mode="kv")
        async with open_simulated_cluster(config, workers=3, worker_spec=spec) as cluster:
            return await cluster.run(workload)

    return run_simulation(main, seed=0, clock=clock)


def test_a_cluster_under_either_clock_serves_the_same_work() -> None:
    ours = _cluster_report(SimulationClock())
    mock = _cluster_report(trio.testing.MockClock(autojump_threshold=0))
    assert ours.completed == mock.completed == 40
    assert ours.output_tokens == mock.output_tokens
    assert ours.failed == mock.failed == 0


@pytest.fixture
def simulation_clock() -> SimulationClock:
    return SimulationClock()


async def test_pytest_trio_runs_a_test_on_a_simulation_clock_fixture(
    simulation_clock: SimulationClock,
) -> None:
    assert trio.lowlevel.current_clock() is simulation_clock
    async with open_simulated_cluster(workers=2) as cluster:
        report = await cluster.run(shared_prefix_workload(seed=1, requests=20, rate=10))
    assert report.completed == 20
    assert trio.current_time() > 1.0  # simulated seconds passed, no real ones
