"""Rich tables for people: the summary, a request's timeline with its routing decisions, replay
results and validation failures. ``render_*`` return plain text; the CLI prints the
renderables themselves (in colour on a terminal)."""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Mapping, Sequence
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.markup import escape
from rich.padding import Padding
from rich.table import Table

from ..statemachines import State
from ._history import RequestHistory
from ._records import LogEntry
from ._replay import DecisionReplay
from ._summary import Summary
from ._validate import Violation

#: Width of the text the ``render_*`` functions return.
TEXT_WIDTH = 100

_STATE_STYLE = {
    State.DONE.value: "green",
    State.FAILED.value: "red",
    State.CANCELLED.value: "yellow",
    State.MIGRATED.value: "magenta",
}


def to_text(renderable: RenderableType, *, width: int = TEXT_WIDTH) -> str:
    """``renderable`` as plain text (no colour), ``width`` columns wide."""
    buffer = io.StringIO()
    console = Console(
        file=buffer, width=width, color_system=None, force_terminal=False, highlight=False
    )
    console.print(renderable)
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines()) + "\n"


def seconds(value: float | None) -> str:
    """A duration for people: ``17.1 ms`` under a second, ``2.350 s`` above; ``-`` for None."""
    if value is None:
        return "-"
    return f"{value * 1000:.1f} ms" if abs(value) < 1 else f"{value:.3f} s"


def _state(state: str) -> str:
    style = _STATE_STYLE.get(state)
    return f"[{style}]{escape(state)}[/]" if style else escape(state)


def _wall(value: float) -> str:
    return dt.datetime.fromtimestamp(value, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


def _table(*columns: str, title: str | None = None, right: Sequence[str] = ()) -> Table:
    table = Table(
        *columns,
        title=title,
        title_justify="left",
        title_style="bold",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        show_edge=False,
    )
    for column in table.columns:
        if column.header in right:
            column.justify = "right"
    return table


def _counts(title: str, label: str, counts: Mapping[str, int]) -> Table:
    table = _table(label, "requests", title=title, right=("requests",))
    for name, count in counts.items():
        table.add_row(_state(name), str(count))
    return table


# -- summary ---------------------------------------------------------------------------------


def summary_renderable(summary: Summary, *, show_wall: bool = True) -> RenderableType:
    """The summary as rich tables."""
    head = f"[bold]{summary.requests} request(s)[/]"
    notes = []
    if summary.incomplete:
        notes.append(f"{summary.incomplete} begin before the log does")
    if summary.problems:
        notes.append(f"{summary.problems} unreadable line(s) skipped")
    if show_wall and summary.first_wall is not None and summary.last_wall is not None:
        notes.append(f"{_wall(summary.first_wall)} to {_wall(summary.last_wall)}")
    if notes:
        head += " (" + "; ".join(notes) + ")"
    parts: list[RenderableType] = [head, ""]
    in_flight = {s: n for s, n in summary.final_states.items() if s not in _STATE_STYLE}
    finals = {s: n for s, n in summary.final_states.items() if s not in in_flight}
    finals |= {f"{s} (in flight)": n for s, n in in_flight.items()}
    parts += [_counts("Final state", "state", finals), ""]
    parts += [_counts("Mode", "mode", summary.modes), ""]
    if summary.workers:
        workers = _table(
            "worker",
            "requests",
            "done",
            "failed",
            "cancelled",
            "migrated away",
            "prefill fell back",
            title="Workers",
            right=(
                "requests",
                "done",
                "failed",
                "cancelled",
                "migrated away",
                "prefill fell back",
            ),
        )
        for worker, c in summary.workers.items():
            workers.add_row(
                str(worker),
                str(c.requests),
                str(c.done),
                str(c.failed),
                str(c.cancelled),
                str(c.migrations),
                str(c.fallbacks),
            )
        parts += [workers, ""]
    if summary.prefix_hit_rate is None:
        hit = "n/a (no routing decision looked up prefix overlap)"
    else:
        hit = (
            f"{summary.prefix_hit_rate:.1%} ({summary.prefix_blocks_hit} of "
            f"{summary.prefix_blocks} prompt blocks cached on the chosen worker)"
        )
    events = [
        f"migrations: {summary.migrations} ({summary.migrated_requests} request(s))",
        f"prefill fallbacks: {summary.fallbacks}",
        "failures: "
        + (", ".join(f"{escape(r)} {n}" for r, n in summary.failures.items()) or "none"),
        "cancellations: "
        + (", ".join(f"{escape(r)} {n}" for r, n in summary.cancellations.items()) or "none"),
        f"prefix hit rate: {hit}",
    ]
    parts += [*events, ""]
    durations = _table(
        "state",
        "stays",
        "p50",
        "p90",
        "p99",
        "max",
        title="Time in state",
        right=("stays", "p50", "p90", "p99", "max"),
    )
    for state, stats in summary.durations.items():
        durations.add_row(
            _state(state),
            str(stats.count),
            seconds(stats.p50),
            seconds(stats.p90),
            seconds(stats.p99),
            seconds(stats.max),
        )
    parts.append(durations)
    return Group(*parts)


def render_summary(summary: Summary, *, show_wall: bool = True, width: int = TEXT_WIDTH) -> str:
    """The summary as plain-text tables (``show_wall=False`` leaves out the wall-clock span,
    for output that must not change between runs)."""
    return to_text(summary_renderable(summary, show_wall=show_wall), width=width)


# -- timeline --------------------------------------------------------------------------------


def _decision_renderables(entry: LogEntry) -> list[RenderableType]:
    decision = entry.decision
    assert isinstance(decision, Mapping)
    decode = decision.get("decode_worker_id")
    prefill = decision.get("prefill_worker_id")
    if decision.get("disaggregated"):
        plan = f"prefill on worker {prefill}, decode on worker {decode}"
    else:
        plan = f"worker {decode}, aggregated"
    prompt = decision.get("prompt_tokens")
    if prompt is None and isinstance(decision.get("token_ids"), list):
        prompt = len(decision["token_ids"])
    header = f"[bold]#{entry.seq} {escape(entry.trigger)}[/] → {escape(plan)}"
    if prompt is not None:
        header += f"; prompt of {prompt} tokens"
    parts: list[RenderableType] = [header]
    if decision.get("split_reason"):
        parts.append(f"  split: {escape(str(decision['split_reason']))}")
    for selection in decision.get("selections") or ():
        if not isinstance(selection, Mapping):
            continue
        chosen = selection.get("chosen")
        why = (
            f"  [bold]{escape(str(selection.get('leg')))} leg[/]: "
            f"{escape(str(selection.get('policy')))} chose worker {chosen}"
        )
        if selection.get("reason"):
            why += f": {escape(str(selection['reason']))}"
        parts.append(_indent(why.lstrip(), 2))
        excluded = selection.get("excluded") or []
        if excluded:
            parts.append(
                "    excluded (broke this request before): " + ", ".join(map(str, excluded))
            )
        table = _table(
            "",
            "worker",
            "overlap blocks",
            "prefill tokens",
            "decode blocks",
            "active",
            "cost",
            right=("worker", "overlap blocks", "prefill tokens", "decode blocks", "active", "cost"),
        )
        for c in selection.get("candidates") or ():
            if not isinstance(c, Mapping):
                continue
            cost = c.get("cost")
            mark = "[bold]▶[/]" if c.get("worker_id") == chosen else ""
            table.add_row(
                mark,
                str(c.get("worker_id")),
                str(c.get("overlap_blocks", 0)),
                str(c.get("prefill_tokens", 0)),
                str(c.get("decode_blocks", 0)),
                str(c.get("active_requests", 0)),
                "-" if cost is None else f"{cost:.3f}",
            )
        parts.append(_indent(table, 4))
    return parts


def _indent(renderable: RenderableType, spaces: int) -> RenderableType:
    return Padding(renderable, (0, 0, 0, spaces))


def _plan_note(entry: LogEntry) -> str | None:
    """A migration plan in words (None for other records)."""
    decision = entry.decision
    if entry.trigger != "migrate" or not isinstance(decision, Mapping):
        return None
    fields = [
        f"#{entry.seq} migrate off worker {entry.worker_id}: attempt {decision.get('attempt')}"
    ]
    exclude = decision.get("exclude")
    if isinstance(exclude, list) and exclude:
        fields.append("excluding worker(s) " + ", ".join(map(str, exclude)))
    if "folded_tokens" in decision:
        fields.append(f"{decision['folded_tokens']} generated token(s) folded into the prompt")
    request = decision.get("request")
    if isinstance(request, Mapping) and request.get("max_tokens") is not None:
        fields.append(f"max_tokens now {request['max_tokens']}")
    return "; ".join(fields)


def timeline_renderable(history: RequestHistory, *, show_wall: bool = True) -> RenderableType:
    """One request's timeline: each state with its duration and worker, then every routing
    decision with its candidate table, the chosen worker marked ``▶``."""
    first = history.entries[0]
    head = (
        f"[bold]request {escape(history.key)}[/] · mode {escape(history.mode)} · "
        f"{_state(history.final_state)}"
        + ("" if history.terminal else " (in flight)")
        + f" after {seconds(history.elapsed)} · {len(history.entries)} transitions"
    )
    parts: list[RenderableType] = [head]
    if show_wall:
        parts.append(
            f"first record at {_wall(first.wall)}, last at {_wall(history.entries[-1].wall)}"
        )
    if not history.complete:
        parts.append(
            f"[yellow]the log starts this request at record #{first.seq} ({escape(first.src)}); "
            "its first records are missing (rotated away, or lost)[/]"
        )
    table = _table(
        "#",
        "at",
        "trigger",
        "state",
        "worker",
        "stayed",
        "why",
        right=("#", "at", "worker", "stayed"),
    )
    for column in table.columns[:-1]:
        column.no_wrap = True
    table.columns[-1].overflow = "fold"
    plans: list[str] = []
    for span, entry in zip(history.spans, history.entries, strict=True):
        note = entry.detail or ""
        plan = _plan_note(entry)
        if plan is not None:
            plans.append(plan)
        if entry.trigger in ("route", "fall_back") and isinstance(entry.decision, Mapping):
            note = (note + "; " if note else "") + "decision below"
        table.add_row(
            str(entry.seq),
            "+" + seconds(entry.t - first.t),
            escape(entry.trigger),
            _state(span.state),
            "" if entry.worker_id is None else str(entry.worker_id),
            seconds(span.duration),
            escape(note),
        )
    parts += ["", table]
    for entry in history.entries:
        decision = entry.decision
        if entry.trigger == "preprocess" and isinstance(decision, Mapping):
            # The [[model_rewrites]] rule that chose the model (`ModelRewriteDecision`).
            parts += [
                "",
                f"[bold]Model rewrite[/]: rule {escape(repr(decision.get('rule')))} sent this "
                f"request for {escape(repr(decision.get('model')))} to "
                f"{escape(repr(decision.get('target')))} (weight {decision.get('weight')} of "
                f"{decision.get('total_weight')})",
            ]
    if plans:
        parts += ["", "[bold]Migrations[/]", *(_indent(escape(plan), 2) for plan in plans)]
    routing = history.routing_entries
    if routing:
        parts += ["", "[bold]Routing decisions[/] (why this worker)"]
        for entry in routing:
            parts += _decision_renderables(entry)
    return Group(*parts)


def render_timeline(
    history: RequestHistory, *, show_wall: bool = True, width: int = TEXT_WIDTH
) -> str:
    """One request's timeline as plain text (``show_wall=False`` leaves out the wall-clock
    start, for output that must not change between runs)."""
    return to_text(timeline_renderable(history, show_wall=show_wall), width=width)


# -- replay and validation -------------------------------------------------------------------


def replay_renderable(request_id: str, replays: Sequence[DecisionReplay]) -> RenderableType:
    """Each routing decision of a request recomputed, leg by leg, with a verdict."""
    if not replays:
        return f"request {escape(request_id)} has no routing decision to replay"
    table = _table(
        "#", "trigger", "leg", "policy", "recorded", "replayed", "", right=("#", "recorded")
    )
    notes: list[tuple[str, str]] = []
    for replay in replays:
        for leg in replay.legs:
            verdict = (
                "[green]match[/]"
                if leg.matches
                else "[yellow]not replayable[/]"
                if leg.custom
                else "[red]MISMATCH[/]"
            )
            table.add_row(
                str(replay.entry.seq),
                escape(replay.entry.trigger),
                escape(leg.leg),
                escape(leg.policy),
                str(leg.recorded),
                "-" if leg.replayed is None else str(leg.replayed),
                verdict,
            )
            if leg.error:
                color = "yellow" if leg.custom else "red"
                notes.append((color, f"#{replay.entry.seq} {leg.leg} leg: {leg.error}"))
        notes += [("red", f"#{replay.entry.seq}: {p}") for p in replay.inconsistencies]
    legs = sum(len(r.legs) for r in replays)
    custom = sum(leg.custom for r in replays for leg in r.legs)
    if all(r.matches for r in replays):
        verdict = (
            f"[green]all {legs} selection(s) of {len(replays)} decision(s) replay to the "
            "recorded workers[/]"
        )
    elif any(r.contradicts for r in replays):
        verdict = "[red]the replay does not match the record[/]"
    else:
        rest = (
            f"the other {legs - custom} replay to the recorded workers"
            if custom < legs
            else "the decisions agree with their selections"
        )
        verdict = (
            f"[yellow]{custom} of {legs} selection(s) were made by a custom policy and cannot "
            f"be recomputed; {rest}[/]"
        )
    return Group(
        f"[bold]request {escape(request_id)}[/]: routing decisions replayed from their records",
        "",
        table,
        *(f"[{color}]{escape(note)}[/]" for color, note in notes),
        verdict,
    )


def json_ready(value: Any) -> Any:
    """``value`` with mapping keys as strings (for `json.dumps`)."""
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    return value


def render_replay(
    request_id: str, replays: Sequence[DecisionReplay], *, width: int = TEXT_WIDTH
) -> str:
    """`replay_decisions` results as plain text."""
    return to_text(replay_renderable(request_id, replays), width=width)


def render_violations(violations: Sequence[Violation], requests: int) -> str:
    """`validate` results as plain text, one paragraph per failing request: its log lines,
    `check_invariants`'s message and the request's transitions (never wrapped, so each line
    can be searched for)."""
    if not violations:
        return f"{requests} request(s): every path is legal\n"
    parts = [f"{v.locations}: {v.message}\n\n" for v in violations]
    parts.append(f"{len(violations)} of {requests} request(s) break an invariant\n")
    return "".join(parts)
