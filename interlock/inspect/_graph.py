"""A mode's state graph as mermaid, DOT or PNG, generated from its specification machine."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from typing import Literal

from ..statemachines import (
    TERMINAL_STATES,
    Mode,
    SpecModel,
    State,
    mermaid_diagram,
    mode_edges,
    mode_states,
)

GraphFormat = Literal["mermaid", "dot", "png"]
GRAPH_FORMATS: tuple[GraphFormat, ...] = ("mermaid", "dot", "png")


class GraphUnavailable(RuntimeError):
    """A graph format needs a tool that is not installed (``dot`` for PNG)."""


def _quote(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def dot_source(mode: Mode) -> str:
    """``mode``'s graph in Graphviz DOT: from transitions' graphviz engine when the
    ``graphviz`` Python package is installed, else written here from `mode_edges` (the same
    edges the machine is built from). Needs no ``dot`` binary either way."""
    if importlib.util.find_spec("graphviz") is not None:
        return _dot_from_transitions(mode)
    labels: dict[tuple[str, str], list[str]] = {}
    for trigger, src, dst in mode_edges(mode):
        labels.setdefault((src, dst), []).append(trigger)
    lines = [
        f"digraph {_quote(mode.name)} {{",
        f"  graph [label={_quote(mode.name)}, labelloc=t, rankdir=LR];",
        '  node [shape=box, style="rounded,filled", fillcolor=white];',
        '  "__start__" [shape=point, label=""];',
        f"  {_quote('__start__')} -> {_quote(State.RECEIVED.value)};",
    ]
    for state in mode_states(mode):
        shape = ", peripheries=2" if state in TERMINAL_STATES else ""
        lines.append(f"  {_quote(state)} [label={_quote(state)}{shape}];")
    for (src, dst), triggers in labels.items():
        lines.append(f"  {_quote(src)} -> {_quote(dst)} [label={_quote(' | '.join(triggers))}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dot_from_transitions(mode: Mode) -> str:  # pragma: no cover - needs the graphviz package
    from transitions.extensions.diagrams import GraphMachine

    machine = GraphMachine(
        model=SpecModel(),
        states=mode_states(mode),
        transitions=[{"trigger": t, "source": s, "dest": d} for t, s, d in mode_edges(mode)],
        initial=State.RECEIVED.value,
        auto_transitions=False,
        graph_engine="graphviz",
        title=mode.name,
    )
    source: str = machine.get_graph().source
    return source


def graph_source(mode: Mode | str, fmt: Literal["mermaid", "dot"] = "mermaid") -> str:
    """``mode``'s state graph as text: a mermaid ``stateDiagram-v2`` (transitions' mermaid
    engine) or Graphviz DOT.

    Raises:
        ValueError: an unknown mode or format.
    """
    if isinstance(mode, str):
        mode = Mode.from_name(mode)
    if fmt == "mermaid":
        return mermaid_diagram(mode)
    if fmt == "dot":
        return dot_source(mode)
    raise ValueError(f"format {fmt!r} is not one of 'mermaid', 'dot' (PNG: use render_png)")


def render_png(mode: Mode | str, path: str | os.PathLike[str]) -> None:
    """Draw ``mode``'s graph into a PNG file with Graphviz's ``dot`` program. Waits for it.

    Raises:
        GraphUnavailable: ``dot`` is not on PATH.
        ValueError: an unknown mode.
        subprocess.CalledProcessError: ``dot`` failed.
    """
    if isinstance(mode, str):
        mode = Mode.from_name(mode)
    dot = shutil.which("dot")
    if dot is None:
        raise GraphUnavailable(
            "--format png needs Graphviz's `dot` program, which is not on PATH: install "
            "graphviz (apt-get install graphviz, brew install graphviz), or print the graph as "
            "text with --format dot or --format mermaid"
        )
    subprocess.run(
        [dot, "-Tpng", "-o", os.fspath(path)],
        input=dot_source(mode).encode(),
        check=True,
        capture_output=True,
    )
