"""Selection policies side by side on a seeded shared-prefix workload, in virtual time.

Four mock workers (the reference mocker's timing, 4,096 KV blocks of 16 tokens each), Poisson
arrivals, prompts that start with one of 12 long prefixes of Zipf-like popularity. Virtual time
makes every figure exact and repeatable; the wall time column is what the simulation cost.

    python benchmarks/bench_policies.py [--requests N] [--rates 20,45,60] [--seed S]
"""

from __future__ import annotations

import argparse
import time

import trio
import trio.testing

from interlock import Components, PipelineConfig, build_pipeline
from interlock.engines.mock import MockEngine
from interlock.testing import WorkloadReport, run_workload, shared_prefix_workload

POLICIES = ("round_robin", "random", "kv", "predicted_ttft")


async def measure(policy: str, rate: float, requests: int, seed: int) -> WorkloadReport:
    workload = shared_prefix_workload(seed=seed, requests=requests, rate=rate)
    workers = [MockEngine(i, num_gpu_blocks=4096) for i in range(4)]
    config = PipelineConfig(router_mode=policy)
    async with build_pipeline(config, Components(workers=workers)) as pipeline:
        return await run_workload(pipeline, workload)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--rates", default="20,45,60")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print(f"{args.requests} requests per run, seed {args.seed}; TTFT in ms of virtual time")
    header = f"{'rate/s':>6} {'policy':15} {'hit rate':>8} {'TTFT p50':>9} {'p90':>8} "
    print(header + f"{'p99':>8} {'p90 vs kv':>9} {'wall s':>7}")
    for rate in (float(r) for r in args.rates.split(",")):
        rows = {}
        for policy in POLICIES:
            started = time.perf_counter()
            clock = trio.testing.MockClock(autojump_threshold=0)
            report = trio.run(measure, policy, rate, args.requests, args.seed, clock=clock)
            rows[policy] = (report, time.perf_counter() - started)
        kv_p90 = rows["kv"][0].ttft_quantile(0.9)
        for policy, (report, wall) in rows.items():
            p50, p90, p99 = (report.ttft_quantile(q) * 1000 for q in (0.5, 0.9, 0.99))
            print(
                f"{rate:6.0f} {policy:15} {report.hit_rate:8.3f} {p50:9.0f} {p90:8.0f} "
                f"{p99:8.0f} {p90 / 1000 / kv_p90:9.2f} {wall:7.1f}"
            )


if __name__ == "__main__":
    main()
