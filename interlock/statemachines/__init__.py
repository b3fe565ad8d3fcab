"""The request lifecycle: states, per-mode graphs, the hot-path machine and its log."""

from ._fsm import RequestFsm
from ._log import (
    SCHEMA_VERSION,
    JsonlSink,
    MemoryLog,
    TransitionLog,
    TransitionRecord,
    TransitionSink,
    read_jsonl,
)
from ._modes import ALL_MODES, TERMINAL_STATES, Mode, State, Trigger, mode_for
from ._spec import (
    SpecModel,
    TransitionTable,
    build_machine,
    compile_table,
    mermaid_diagram,
    mode_edges,
    mode_states,
    table_for,
)

__all__ = [
    "ALL_MODES",
    "SCHEMA_VERSION",
    "TERMINAL_STATES",
    "JsonlSink",
    "MemoryLog",
    "Mode",
    "RequestFsm",
    "SpecModel",
    "State",
    "TransitionLog",
    "TransitionRecord",
    "TransitionSink",
    "TransitionTable",
    "Trigger",
    "build_machine",
    "compile_table",
    "mermaid_diagram",
    "mode_edges",
    "mode_for",
    "mode_states",
    "read_jsonl",
    "table_for",
]
