"""Properties of every valid configuration under random workloads and fault schedules, in
virtual time: paths follow the mode's graph, tokens arrive exactly once and in order, nothing
leaks, and a crashed router is restarted without losing requests.

Written with the public toolkit (`interlock.testing`): the strategies draw configurations,
requests and fault schedules; `open_simulated_cluster` runs the real pipeline over the mock
workers; `check_invariants` judges the transition log."""

from __future__ import annotations

from typing import Any

import attrs
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interlock import (
    InterlockError,
    PipelineConfig,
    PrefillFailed,
    RequestError,
)
from interlock.engines.mock import MockEngine, MockTiming, mock_continuation
from interlock.testing import Fault, open_simulated_cluster
from interlock.testing.strategies import (
    ALL_ROUTER_MODES,
    fault_schedules,
    requests,
    valid_configs,
)
from interlock.wire import PreprocessedRequest, RoutingHints


@attrs.frozen
class Scenario:
    config: PipelineConfig
    agg_ids: tuple[int, ...]
    prefill_ids: tuple[int, ...]
    decode_role: str
    speedup: float
    arrivals: tuple[tuple[float, PreprocessedRequest], ...]
    faults: tuple[Fault, ...]
    crash_after: tuple[int | None, ...]
    router_crashes: tuple[float, ...]

    @property
    def engine_faults(self) -> bool:
        return bool(self.faults) or any(n is not None for n in self.crash_after)


@st.composite
def scenarios(
    draw: st.DrawFn, configs: st.SearchStrategy[PipelineConfig] | None = None
) -> Scenario:
    config = draw(configs if configs is not None else valid_configs(router_modes=ALL_ROUTER_MODES))
    agg_ids = tuple(range(draw(st.integers(1, 4))))
    prefill_ids = tuple(range(10, 10 + draw(st.integers(0, 2))))
    decode_role = "decode" if bool(prefill_ids) and draw(st.booleans()) else "agg"
    if config.router_mode == "direct":
        config = config.evolve(direct_worker_id=draw(st.sampled_from(agg_ids)))
    arrivals = []
    for _ in range(draw(st.integers(1, 10))):
        request = draw(requests(max_prompt=48, max_tokens=32, sampling=True))
        hints = None
        if config.routing == "direct_to_known" or (
            config.allow_request_worker_ids and draw(st.booleans())
        ):
            prefill = (
                draw(st.sampled_from(prefill_ids))
                if prefill_ids and (config.enforce_disagg or draw(st.booleans()))
                else None
            )
            hints = RoutingHints(
                backend_instance_id=draw(st.sampled_from(agg_ids)), prefill_worker_id=prefill
            )
        arrivals.append(
            (draw(st.floats(0, 0.5, allow_nan=False)), attrs.evolve(request, routing=hints))
        )
    faults = draw(fault_schedules(list(agg_ids + prefill_ids), horizon=0.5))
    # Crashing after a number of tokens lands faults in the middle of streams.
    crash_after = tuple(
        draw(st.none() | st.integers(1, 40)) for _ in range(len(agg_ids) + len(prefill_ids))
    )
    crashes = draw(st.lists(st.floats(0, 0.5, allow_nan=False), max_size=2))
    return Scenario(
        config=config,
        agg_ids=agg_ids,
        prefill_ids=prefill_ids,
        decode_role=decode_role,
        speedup=draw(st.sampled_from([1.0, 20.0])),
        arrivals=tuple(arrivals),
        faults=tuple(faults),
        crash_after=crash_after,
        router_crashes=tuple(crashes),
    )


def expected_tokens(request: PreprocessedRequest) -> list[int]:
    """What the request must yield when it finishes: the mock continuation, cut at the first
    stop token past min_tokens (hidden) or at max_tokens."""
    assert request.max_tokens is not None
    reference = mock_continuation(
        request.token_ids, request.max_tokens, request_seed=request.sampling.seed or 0
    )
    stops = set(request.stop_token_ids)
    if not request.ignore_eos:
        stops |= set(request.eos_token_ids)
    for i, token in enumerate(reference):
        if token in stops and i >= request.min_tokens:
            return reference[:i]
    return reference


MIGRATING = st.builds(
    PipelineConfig,
    migration_limit=st.integers(1, 3),
    router_mode=st.sampled_from(["round_robin", "random"]),
    postprocessing=st.sampled_from(["frontend", "engine"]),
    enforce_disagg=st.booleans(),
    router_seed=st.integers(0, 1000),
)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(scenario=scenarios())
async def test_every_configuration_keeps_its_invariants(
    autojump_clock: object, scenario: Scenario
) -> None:
    await check_scenario(scenario)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(scenario=scenarios(MIGRATING))
async def test_migration_under_crashes_keeps_its_invariants(
    autojump_clock: object, scenario: Scenario
) -> None:
    await check_scenario(scenario)


async def check_scenario(scenario: Scenario) -> None:
    config = scenario.config
    timing = MockTiming(speedup_ratio=scenario.speedup)
    crash_after = iter(scenario.crash_after)
    agg = [
        MockEngine(
            i,
            role=scenario.decode_role,  # type: ignore[arg-type]
            timing=timing,
            crash_after_tokens=next(crash_after),
        )
        for i in scenario.agg_ids
    ]
    prefill = [
        MockEngine(i, role="prefill", timing=timing, crash_after_tokens=next(crash_after))
        for i in scenario.prefill_ids
    ]
    outcomes: dict[int, tuple[list[int], BaseException | None]] = {}

    async with open_simulated_cluster(
        config, workers=agg, prefill_workers=prefill, faults=scenario.faults
    ) as cluster:
        p = cluster.pipeline
        engines = {e.instance_id: e for e in (*agg, *prefill)}

        async def client(index: int, at: float, request: PreprocessedRequest) -> None:
            await trio.sleep(at)
            tokens: list[int] = []
            try:
                if config.routing == "query_only":
                    decision = await p.query(request)
                    tokens = list(decision.token_ids)
                else:
                    async for output in p.generate(request):
                        tokens.extend(output.token_ids)
            except InterlockError as exc:
                outcomes[index] = (tokens, exc)
            else:
                outcomes[index] = (tokens, None)

        async def crash_router(at: float) -> None:
            await trio.sleep(at)
            p.actors["router"].crash_nowait()

        with trio.fail_after(3600):
            async with trio.open_nursery() as nursery:
                for at in scenario.router_crashes:
                    nursery.start_soon(crash_router, at)
                for index, (at, request) in enumerate(scenario.arrivals):
                    nursery.start_soon(client, index, at, request)
            # The rest of the fault schedule, so every fault has happened before the checks.
            last_fault = max((f.at for f in scenario.faults), default=0.0)
            await trio.sleep_until(cluster.started_at + last_fault)
        await trio.testing.wait_all_tasks_blocked()
        load = await p.load()
        log = p.transition_log.records()
        assert p.in_flight == 0
        cluster.check_invariants()

    assert load == {}, f"load still booked after every request ended: {load}"
    assert all(e.active_requests == 0 for e in engines.values()), "an engine kept a request"
    assert len(outcomes) == len(scenario.arrivals)

    routes = [r.decision for r in log if r.trigger == "route"]
    if config.routing == "query_only":
        assert all(e.requests_started == 0 for e in engines.values()), "query_only executed"
    if config.routing == "direct_to_known":
        assert all(s.policy == "preselected" for d in routes for s in d.selections)
    if not scenario.prefill_ids:
        assert not any(d.disaggregated for d in routes)
    prefill_faulted = any(f.worker_id in scenario.prefill_ids for f in scenario.faults) or any(
        scenario.crash_after[len(scenario.agg_ids) :]
    )
    if scenario.prefill_ids and not prefill_faulted and config.routing != "direct_to_known":
        assert all(d.disaggregated for d in routes), "prefill workers were up, yet aggregated"

    for index, (at, request) in enumerate(scenario.arrivals):
        tokens, error = outcomes[index]
        if config.routing == "query_only":
            if error is None:
                assert tokens == list(request.token_ids)
            continue
        expected = expected_tokens(request)
        if error is None:
            assert tokens == expected, f"request #{index} arriving at {at}"
        else:
            assert tokens == expected[: len(tokens)], f"request #{index}: tokens out of order"
        if not scenario.engine_faults and error is not None:
            # Without engine faults the only failures are the ones the configuration asks for.
            allowed = isinstance(error, PrefillFailed | RequestError) and config.enforce_disagg
            assert allowed, f"request #{index} failed without any fault: {error!r}"


async def test_router_crash_mid_flight_restarts_and_requests_finish(
    autojump_clock: object,
) -> None:
    results: list[list[int]] = []
    request = PreprocessedRequest(token_ids=list(range(1, 100)), max_tokens=20)
    async with open_simulated_cluster(PipelineConfig(), workers=3) as cluster:
        p = cluster.pipeline

        async def client() -> None:
            tokens: list[int] = []
            async for output in p.generate(request):
                tokens.extend(output.token_ids)
            results.append(tokens)

        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(client)
            await trio.sleep(0.1)
            p.actors["router"].crash_nowait()
            await trio.sleep(0.001)
            # The restarted router rebuilt its bookings from the workers' snapshots.
            assert sum(load.active_requests for load in (await p.load()).values()) == 6
        assert p.supervisor.restarts("router") == 1
        assert await p.load() == {}
    expected = mock_continuation(request.token_ids, 20)
    assert results == [expected] * 6


async def test_a_router_that_keeps_crashing_takes_the_pipeline_down(
    autojump_clock: object,
) -> None:
    config = PipelineConfig(actor_max_restarts=2, actor_restart_window=60.0)
    error = RuntimeError("router bug")
    caught: Any = None
    try:
        async with open_simulated_cluster(config, workers=1) as cluster:
            for _ in range(3):
                cluster.pipeline.actors["router"].crash_nowait(error)
                await trio.sleep(1)
    except RuntimeError as exc:
        caught = exc
    assert caught is error, "escalation must re-raise the actor's original error"
