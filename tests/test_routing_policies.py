"""The selection policies against each other on the same seeded workload, in virtual time:
what each is for, measured."""

from __future__ import annotations

from interlock import PipelineConfig
from interlock.testing import (
    MockWorkerSpec,
    WorkloadReport,
    open_simulated_cluster,
    shared_prefix_workload,
)

#: Four workers of 4,096 blocks: small enough that the policies compete for cache.
WORKERS = MockWorkerSpec(num_gpu_blocks=4096)


async def _run(router_mode: str, rate: float, requests: int = 240) -> WorkloadReport:
    workload = shared_prefix_workload(seed=1, requests=requests, rate=rate)
    config = PipelineConfig(router_mode=router_mode)
    async with open_simulated_cluster(config, workers=4, worker_spec=WORKERS) as cluster:
        return await cluster.run(workload)


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
