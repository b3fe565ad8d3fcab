"""The cost of simulating: a slice of the Mooncake conversation trace through the real pipeline
over 8 mock workers, on `SimulationClock` against trio's `MockClock(autojump_threshold=0)`.

Both clocks keep the same virtual time; the figure is wall time, so each clock runs the same
slice in turn (alternating, best of ``--repeat``) and the ratio is what matters on a shared
machine. The scheduler is seeded, so both runs do the same work, token for token.

    python benchmarks/bench_simulation.py [--requests 1500] [--policy kv] [--repeat 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import trio
import trio.testing

from interlock import PipelineConfig
from interlock.replay import ReplaySettings, read_trace
from interlock.replay._runner import trace_workload
from interlock.testing import (
    SimulationClock,
    WorkloadReport,
    open_simulated_cluster,
    run_simulation,
)

TRACE = (
    Path(__file__).resolve().parents[1]
    / ".."
    / "shared"
    / "data"
    / "traces"
    / "mooncake_fast25_conversation_trace.jsonl"
)


def run_once(clock: trio.abc.Clock, requests: int, policy: str) -> tuple[WorkloadReport, float]:
    trace = read_trace(TRACE).head(requests)
    settings = ReplaySettings()
    config = PipelineConfig(router_mode=policy, kv_block_size=settings.block_size)

    async def main() -> WorkloadReport:
        spec = settings.worker_spec(trace)
        async with open_simulated_cluster(config, workers=8, worker_spec=spec) as cluster:
            return await cluster.run(trace_workload(trace))

    started = time.perf_counter()
    report = run_simulation(main, seed=0, clock=clock)  # type: ignore[arg-type]
    return report, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--policy", default="kv")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    best = {"MockClock": float("inf"), "SimulationClock": float("inf")}
    reports: dict[str, WorkloadReport] = {}
    for _ in range(args.repeat):
        for name in best:
            clock = (
                trio.testing.MockClock(autojump_threshold=0)
                if name == "MockClock"
                else SimulationClock()
            )
            report, wall = run_once(clock, args.requests, args.policy)
            best[name] = min(best[name], wall)
            reports[name] = report
    ours, mock = reports["SimulationClock"], reports["MockClock"]
    assert ours.output_tokens == mock.output_tokens, "both clocks must do the same work"
    tokens = ours.output_tokens
    print(
        f"{args.requests} requests of the conversation trace, policy {args.policy}, 8 workers; "
        f"{tokens:,} output tokens, {ours.duration:,.0f} simulated s"
    )
    print(f"{'clock':16} {'wall s':>7} {'us/token':>9} {'sim s/wall s':>13}")
    for name, wall in best.items():
        sim_per_wall = reports[name].duration / wall
        print(f"{name:16} {wall:7.2f} {wall / tokens * 1e6:9.1f} {sim_per_wall:13.1f}")
    print(f"speed-up of SimulationClock: {best['MockClock'] / best['SimulationClock']:.2f}x")


if __name__ == "__main__":
    main()
