"""``interlock inspect``: the command line of `interlock.inspect`.

Exit status: 0 when the answer is yes (or a summary was printed); 1 when it is no (a path
breaks an invariant, a decision does not replay, unreadable lines under ``--validate``); 2
when the question cannot be answered (bad arguments, a missing file or request, no ``dot``).
A selection made by a custom policy cannot be recomputed: ``--replay-decision`` says so and
does not count it as a mismatch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console, RenderableType
from rich.live import Live

from .._argtypes import non_negative_int, positive_int
from ..statemachines import ALL_MODES, Mode, State
from ._filter import RequestFilter, parse_time
from ._follow import follow
from ._graph import GRAPH_FORMATS, GraphUnavailable, graph_source, render_png
from ._history import RequestHistory
from ._load import LoadedLog, load_log, rotated_paths
from ._records import LogProblem
from ._render import (
    TEXT_WIDTH,
    render_violations,
    replay_renderable,
    summary_renderable,
    timeline_renderable,
)
from ._replay import replay_decisions
from ._summary import DEFAULT_BLOCK_SIZE, summarize
from ._validate import validate

#: Unreadable lines reported one by one before the rest are only counted.
MAX_PROBLEMS_SHOWN = 20

_EXAMPLES = """\
examples:
  interlock inspect transitions.jsonl                     summary of every request
  interlock inspect --rotated transitions.jsonl           ... with its rotated backups
  interlock inspect transitions.jsonl --request req-7     timeline and routing decisions
  interlock inspect transitions.jsonl --validate --migration-limit 2
  interlock inspect transitions.jsonl --replay-decision req-7
  interlock inspect --graph discover+migration --format dot
  interlock inspect transitions.jsonl --follow --state failed
  interlock inspect transitions.jsonl --worker 3 --since 2025-01-31T12:00 --json
"""


def _time(text: str) -> float:
    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parser(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Register the ``inspect`` subcommand; its ``run`` default runs it and returns the exit
    status."""
    modes = [m.name for m in ALL_MODES]
    parser = subparsers.add_parser(
        "inspect",
        help="summarize, validate and explain JSONL transition logs",
        description=(
            "Read JSONL transition logs: what happened to each request, and why it went where\n"
            "it went. Without an action: a summary of the requests. Unreadable lines are\n"
            "reported on stderr as LOG:LINE: reason, and the rest is read. See\n"
            "docs/inspecting.md."
        ),
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "logs",
        nargs="*",
        metavar="LOG",
        help="transition log files, read in order (give rotated files oldest first); - is stdin",
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument(
        "--request",
        metavar="ID",
        help="one request's timeline: each state, its duration and worker, and every routing "
        "decision with its candidate table (why this worker)",
    )
    action.add_argument(
        "--validate",
        action="store_true",
        help="check every request's path against its mode's graph and the invariants; exit 1 "
        "and print the offending transitions if one breaks",
    )
    action.add_argument(
        "--replay-decision",
        metavar="ID",
        help="recompute each routing decision of request ID from its record and compare",
    )
    action.add_argument(
        "--graph",
        metavar="MODE",
        choices=modes,
        help=f"print a mode's state graph (no log needed); MODE is one of: {', '.join(modes)}",
    )
    action.add_argument(
        "--follow",
        action="store_true",
        help="tail a live log (one file), updating the summary until Ctrl-C",
    )
    parser.add_argument(
        "--format",
        choices=GRAPH_FORMATS,
        default="mermaid",
        help="--graph output: mermaid or dot text, or png (needs Graphviz's dot program)",
    )
    parser.add_argument(
        "-o", "--output", metavar="FILE", help="--graph: write here (png: default MODE.png)"
    )
    filters = parser.add_argument_group("filters (select whole requests; repeat to allow several)")
    filters.add_argument(
        "--state",
        action="append",
        choices=[s.value for s in State],
        metavar="STATE",
        help="requests that went through STATE (e.g. failed, migrated, done)",
    )
    filters.add_argument(
        "--worker",
        action="append",
        type=int,
        metavar="ID",
        help="requests a record of which names worker ID",
    )
    filters.add_argument(
        "--mode", action="append", choices=modes, metavar="MODE", help="requests of mode MODE"
    )
    filters.add_argument(
        "--since",
        type=_time,
        metavar="TIME",
        help="requests active at or after TIME (Unix seconds or ISO 8601; local time unless "
        "a zone is given)",
    )
    filters.add_argument(
        "--until", type=_time, metavar="TIME", help="requests active at or before TIME"
    )
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.add_argument(
        "--rotated",
        action="store_true",
        help="read each LOG's rotated backups (LOG.N ... LOG.1) before it",
    )
    parser.add_argument(
        "--migration-limit",
        type=non_negative_int,
        metavar="N",
        help="--validate: fail requests that migrated more than N times (the log does not "
        "record the configured limit)",
    )
    parser.add_argument(
        "--allow-unfinished",
        action="store_true",
        help="--validate: accept requests that have not ended (a log still being written)",
    )
    parser.add_argument(
        "--block-size",
        type=positive_int,
        default=DEFAULT_BLOCK_SIZE,
        metavar="TOKENS",
        help="KV block size for the prefix hit rate when a decision does not record one "
        f"(default {DEFAULT_BLOCK_SIZE}, as kv_block_size)",
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="--follow: seconds between polls (default 1)",
    )
    parser.set_defaults(run=run)


def _console() -> Console:
    console = Console(file=sys.stdout, highlight=False)
    if not console.is_terminal:
        console.width = TEXT_WIDTH
    return console


def _fail(message: str, status: int = 2) -> int:
    print(f"interlock inspect: {message}", file=sys.stderr)
    return status


def _report(problems: Sequence[LogProblem], already: int = 0) -> None:
    """Print unreadable lines to stderr, the first `MAX_PROBLEMS_SHOWN` of them (``already``:
    how many were reported before)."""
    for index, problem in enumerate(problems, start=already):
        if index < MAX_PROBLEMS_SHOWN:
            print(str(problem), file=sys.stderr)
        elif index == MAX_PROBLEMS_SHOWN:
            print(
                "... more unreadable lines are counted but not shown (see the summary)",
                file=sys.stderr,
            )


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _filter(args: argparse.Namespace) -> RequestFilter:
    return RequestFilter(
        states=args.state,
        workers=args.worker,
        modes=args.mode,
        since=args.since,
        until=args.until,
    )


def run(args: argparse.Namespace) -> int:
    """Run ``interlock inspect`` with parsed ``args``; return the exit status."""
    if args.graph is not None:
        if args.logs:
            return _fail("--graph draws a mode's graph from its specification; drop the LOG files")
        if args.json:
            return _fail("--graph prints mermaid or DOT text; drop --json")
        return _graph(args)
    if args.format != "mermaid" or args.output is not None:
        return _fail("--format and --output go with --graph")
    if (args.migration_limit is not None or args.allow_unfinished) and not args.validate:
        return _fail("--migration-limit and --allow-unfinished go with --validate")
    filtered = args.state or args.worker or args.mode or args.since is not None
    if (filtered or args.until is not None) and (args.request or args.replay_decision):
        return _fail(
            "filters select requests for the summary, --validate and --follow; --request and "
            "--replay-decision name their request already"
        )
    if not args.logs:
        return _fail("give the transition log to read (a JSONL file, several, or - for stdin)")
    if args.follow:
        return _follow(args)
    paths: list[str] = []
    for path in args.logs:
        try:
            paths += rotated_paths(path) if args.rotated and path != "-" else [path]
        except OSError as exc:
            return _fail(f"cannot read {path}: {exc.strerror}")
    try:
        log = load_log(paths)
    except OSError as exc:
        return _fail(f"cannot read {exc.filename}: {exc.strerror}")
    _report(log.problems)
    if args.request is not None:
        return _request(args, log)
    if args.replay_decision is not None:
        return _replay(args, log)
    requests = log.requests(_filter(args))
    if args.validate:
        violations = validate(
            requests,
            migration_limit=args.migration_limit,
            require_terminal=not args.allow_unfinished,
        )
        if args.json:
            _print_json(
                {
                    "ok": not violations and not log.problems,
                    "requests": len(requests),
                    "violations": [v.to_json_dict() for v in violations],
                    "unreadable_lines": [str(p) for p in log.problems],
                }
            )
        else:
            text = render_violations(violations, len(requests))
            _console().print(
                text, style="red" if violations else "green", soft_wrap=True, end="", markup=False
            )
            if log.problems:
                print(
                    f"{len(log.problems)} line(s) could not be read: the log is incomplete, so "
                    "it does not validate",
                    file=sys.stderr,
                )
        return 1 if violations or log.problems else 0
    summary = summarize(requests, problems=len(log.problems), block_size=args.block_size)
    if args.json:
        _print_json(summary.to_json_dict())
    else:
        _console().print(summary_renderable(summary))
    return 0


def _lookup(log: LoadedLog, key: str) -> RequestHistory | None:
    try:
        history = log.request(key)
    except KeyError as exc:
        _fail(str(exc.args[0]))
        return None
    namesakes = log.namesakes(key)
    if len(namesakes) > 1:
        print(
            f"note: {len(namesakes)} requests in the log have id {history.request_id!r} "
            f"(several pipeline runs wrote to it): {', '.join(namesakes)}; this is {key!r}",
            file=sys.stderr,
        )
    return history


def _request(args: argparse.Namespace, log: LoadedLog) -> int:
    history = _lookup(log, args.request)
    if history is None:
        return 2
    if args.json:
        _print_json(history.to_json_dict())
    else:
        _console().print(timeline_renderable(history))
    return 0


def _replay(args: argparse.Namespace, log: LoadedLog) -> int:
    history = _lookup(log, args.replay_decision)
    if history is None:
        return 2
    replays = replay_decisions(history)
    ok = bool(replays) and all(r.matches for r in replays)
    # A custom policy's legs cannot be recomputed: reported, but only a contradiction fails.
    contradicted = any(r.contradicts for r in replays)
    if args.json:
        _print_json(
            {
                "request_id": history.key,
                "matches": ok,
                "decisions": [r.to_json_dict() for r in replays],
            }
        )
    else:
        _console().print(replay_renderable(history.key, replays))
    if not replays:
        return 2
    return 1 if contradicted else 0


def _graph(args: argparse.Namespace) -> int:
    mode = Mode.from_name(args.graph)
    if args.format == "png":
        output = args.output or f"{mode.name}.png"
        try:
            render_png(mode, output)
        except GraphUnavailable as exc:
            return _fail(str(exc))
        except subprocess.CalledProcessError as exc:
            return _fail(f"dot failed: {exc.stderr.decode(errors='replace').strip()}")
        print(f"wrote {output}")
        return 0
    text = graph_source(mode, args.format)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {args.output}")
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


def _follow(args: argparse.Namespace) -> int:
    if len(args.logs) != 1 or args.logs[0] == "-":
        return _fail("--follow tails one log file (not stdin); give exactly one path")
    where = _filter(args)
    console = _console()
    shown = 0
    live = (
        Live(console=console, auto_refresh=False) if console.is_terminal and not args.json else None
    )

    def update(log: LoadedLog) -> None:
        nonlocal shown
        _report(log.problems[shown:], shown)
        shown = len(log.problems)
        summary = summarize(
            log.requests(where), problems=len(log.problems), block_size=args.block_size
        )
        if args.json:
            sys.stdout.write(json.dumps(summary.to_json_dict(), default=str) + "\n")
            sys.stdout.flush()
            return
        view: RenderableType = summary_renderable(summary)
        if live is not None:
            live.update(view, refresh=True)
        else:
            console.print(view)
            console.rule()

    context: contextlib.AbstractContextManager[Any] = (
        live if live is not None else contextlib.nullcontext()
    )
    try:
        with context:
            follow(args.logs[0], update, interval=args.interval)
    except KeyboardInterrupt:
        pass
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``interlock inspect ARGS``, on a parser of its own (for tests and embedding)."""
    parser = argparse.ArgumentParser(prog="interlock")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["inspect", *(sys.argv[1:] if argv is None else argv)])
    return int(args.run(args))
