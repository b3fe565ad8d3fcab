"""The public simulation toolkit: `open_simulated_cluster`, `run_simulation`, workloads, fault
schedules written as text or files, and the hypothesis strategies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from interlock import ConfigError, PipelineConfig
from interlock.engines.mock import MockEngine, MockTiming
from interlock.testing import (
    Fault,
    FaultSpecError,
    MockWorkerSpec,
    NotInVirtualTime,
    RequestResult,
    TimedRequest,
    WorkloadReport,
    fault_schedule,
    load_fault_schedule,
    open_simulated_cluster,
    parse_fault_spec,
    run_simulation,
    run_workload,
    shared_prefix_workload,
)
from interlock.testing.strategies import (
    ALL_ROUTER_MODES,
    fault_schedules,
    prefix_families,
    requests,
    valid_configs,
    workloads,
)
from interlock.wire import PreprocessedRequest


def _requests(n: int, *, gap: float = 0.05, tokens: int = 8) -> list[TimedRequest]:
    return [
        TimedRequest(i * gap, PreprocessedRequest(token_ids=list(range(1, 40)), max_tokens=tokens))
        for i in range(n)
    ]


# -- open_simulated_cluster ---------------------------------------------------------------------


async def test_a_cluster_numbers_workers_then_prefill_workers(autojump_clock: object) -> None:
    async with open_simulated_cluster(workers=3, prefill_workers=2) as cluster:
        assert [e.instance_id for e in cluster.workers] == [0, 1, 2]
        assert [e.instance_id for e in cluster.prefill_workers] == [3, 4]
        assert sorted(cluster.engines) == [0, 1, 2, 3, 4]
        assert all(e.role == "agg" for e in cluster.workers)
        assert all(e.role == "prefill" for e in cluster.prefill_workers)
        report = await cluster.run(_requests(6))
        assert report.completed == 6
        assert report.failed == 0
        cluster.check_invariants()
        routes = [r for r in cluster.transition_log if r.trigger == "route"]
        assert all(r.decision.disaggregated for r in routes)


async def test_a_cluster_builds_workers_from_its_spec(autojump_clock: object) -> None:
    spec = MockWorkerSpec(num_gpu_blocks=512, max_num_batched_tokens=1024, seed=7)
    config = PipelineConfig(router_mode="kv", kv_block_size=32)
    async with open_simulated_cluster(config, workers=2, worker_spec=spec) as cluster:
        for engine in cluster.workers:
            assert isinstance(engine, MockEngine)
            assert (engine.block_size, engine.num_gpu_blocks, engine.seed) == (32, 512, 7)
            assert engine.max_num_batched_tokens == 1024


async def test_a_cluster_runs_engines_it_is_given(autojump_clock: object) -> None:
    engines = [MockEngine(10), MockEngine(11)]
    async with open_simulated_cluster(workers=engines) as cluster:
        assert cluster.workers == tuple(engines)
        report = await cluster.run(_requests(4))
    assert report.completed == 4
    assert sum(e.requests_finished for e in engines) == 4


async def test_faults_start_when_the_cluster_opens(autojump_clock: object) -> None:
    faults = [Fault(0.2, 1, "crash"), Fault(0.5, 1, "restart")]
    config = PipelineConfig(migration_limit=2)
    async with open_simulated_cluster(config, workers=2, faults=faults) as cluster:
        await trio.sleep(0.3)
        assert cluster.engines[1].is_down  # type: ignore[attr-defined]
        await trio.sleep(0.3)
        assert not cluster.engines[1].is_down  # type: ignore[attr-defined]
        assert cluster.elapsed == pytest.approx(0.6)


async def test_a_crash_mid_workload_migrates_and_keeps_the_invariants(
    autojump_clock: object,
) -> None:
    config = PipelineConfig(migration_limit=2)
    async with open_simulated_cluster(
        config, workers=3, faults=parse_fault_spec("crash:0@0.1s")
    ) as c:
        report = await c.run(_requests(6, gap=0.01, tokens=60))
        c.check_invariants()
        assert report.completed == 6
        assert c.pipeline.stats.migrations >= 1


async def test_the_body_s_own_error_arrives_as_itself(autojump_clock: object) -> None:
    with pytest.raises(KeyError):
        async with open_simulated_cluster(workers=1):
            raise KeyError("mine")


async def test_a_bad_configuration_is_refused_on_entry(autojump_clock: object) -> None:
    with pytest.raises(ConfigError, match="kv_block_size"):
        async with open_simulated_cluster(
            PipelineConfig(router_mode="kv", kv_block_size=16),
            workers=1,
            worker_spec=MockWorkerSpec(block_size=64),
        ):
            pass


async def test_the_real_clock_is_refused_with_directions() -> None:
    # No autojump_clock fixture: pytest-trio runs this test on the real clock.
    with pytest.raises(NotInVirtualTime, match=r"clock=interlock\.testing\.SimulationClock\(\)"):
        async with open_simulated_cluster(workers=1):
            pass  # pragma: no cover


async def test_the_real_clock_is_allowed_when_asked() -> None:
    timing = MockTiming.zero()
    async with open_simulated_cluster(
        workers=1, worker_spec=MockWorkerSpec(timing=timing), virtual_time=False
    ) as cluster:
        report = await cluster.run(_requests(2, gap=0.0))
    assert report.completed == 2


# -- run_simulation and determinism ----------------------------------------------------------


def _policy_run(seed: int) -> WorkloadReport:
    async def main() -> WorkloadReport:
        config = PipelineConfig(router_mode="kv")
        workload = shared_prefix_workload(seed=3, requests=60, rate=40)
        spec = MockWorkerSpec(num_gpu_blocks=2048)
        async with open_simulated_cluster(config, workers=3, worker_spec=spec) as cluster:
            return await cluster.run(workload)

    return run_simulation(main, seed=seed)


def test_run_simulation_repeats_exactly() -> None:
    first, again = _policy_run(1), _policy_run(1)
    assert first == again
    assert first.completed == 60
    assert first.duration > 1.0  # simulated seconds, not wall-clock ones


def test_run_simulation_returns_the_result_in_virtual_time() -> None:
    async def main() -> float:
        await trio.sleep(3600)
        return trio.current_time()

    assert run_simulation(main) == 3600.0


# -- run_workload ------------------------------------------------------------------------------


async def test_a_lazy_workload_is_read_one_request_ahead(autojump_clock: object) -> None:
    built: list[float] = []

    def lazy() -> object:
        for timed in _requests(5, gap=1.0):
            built.append(trio.current_time())
            yield timed

    async with open_simulated_cluster(workers=2) as cluster:
        report = await cluster.run(lazy())  # type: ignore[arg-type]
    assert report.completed == 5
    # Each request is built when the previous one is sent, not all at the start.
    assert built == [0.0, 0.0, 1.0, 2.0, 3.0]


async def test_a_lazy_workload_must_keep_time_order(autojump_clock: object) -> None:
    def backwards() -> object:
        yield from reversed(_requests(3))

    async with open_simulated_cluster(workers=1) as cluster:
        with pytest.raises(ValueError, match="time order"):
            await cluster.run(backwards())  # type: ignore[arg-type]


async def test_a_sequence_is_sent_in_time_order(autojump_clock: object) -> None:
    results: list[RequestResult] = []
    async with open_simulated_cluster(workers=2) as cluster:
        report = await cluster.run(list(reversed(_requests(4, gap=0.5))), on_result=results.append)
    assert report.completed == 4
    assert sorted(r.at for r in results) == [0.0, 0.5, 1.0, 1.5]
    assert all(r.ttft is not None and r.e2e is not None and r.error is None for r in results)
    assert report.output_tokens == sum(r.output_tokens for r in results) == 32
    assert report.throughput == pytest.approx(32 / report.duration)


async def test_failed_requests_are_reported_and_left_out(autojump_clock: object) -> None:
    results: list[RequestResult] = []
    async with open_simulated_cluster(workers=1, faults=[Fault(0.0, 0, "refuse")]) as cluster:
        report = await run_workload(cluster.pipeline, _requests(3), on_result=results.append)
    assert (report.completed, report.failed, report.requests) == (0, 3, 3)
    assert report.ttft == report.e2e == ()
    assert all(r.error is not None and r.error.startswith("WorkerRefused") for r in results)


# -- fault schedules as text and files --------------------------------------------------------


def test_a_fault_spec_reads_kinds_times_amounts_and_undos() -> None:
    faults = parse_fault_spec("crash:3@120s+30s, stall:1@30s+5s, slow:2@1.5mx4+10s, leave:0@250ms")
    assert faults == (
        Fault(0.25, 0, "leave"),
        Fault(30.0, 1, "stall", 5.0),
        Fault(90.0, 2, "slow", 4.0),
        Fault(100.0, 2, "slow", 1.0),
        Fault(120.0, 3, "crash"),
        Fault(150.0, 3, "restart"),
    )
    for fault in faults:
        assert parse_fault_spec(fault.describe()) == (fault,)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("crash3@1s", "does not parse"),
        ("explode:1@1s", "unknown kind 'explode'"),
        ("crash:1@1sx2", "only slow takes a factor"),
        ("restart:1@1s+2s", "restart takes no duration"),
        ("slow:1@1sx0", "must be > 0"),
        ("crash:1@1h", "does not parse"),
    ],
)
def test_a_bad_fault_spec_says_what_and_how(spec: str, message: str) -> None:
    with pytest.raises(FaultSpecError, match=message) as caught:
        parse_fault_spec(spec)
    assert spec.split(",")[0] in str(caught.value)


def test_fault_schedules_load_from_json_and_toml(tmp_path: Path) -> None:
    as_json = tmp_path / "faults.json"
    as_json.write_text(json.dumps([{"at": 5, "worker_id": 1, "kind": "stall", "amount": 2}]))
    as_toml = tmp_path / "faults.toml"
    as_toml.write_text('[[fault]]\nat = 1.0\nworker_id = 0\nkind = "crash"\n')
    assert load_fault_schedule(as_json) == (Fault(5, 1, "stall", 2),)
    assert fault_schedule(str(as_toml)) == (Fault(1.0, 0, "crash"),)
    assert fault_schedule("crash:0@1s") == (Fault(1.0, 0, "crash"),)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[{"at": 1, "worker_id": 0, "kind": "crash", "when": 2}]', "unknown field 'when'"),
        ('[{"at": 1, "kind": "crash"}]', "lacks 'worker_id'"),
        ('[{"at": -1, "worker_id": 0, "kind": "crash"}]', "must be >= 0"),
        ('{"fautls": []}', "unknown top-level key 'fautls'"),
        ("[1", "does not parse"),
    ],
)
def test_a_bad_fault_file_names_the_record(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "faults.json"
    path.write_text(content)
    with pytest.raises(FaultSpecError, match=message):
        load_fault_schedule(path)


def test_a_missing_fault_file_is_named() -> None:
    with pytest.raises(FaultSpecError, match=r"cannot read fault schedule 'nope\.json'"):
        fault_schedule("nope.json")


def test_faults_check_their_fields() -> None:
    with pytest.raises(ValueError, match="not one of"):
        Fault(0.0, 0, "explode")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-negative int"):
        Fault(0.0, -1, "crash")
    with pytest.raises(ValueError, match="finite"):
        Fault(float("nan"), 0, "crash")


# -- strategies ---------------------------------------------------------------------------------


@settings(max_examples=30)
@given(config=valid_configs(router_modes=ALL_ROUTER_MODES))
def test_valid_configs_over_every_router_mode_validate(config: PipelineConfig) -> None:
    assert config.validate() is config


@given(
    workload=workloads(max_requests=5, horizon=2.0),
    faults=fault_schedules([0, 1], horizon=1.0, kinds=("crash", "stall")),
)
def test_workloads_are_in_time_order_and_faults_of_the_given_kinds(
    workload: list[TimedRequest], faults: list[Fault]
) -> None:
    times = [t.at for t in workload]
    assert times == sorted(times)
    assert all(0 <= t <= 2.0 for t in times)
    assert all(f.kind in ("crash", "stall") and f.worker_id in (0, 1) for f in faults)


@given(data=st.data())
def test_requests_share_their_family_prefix_and_carry_sampling(data: st.DataObject) -> None:
    families = data.draw(prefix_families(families=2, min_length=4, max_length=8))
    request = data.draw(requests(prefixes=families, sampling=True, min_prompt=2))
    assert any(request.token_ids[: len(p)] == p for p in families)
    assert len(request.token_ids) >= 2 + min(len(p) for p in families)


def test_the_public_toolkit_is_pinned() -> None:
    import interlock.testing
    import interlock.testing.strategies

    assert sorted(interlock.testing.__all__) == sorted(
        [
            "FAULT_KINDS",
            "Fault",
            "FaultKind",
            "FaultSpecError",
            "InvariantViolation",
            "MockWorkerSpec",
            "NotInVirtualTime",
            "RequestResult",
            "SimulatedCluster",
            "SimulationClock",
            "TimedRequest",
            "WorkloadReport",
            "check_invariants",
            "fault_schedule",
            "faults_from_records",
            "load_fault_schedule",
            "open_simulated_cluster",
            "parse_fault_spec",
            "require_virtual_time",
            "run_fault_schedule",
            "run_simulation",
            "run_workload",
            "seed_scheduler",
            "shared_prefix_workload",
        ]
    )
    assert sorted(interlock.testing.strategies.__all__) == sorted(
        [
            "ALL_ROUTER_MODES",
            "fault_schedules",
            "invalid_configs",
            "prefix_families",
            "requests",
            "sampling_options",
            "token_ids",
            "valid_configs",
            "workloads",
        ]
    )
    for module in (interlock.testing, interlock.testing.strategies):
        for name in module.__all__:
            assert hasattr(module, name), name
