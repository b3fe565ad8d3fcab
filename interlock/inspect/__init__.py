"""Reading transition logs back: what happened to each request, and why it went where it went.

`load_log` reads JSONL logs (bad lines become `LogProblem` entries, the rest is still read);
`summarize`, `validate` and `replay_decisions` work on its requests; ``render_*`` turn the
results into text. ``interlock inspect`` is the command-line face of the same functions
(`add_parser` registers it). See docs/inspecting.md.
"""

from ._cli import add_parser
from ._filter import RequestFilter, parse_time
from ._follow import LogFollower, follow
from ._graph import GRAPH_FORMATS, GraphUnavailable, graph_source, render_png
from ._history import RequestHistory, StateSpan
from ._load import LoadedLog, load_log, rotated_paths
from ._records import LogEntry, LogProblem, parse_line
from ._render import (
    render_replay,
    render_summary,
    render_timeline,
    render_violations,
)
from ._replay import DecisionReplay, LegReplay, replay_decision, replay_decisions
from ._summary import DurationStats, Summary, WorkerCounts, summarize
from ._validate import Violation, validate

__all__ = [
    "GRAPH_FORMATS",
    "DecisionReplay",
    "DurationStats",
    "GraphUnavailable",
    "LegReplay",
    "LoadedLog",
    "LogEntry",
    "LogFollower",
    "LogProblem",
    "RequestFilter",
    "RequestHistory",
    "StateSpan",
    "Summary",
    "Violation",
    "WorkerCounts",
    "add_parser",
    "follow",
    "graph_source",
    "load_log",
    "parse_line",
    "parse_time",
    "render_png",
    "render_replay",
    "render_summary",
    "render_timeline",
    "render_violations",
    "replay_decision",
    "replay_decisions",
    "rotated_paths",
    "summarize",
    "validate",
]
