"""`python -m interlock demo`: the pipeline in every routing mode, on in-process mock workers.

Runs in virtual time (trio's MockClock), so the timings printed are the mock engines' model
of a real GPU while the whole demo takes well under a second.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio
import trio.testing
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ._config import PipelineConfig
from ._errors import InterlockError
from ._pipeline import Components, Pipeline, build_pipeline
from .engines.mock import MockEngine
from .statemachines import TransitionRecord
from .wire import PreprocessedRequest, RoutingHints

Scenario = Callable[[Pipeline], Awaitable[None]]


def _request(
    n: int, *, start: int = 1, backend_instance_id: int | None = None
) -> PreprocessedRequest:
    return PreprocessedRequest(
        token_ids=list(range(start, start + 200)),
        max_tokens=n,
        routing=(
            RoutingHints(backend_instance_id=backend_instance_id)
            if backend_instance_id is not None
            else None
        ),
    )


async def _generate(pipeline: Pipeline, request: PreprocessedRequest) -> None:
    try:
        async for _ in pipeline.generate(request):
            pass
    except InterlockError:
        pass  # The transition log shows what happened.


def _step(record: TransitionRecord) -> str:
    worker = f"[cyan]@{record.worker_id}[/]" if record.worker_id is not None else ""
    state = {
        "done": "[green]done[/]",
        "failed": "[red]failed[/]",
        "cancelled": "[yellow]cancelled[/]",
        "migrated": "[magenta]migrated[/]",
    }.get(record.dst, record.dst)
    shown = f"{state}{worker}"
    if record.trigger in ("fall_back", "migrate"):
        shown += f" [dim]({record.trigger})[/]"
    return shown


def _why(records: list[TransitionRecord]) -> str:
    notes = []
    for record in records:
        decision = record.decision
        if record.trigger in ("route", "fall_back") and decision is not None:
            legs = ", ".join(f"{s.leg}→{s.chosen} ({s.reason})" for s in decision.selections)
            notes.append(legs)
        if record.trigger in ("migrate", "fail", "fall_back") and record.detail:
            notes.append(record.detail)
    return "; ".join(notes)


def _show(console: Console, title: str, pipeline: Pipeline) -> None:
    table = Table(title=title, title_justify="left", show_lines=False, expand=False)
    table.add_column("request", style="bold")
    table.add_column("path")
    table.add_column("ms", justify="right")
    table.add_column("why")
    for request_id, records in pipeline.transition_log.by_request().items():
        path = " → ".join([records[0].src, *(_step(r) for r in records)])
        elapsed = (records[-1].t - records[0].t) * 1000
        table.add_row(request_id, path, f"{elapsed:.0f}", _why(records))
    console.print(table)
    console.print()


async def _run_demo(console: Console) -> None:
    scenarios: list[tuple[str, PipelineConfig, Callable[[], Components], Scenario]] = []

    async def three_requests(p: Pipeline) -> None:
        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(_generate, p, _request(16, start=i))

    scenarios.append(
        (
            "round_robin: three requests over three workers",
            PipelineConfig(),
            lambda: Components(workers=[MockEngine(i) for i in (1, 2, 3)]),
            three_requests,
        )
    )

    scenarios.append(
        (
            "a prefill worker is registered: prefill leg (1 token), then decode",
            PipelineConfig(),
            lambda: Components(
                workers=[MockEngine(1, role="decode"), MockEngine(2, role="decode")],
                prefill_workers=[MockEngine(9, role="prefill")],
            ),
            three_requests,
        )
    )

    async def with_crash(p: Pipeline) -> None:
        await _generate(p, _request(24))

    scenarios.append(
        (
            "migration_limit=2: worker 1 crashes after 10 tokens",
            PipelineConfig(migration_limit=2),
            lambda: Components(workers=[MockEngine(1, crash_after_tokens=10), MockEngine(2)]),
            with_crash,
        )
    )

    async def prefill_refuses(p: Pipeline) -> None:
        await _generate(p, _request(8))

    def refusing_prefill() -> Components:
        prefill = MockEngine(9, role="prefill")
        prefill.refuse_new()
        return Components(workers=[MockEngine(1, role="decode")], prefill_workers=[prefill])

    scenarios.append(
        (
            "the prefill worker refuses: the request falls back to aggregated",
            PipelineConfig(),
            refusing_prefill,
            prefill_refuses,
        )
    )

    async def named(p: Pipeline) -> None:
        await _generate(p, _request(8, backend_instance_id=3))
        await _generate(p, _request(8, backend_instance_id=42))

    scenarios.append(
        (
            "each request names its worker (42 is unknown)",
            PipelineConfig(routing="direct_to_known"),
            lambda: Components(workers=[MockEngine(i) for i in (1, 2, 3)]),
            named,
        )
    )

    async def queries(p: Pipeline) -> None:
        for i in range(3):
            decision = await p.query(_request(8, start=i))
            console.print(
                f"  query {decision.request_id}: prefill={decision.prefill_worker_id} "
                f"decode={decision.decode_worker_id} disaggregated={decision.disaggregated} "
                f"tokens={len(decision.token_ids)}"
            )

    scenarios.append(
        (
            "select workers, return them with the prompt tokens, run nothing",
            PipelineConfig(routing="query_only", router_mode="random", router_seed=7),
            lambda: Components(
                workers=[MockEngine(i, role="decode") for i in (1, 2, 3)],
                prefill_workers=[MockEngine(9, role="prefill")],
            ),
            queries,
        )
    )

    for title, config, components, scenario in scenarios:
        async with build_pipeline(config, components()) as pipeline:
            await scenario(pipeline)
        _show(console, escape(f"[{pipeline.mode.name}] {title}"), pipeline)


def run_demo(console: Console | None = None) -> None:
    """Run every demo scenario and print each request's transitions."""
    out = console or Console()
    out.print(
        "[bold]interlock demo[/]: every request is a state machine; the table shows each "
        "path, the worker of each step (@id) and why the router chose it.\n"
    )
    trio.run(_run_demo, out, clock=trio.testing.MockClock(autojump_threshold=0))
