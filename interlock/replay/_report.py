"""Rendering a `ReplayReport`: a table with the policies side by side, and JSON."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from ._runner import PolicyReport, ReplayReport

#: Width of the plain-text rendering (stable, whatever the terminal).
TEXT_WIDTH = 120


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _rate(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"


def _percent(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.0%}"


_Row = tuple[str, Callable[[PolicyReport], str]]

_ROWS: tuple[_Row, ...] = (
    ("requests completed", lambda p: f"{p.completed:,} / {p.requests:,}"),
    ("failed", lambda p: f"{p.failed:,}"),
    ("prefix hit rate", lambda p: _rate(p.hit_rate)),
    (
        "  share of bound",
        lambda p: "-" if math.isnan(p.share_of_bound) else f"{p.share_of_bound:.0%}",
    ),
    ("TTFT p50 ms", lambda p: _ms(p.ttft_p50_ms)),
    ("TTFT p90 ms", lambda p: _ms(p.ttft_p90_ms)),
    ("TTFT p99 ms", lambda p: _ms(p.ttft_p99_ms)),
    ("ITL p50 ms", lambda p: _ms(p.itl_p50_ms)),
    ("ITL p99 ms", lambda p: _ms(p.itl_p99_ms)),
    ("end-to-end p50 ms", lambda p: _ms(p.e2e_p50_ms)),
    ("end-to-end p99 ms", lambda p: _ms(p.e2e_p99_ms)),
    ("output tokens/s", lambda p: f"{p.output_tokens_per_s:,.0f}"),
    ("requests/s", lambda p: f"{p.requests_per_s:.2f}"),
    ("migrations", lambda p: f"{p.migrations:,}"),
    ("fallbacks", lambda p: f"{p.fallbacks:,}"),
    ("preemptions", lambda p: f"{p.preemptions:,}"),
    ("busiest / idlest worker", lambda p: _spread(p.requests_per_worker)),
    ("simulated s", lambda p: f"{p.sim_seconds:,.1f}"),
)
_TIMING_ROWS: tuple[_Row, ...] = (
    ("wall s", lambda p: f"{p.wall_seconds:,.1f}"),
    ("simulated s per wall s", lambda p: f"{p.sim_per_wall:,.1f}"),
)


def _spread(counts: tuple[int, ...]) -> str:
    return f"{max(counts):,} / {min(counts):,}" if counts else "-"


def report_title(report: ReplayReport) -> str:
    """Two lines: the trace and its load; the cluster, the seed and the bound."""
    s = report.settings
    scale = f", arrivals x{s.rate_scale:g}" if s.rate_scale != 1 else ""
    speed = f", engine speedup {s.speedup:g}" if s.speedup != 1 else ""
    faults = f", {len(s.faults)} faults" if s.faults else ""
    chunks = "" if s.chunked_prefill else " (no chunked prefill)"
    return (
        f"{report.trace} ({report.trace_format}): {report.requests:,} requests over "
        f"{report.span_seconds:,.0f} s{scale}{faults}\n"
        f"{s.workers} workers x {s.num_gpu_blocks:,} KV blocks of {s.block_size} tokens, "
        f"{s.max_num_batched_tokens:,} batched tokens{chunks}{speed}; seed {s.seed}; "
        f"combined-capacity hit-rate bound {report.hit_rate_bound:.3f}"
    )


def report_table(report: ReplayReport, *, timing: bool = True) -> Group:
    """A title line (trace, cluster, bound), then the policies side by side, one metric a
    row."""
    table = Table()
    table.add_column("metric")
    for policy in report.policies:
        table.add_column(policy.policy, justify="right")
    for label, cell in (*_ROWS, *(_TIMING_ROWS if timing else ())):
        table.add_row(label, *(cell(p) for p in report.policies))
    return Group(Text(report_title(report)), table)


def render_report(report: ReplayReport, *, timing: bool = True, width: int = TEXT_WIDTH) -> str:
    """The table as plain text (the same bytes for the same report)."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, legacy_windows=False)
    console.print(report_table(report, timing=timing))
    return buffer.getvalue()


def report_json(report: ReplayReport, *, timing: bool = True) -> list[dict[str, Any]]:
    """One object per policy (keys ``policy``, ``hit_rate``, ``ttft_p50_ms``, ...), each also
    naming the trace and the cluster."""
    context = {
        "trace": report.trace,
        "trace_format": report.trace_format,
        "span_seconds": round(report.span_seconds, 3),
        "workers": report.settings.workers,
        "block_size": report.settings.block_size,
        "num_gpu_blocks": report.settings.num_gpu_blocks,
        "max_num_batched_tokens": report.settings.max_num_batched_tokens,
        "chunked_prefill": report.settings.chunked_prefill,
        "rate_scale": report.settings.rate_scale,
        "speedup": report.settings.speedup,
        "seed": report.settings.seed,
        "faults": [f.describe() for f in report.settings.faults],
    }
    return [p.to_json(timing=timing) | context for p in report.policies]


def render_json(report: ReplayReport, *, timing: bool = True) -> str:
    return json.dumps(report_json(report, timing=timing), indent=2) + "\n"
