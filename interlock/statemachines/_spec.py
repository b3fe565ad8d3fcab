"""The specification of each mode: one `transitions.Machine`, compiled to a frozen table.

The machine is the reference (diagrams, docs, and the oracle tests compare against); the table is
what requests use at run time, because a machine costs 65-200 µs per request and a dict lookup
well under one.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import attrs
from transitions import Machine

from ._modes import ALL_MODES, TERMINAL_STATES, Mode, State, Trigger

TransitionTable = Mapping[tuple[str, str], str]


def mode_edges(mode: Mode) -> list[tuple[str, str, str]]:
    """Every ``(trigger, source, dest)`` edge of ``mode``'s graph."""
    edges: list[tuple[str, str, str]] = [
        (Trigger.PREPROCESS, State.RECEIVED, State.PREPROCESSED),
        (Trigger.ROUTE, State.PREPROCESSED, State.ROUTED),
    ]
    # Every mode answers queries (a query-only pipeline answers nothing else; the others
    # answer per-request queries such as the query_instance_id annotation).
    edges.append((Trigger.ANSWER, State.ROUTED, State.DONE))
    if mode.executes:
        edges += [
            (Trigger.START_PREFILL, State.ROUTED, State.PREFILLING),
            (Trigger.FINISH_PREFILL, State.PREFILLING, State.PREFILLED),
            (Trigger.START_DECODE, State.PREFILLED, State.DECODING),
            (Trigger.START_DECODE, State.ROUTED, State.DECODING),
            (Trigger.FINISH, State.DECODING, State.DONE),
        ]
        if mode.routing == "discover" and not mode.enforce_disagg:
            # A failed prefill leg is re-routed as an aggregated request.
            edges.append((Trigger.FALL_BACK, State.PREFILLING, State.ROUTED))
        if mode.migration:
            edges += [
                (Trigger.MIGRATE, State.DECODING, State.MIGRATED),
                (Trigger.ROUTE, State.MIGRATED, State.ROUTED),
            ]
    sources = sorted({src for _, src, _ in edges} - TERMINAL_STATES)
    for src in sources:
        edges.append((Trigger.FAIL, src, State.FAILED))
        edges.append((Trigger.CANCEL, src, State.CANCELLED))
    return [(str(t), str(s), str(d)) for t, s, d in edges]


def mode_states(mode: Mode) -> list[str]:
    """The states reachable in ``mode``, in lifecycle order."""
    used = {s for _, src, dst in mode_edges(mode) for s in (src, dst)}
    return [str(s) for s in State if s in used]


@attrs.define(slots=False, eq=False)
class SpecModel:
    """A model for driving a specification machine directly (tests, docs, the oracle)."""

    state: str = State.RECEIVED


def build_machine(mode: Mode, model: Any = None, *, graph: bool = False) -> Machine:
    """The specification `transitions.Machine` of ``mode``.

    With ``graph=True`` it is a `GraphMachine` on the mermaid engine (no graphviz needed), whose
    ``get_graph()`` draws the mode.
    """
    kwargs: dict[str, Any] = {
        "model": model,
        "states": mode_states(mode),
        "transitions": [{"trigger": t, "source": s, "dest": d} for t, s, d in mode_edges(mode)],
        "initial": State.RECEIVED.value,
        "auto_transitions": False,
        "send_event": False,
    }
    if graph:
        from transitions.extensions.diagrams import GraphMachine

        return GraphMachine(graph_engine="mermaid", title=mode.name, **kwargs)
    return Machine(**kwargs)


def compile_table(machine: Machine) -> TransitionTable:
    """Flatten a machine into ``{(state, trigger): dest}``.

    Raises:
        ValueError: the machine has a guarded or ambiguous transition, which a table cannot hold.
    """
    table: dict[tuple[str, str], str] = {}
    for trigger, event in machine.events.items():
        for source, transitions in event.transitions.items():
            if len(transitions) != 1 or transitions[0].conditions:
                raise ValueError(f"{trigger!r} from {source!r} is guarded or ambiguous")
            dest = transitions[0].dest
            if dest is None:
                raise ValueError(f"{trigger!r} from {source!r} is an internal transition")
            table[(source, trigger)] = dest
    return MappingProxyType(table)


@functools.cache
def table_for(mode: Mode) -> TransitionTable:
    """The compiled table of ``mode`` (built once per process)."""
    return compile_table(build_machine(mode))


def mermaid_diagram(mode: Mode) -> str:
    """A mermaid ``stateDiagram-v2`` of ``mode``, drawn by transitions' GraphMachine."""
    machine = build_machine(mode, SpecModel(), graph=True)
    source: str = machine.get_graph().source
    return source


def all_tables() -> dict[str, TransitionTable]:
    """Every mode's table, by mode name."""
    return {mode.name: table_for(mode) for mode in ALL_MODES}
