"""The selection policies against each other on the same seeded workload, in virtual time:
what each is for, measured."""

from __future__ import annotations

from interlock import Components, PipelineConfig, build_pipeline
from interlock.engines.mock import MockEngine
from interlock.testing import WorkloadReport, run_workload, shared_prefix_workload


async def _run(router_mode: str, rate: float, requests: int = 240) -> WorkloadReport:
    workload = shared_prefix_workload(seed=1, requests=requests, rate=rate)
    workers = [MockEngine(i, num_gpu_blocks=4096) for i in range(4)]
    config = PipelineConfig(router_mode=router_mode)
    async with build_pipeline(config, Components(workers=workers)) as pipeline:
        return await run_workload(pipeline, workload)


async def test_predicted_ttft_beats_kv_on_ttft_p90_under_load(autojump_clock: object) -> None:
    kv = await _run("kv", rate=45)
    predicted = await _run("predicted_ttft", rate=45)
    assert kv.completed == predicted.completed == 240
    assert predicted.ttft_quantile(0.9) < kv.ttft_quantile(0.9), (
        predicted.ttft_quantile(0.9),
        kv.ttft_quantile(0.9),
    )


async def test_kv_policies_beat_round_robin_on_hit_rate_and_ttft(autojump_clock: object) -> None:
    round_robin = await _run("round_robin", rate=30)
    kv = await _run("kv", rate=30)
    assert kv.hit_rate > round_robin.hit_rate
    assert kv.ttft_quantile(0.9) < round_robin.ttft_quantile(0.9)


async def test_a_light_load_is_served_alike(autojump_clock: object) -> None:
    # Far from saturation every policy is fast: the differences above come from queueing.
    medians = []
    for mode in ("round_robin", "kv", "predicted_ttft"):
        report = await _run(mode, rate=5, requests=60)
        assert report.failed == 0
        medians.append(report.ttft_quantile(0.5))
    # Within a factor of two of each other, against ten times that under load.
    assert max(medians) < 2 * min(medians), medians
