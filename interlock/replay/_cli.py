"""``interlock replay``: run each policy on the same trace, in virtual time, side by side.

Exit status: 0 after the report; 1 when a request's transitions broke an invariant (a bug:
the message quotes them); 2 when the replay cannot start (bad arguments, an unreadable trace,
fault schedule or configuration, or a missing matplotlib for ``--plot``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from .._argtypes import non_negative_int, positive_float, positive_int
from .._config import PipelineConfig
from .._errors import ConfigError
from .._plugins import import_from_working_directory
from ..testing import FaultSpecError, InvariantViolation, fault_schedule
from ._plot import PlotUnavailable, plot_report
from ._report import TEXT_WIDTH, render_json, report_table
from ._runner import ReplaySettings, parse_policies, replay
from ._traces import TRACE_FORMATS, TraceError, read_trace

DEFAULT_POLICIES = "round_robin,random,kv,predicted_ttft"

_EXAMPLES = """\
examples:
  interlock replay ../shared/data/traces/mooncake_fast25_conversation_trace.jsonl
  interlock replay TRACE.jsonl --limit 2000 --policies round_robin,kv --json
  interlock replay TRACE.jsonl --rate-scale 2 --plot out.png
  interlock replay TRACE.jsonl --faults crash:3@120s+60s,stall:1@30s+5s --migration-limit 2
  interlock replay TRACE.csv --format azure --policies kv,tuned=my_kv.toml
  interlock replay TRACE.jsonl --policies kv,kv:overlap_score_weight=4
  interlock replay TRACE.jsonl --policies kv,mine=my_policies:make_policy
"""


def add_parser(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Register the ``replay`` subcommand; its ``run`` default runs it and returns the exit
    status."""
    parser = subparsers.add_parser(
        "replay",
        help="replay a request trace against each routing policy in virtual time",
        description=(
            "Replay a Mooncake (JSONL) or Azure (CSV) trace through the real pipeline and\n"
            "simulated workers (the mock engine's KV cache, scheduler and timing), once per\n"
            "policy, in virtual time; print the policies side by side. See docs/replay.md."
        ),
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("trace", metavar="TRACE", help="the trace file (.jsonl or .csv)")
    parser.add_argument(
        "--format", choices=("auto", *TRACE_FORMATS), default="auto", help="trace format"
    )
    parser.add_argument(
        "--policies",
        default=DEFAULT_POLICIES,
        help="comma-separated router modes (round_robin, random, kv, predicted_ttft), each "
        "optionally with knobs changed (kv:overlap_score_weight=4), configuration files "
        "(PATH.toml, LABEL=PATH.toml), or selection policies of your own "
        "(LABEL=module:attribute, a factory taking the PipelineConfig; the current directory "
        f"is importable); default {DEFAULT_POLICIES}",
    )
    parser.add_argument(
        "--config",
        metavar="FILE.toml",
        help="base configuration for the named policies (their router_mode replaces its own)",
    )
    load = parser.add_argument_group("load")
    load.add_argument("--limit", type=positive_int, metavar="N", help="the first N requests")
    load.add_argument(
        "--rate-scale",
        type=positive_float,
        default=1.0,
        metavar="X",
        help="arrivals X times as dense (every timestamp divided by X); default 1",
    )
    load.add_argument(
        "--speedup",
        type=positive_float,
        default=1.0,
        metavar="X",
        help="engine speedup ratio: every prefill and decode step takes 1/X of the reference "
        "time (below 1 loads the cluster harder); default 1",
    )
    load.add_argument(
        "--faults",
        metavar="SPEC|FILE",
        help="fault schedule: e.g. crash:3@120s+60s,stall:1@30s+5s,slow:2@10sx4+60s, or a "
        "JSON/TOML file of {at, worker_id, kind, amount} records (docs/replay.md)",
    )
    load.add_argument(
        "--migration-limit",
        type=non_negative_int,
        metavar="N",
        help="migration_limit for every policy (default: the configuration's, 0)",
    )
    load.add_argument("--seed", type=int, default=0, help="seed of the whole run; default 0")
    cluster = parser.add_argument_group("simulated workers")
    defaults = ReplaySettings()
    cluster.add_argument(
        "--workers",
        type=positive_int,
        default=defaults.workers,
        metavar="N",
        help=f"simulated workers (ids 0 to N-1); default {defaults.workers}",
    )
    cluster.add_argument(
        "--block-size",
        type=positive_int,
        metavar="N",
        default=defaults.block_size,
        help=f"tokens per KV block; default {defaults.block_size}",
    )
    cluster.add_argument(
        "--num-gpu-blocks",
        type=positive_int,
        metavar="N",
        default=defaults.num_gpu_blocks,
        help=f"KV blocks per worker; default {defaults.num_gpu_blocks}",
    )
    cluster.add_argument(
        "--max-num-batched-tokens",
        type=positive_int,
        metavar="N",
        default=defaults.max_num_batched_tokens,
        help="uncached prompt tokens one step may prefill; default "
        f"{defaults.max_num_batched_tokens}",
    )
    cluster.add_argument(
        "--no-chunked-prefill",
        dest="chunked_prefill",
        action="store_false",
        help="prefill a prompt longer than the budget whole, in an empty batch, instead of a "
        "chunk per step",
    )
    cluster.add_argument(
        "--max-num-seqs",
        type=positive_int,
        metavar="N",
        default=defaults.max_num_seqs,
        help=f"sequences one worker runs at once; default {defaults.max_num_seqs}",
    )
    output = parser.add_argument_group("output")
    output.add_argument(
        "--json", action="store_true", help="print one JSON object per policy instead of a table"
    )
    output.add_argument(
        "--plot", metavar="PNG", help="also write a TTFT CDF and hit-rate chart (matplotlib)"
    )
    output.add_argument("--no-progress", action="store_true", help="draw no progress bar")
    output.add_argument(
        "--no-timing",
        action="store_true",
        help="leave out the wall-clock figures, so the same seed prints the same bytes",
    )
    parser.set_defaults(run=run_replay)


class _Progress:
    """A rich progress bar per policy: requests done, simulated time, wall time."""

    def __init__(self, console: Console) -> None:
        self._bar = Progress(
            TextColumn("{task.description:<16}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("sim {task.fields[sim]:>7.0f} s"),
            TextColumn("failed {task.fields[failed]}"),
            TimeElapsedColumn(),
            console=console,
            refresh_per_second=4,
        )
        self._tasks: dict[str, TaskID] = {}
        self._failed: dict[str, int] = {}

    def __enter__(self) -> _Progress:
        self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.stop()

    def start_policy(self, label: str, total: int) -> None:
        self._failed[label] = 0
        self._tasks[label] = self._bar.add_task(label, total=total, sim=0.0, failed=0)

    def request_done(self, label: str, sim_time: float, failed: bool) -> None:
        if failed:
            self._failed[label] += 1
        self._bar.update(self._tasks[label], advance=1, sim=sim_time, failed=self._failed[label])

    def finish_policy(self, label: str) -> None:
        self._bar.refresh()


def run_replay(args: argparse.Namespace) -> int:
    """Run ``interlock replay`` with parsed ``args``; return the exit status."""
    err = Console(stderr=True, width=TEXT_WIDTH if not sys.stderr.isatty() else None)

    def fail(message: str) -> int:
        print(f"interlock replay: {message}", file=sys.stderr)
        return 2

    # A policy module in the current directory (--policies LABEL=module:attribute) imports.
    import_from_working_directory()
    try:
        base = PipelineConfig.from_toml(args.config) if args.config else PipelineConfig()
        if args.migration_limit is not None:
            base = base.evolve(migration_limit=args.migration_limit)
        policies = parse_policies(args.policies, base)
        faults = fault_schedule(args.faults) if args.faults else ()
        trace = read_trace(args.trace, format=args.format, limit=args.limit)
        settings = ReplaySettings(
            workers=args.workers,
            block_size=args.block_size,
            num_gpu_blocks=args.num_gpu_blocks,
            max_num_batched_tokens=args.max_num_batched_tokens,
            chunked_prefill=args.chunked_prefill,
            max_num_seqs=args.max_num_seqs,
            speedup=args.speedup,
            rate_scale=args.rate_scale,
            seed=args.seed,
            faults=faults,
        )
        for fault in faults:
            if fault.worker_id >= settings.workers:
                raise FaultSpecError(
                    f"fault {fault.describe()!r} names worker {fault.worker_id}, but the "
                    f"cluster has workers 0 to {settings.workers - 1} (--workers)"
                )
        for policy in policies:
            policy.pipeline_config(settings)  # a bad combination fails before any replay
    except (ConfigError, FaultSpecError, TraceError, ValueError) as exc:
        return fail(str(exc))
    show_progress = not args.no_progress and err.is_terminal
    try:
        if show_progress:
            with _Progress(err) as progress:
                report = replay(trace, policies, settings, progress=progress)
        else:
            report = replay(trace, policies, settings)
    except ConfigError as exc:
        return fail(str(exc))
    except InvariantViolation as exc:
        print(f"interlock replay: an invariant broke (please report it): {exc}", file=sys.stderr)
        return 1
    timing = not args.no_timing
    if args.json:
        sys.stdout.write(render_json(report, timing=timing))
    else:
        out = Console(width=TEXT_WIDTH if not sys.stdout.isatty() else None)
        out.print(report_table(report, timing=timing))
    if args.plot:
        try:
            plot_report(report, args.plot)
        except PlotUnavailable as exc:
            return fail(str(exc))
        except OSError as exc:
            return fail(f"cannot write {args.plot!r}: {exc.strerror}")
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0
