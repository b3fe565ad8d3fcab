"""Replaying real request traces through the real pipeline in virtual time.

`read_trace` reads a Mooncake (JSONL) or Azure (CSV) trace; `replay` runs it once per policy
on identical simulated clusters (`interlock.testing.open_simulated_cluster`: the real pipeline
over mock workers) and returns a `ReplayReport`; ``render_*`` and `plot_report` present it.
``interlock replay`` is the command-line face of the same functions (`add_parser` registers
it). See docs/replay.md.
"""

from ._bound import combined_capacity_hit_rate
from ._cli import add_parser
from ._plot import PlotUnavailable, plot_report
from ._report import render_json, render_report, report_json, report_table
from ._runner import (
    PolicyReport,
    ReplayPolicy,
    ReplayProgress,
    ReplayReport,
    ReplaySettings,
    parse_policies,
    replay,
    replay_policy,
    trace_bound,
    trace_workload,
)
from ._traces import (
    TOKENS_PER_HASH,
    TRACE_FORMATS,
    Trace,
    TraceError,
    TraceFormat,
    TraceRequest,
    detect_format,
    read_trace,
)

__all__ = [
    "TOKENS_PER_HASH",
    "TRACE_FORMATS",
    "PlotUnavailable",
    "PolicyReport",
    "ReplayPolicy",
    "ReplayProgress",
    "ReplayReport",
    "ReplaySettings",
    "Trace",
    "TraceError",
    "TraceFormat",
    "TraceRequest",
    "add_parser",
    "combined_capacity_hit_rate",
    "detect_format",
    "parse_policies",
    "plot_report",
    "read_trace",
    "render_json",
    "render_report",
    "replay",
    "replay_policy",
    "report_json",
    "report_table",
    "trace_bound",
    "trace_workload",
]
